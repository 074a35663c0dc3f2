"""Slide indexing (with bad inputs skipped, not fatal) and the slide tile source."""

from __future__ import annotations

import csv
import pathlib

import numpy as np
import pytest
import tifffile

from histokd_jax.data import manifest, slide_index, slides, synthetic_slides
from histokd_jax.data.synthetic import CLASS_NAMES
from histokd_jax.data.views import area_downsample

SETTINGS = slide_index.IndexSettings(teacher_mpp=1.0, tile_px=64)


def plain_tiff(path: pathlib.Path, image: np.ndarray, *, mpp: float | None) -> pathlib.Path:
    """A one-level tiled TIFF; without ``mpp`` it carries no usable resolution."""
    extra = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", **extra)
    return path


@pytest.fixture(scope="module")
def slide_set(tmp_path_factory) -> list[manifest.SlideEntry]:
    root = tmp_path_factory.mktemp("slides")
    path = synthetic_slides.write_slide_set(root / "set", seed=3, n_per_class=1, n_unlabeled=1,
                                            splits={"train": 1.0})
    return manifest.read_manifest(path, class_names=CLASS_NAMES)


def entry(path, line, label="solid", mpp=None):
    return manifest.SlideEntry(path=pathlib.Path(path), label=label, split="train", mpp=mpp, line=line)


def test_bad_slides_are_skipped_with_reasons_and_the_rest_indexed(tmp_path, slide_set):
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(b"II*\x00 this is not a slide")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    white = plain_tiff(tmp_path / "white.tiff", np.full((512, 512, 3), 245, np.uint8), mpp=1.0)
    tissue_like = np.full((512, 512, 3), (200, 120, 180), np.uint8)
    no_mpp = plain_tiff(tmp_path / "nompp.tiff", tissue_like, mpp=None)
    truncated = tmp_path / "truncated.tiff"  # a copy cut short (an interrupted transfer)
    whole = slide_set[0].path.read_bytes()
    truncated.write_bytes(whole[: len(whole) // 3])
    bad = [entry(tmp_path / "missing.svs", 90), entry(corrupt, 91), entry(text, 92), entry(white, 93),
           entry(no_mpp, 94), entry(truncated, 95)]
    usable, skipped = slide_index.index_slides([*slide_set, *bad], settings=SETTINGS, cache_dir=tmp_path / "cache",
                                               show_progress=False)
    assert [t.entry for t in usable] == slide_set
    reasons = {e.line: r for e, r in skipped}
    assert sorted(reasons) == [90, 91, 92, 93, 94, 95]
    assert "not found" in reasons[90]
    assert "cannot read" in reasons[91] and "cannot read" in reasons[92]
    assert "no tissue" in reasons[93]
    assert "override" in reasons[94]
    assert str(truncated) in reasons[95] and "cannot read" in reasons[95], reasons[95]
    with open(tmp_path / "cache" / "skipped_slides.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["line"]) for r in rows] == [90, 91, 92, 93, 94, 95] and all(r["reason"] for r in rows)

    # Two worker processes index the same slides, skip the same ones with the same reasons, in order.
    usable2, skipped2 = slide_index.index_slides([*slide_set, *bad], settings=SETTINGS, workers=2,
                                                 cache_dir=tmp_path / "cache2", show_progress=False)
    assert [t.entry for t in usable2] == slide_set and [(e, r) for e, r in skipped2] == list(skipped)
    for one, two in zip(usable, usable2):
        np.testing.assert_array_equal(one.coords, two.coords)
        np.testing.assert_array_equal(one.tissue, two.tissue)

    # The same slide with an mpp override in the manifest is usable.
    usable, skipped = slide_index.index_slides([entry(no_mpp, 95, mpp=1.0)], settings=SETTINGS,
                                               cache_dir=tmp_path / "cache", show_progress=False)
    assert len(usable) == 1 and usable[0].mpp_source == "override" and not skipped


def test_index_is_cached_and_reused(tmp_path, slide_set, monkeypatch):
    first, _ = slide_index.index_slides(slide_set, settings=SETTINGS, cache_dir=tmp_path, show_progress=False)
    assert len(list(tmp_path.glob("*.mask.png"))) == len(slide_set)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached tissue mask")

    monkeypatch.setattr(slides, "tissue_mask", fail)
    again, skipped = slide_index.index_slides(slide_set, settings=SETTINGS, cache_dir=tmp_path, show_progress=False)
    assert not skipped
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.coords, b.coords)


def test_tiles_lie_on_tissue_and_inherit_the_slide_label(tmp_path, slide_set):
    usable, _ = slide_index.index_slides(slide_set, settings=SETTINGS, cache_dir=tmp_path, show_progress=False)
    source = slide_index.SlideTileSource(usable, class_names=CLASS_NAMES, teacher_mpp=1.0, tile_px=64)
    assert len(source) == sum(len(t.coords) for t in usable) > 0
    for i in range(0, len(source), 7):
        element = source[i]
        image = element["image"].astype(np.float32)
        assert element["image"].shape == (64, 64, 3)
        assert image.mean() < 235  # stained tissue, not glass (about 240-248 on these slides)
        slide_label = usable[int(source.slide_of[i])].entry.label
        expected = CLASS_NAMES.index(slide_label) if slide_label else -1
        assert int(element["label"]) == expected and bool(element["has_label"]) == (expected >= 0)


def test_pyramid_student_view_shows_the_same_tissue(tmp_path, slide_set):
    usable, _ = slide_index.index_slides(slide_set[:1], settings=SETTINGS, cache_dir=tmp_path, show_progress=False)
    for student_mpp, factor in ((4.0, 4), (16.0, 16)):
        source = slide_index.SlideTileSource(usable, class_names=CLASS_NAMES, teacher_mpp=1.0, tile_px=64,
                                             student_mpp=student_mpp)
        element = source[len(source) // 2]
        assert element["student_image"].shape == (64 // factor, 64 // factor, 3)
        reference = area_downsample(element["image"], factor).astype(np.float32)
        assert np.abs(element["student_image"].astype(np.float32) - reference).mean() < 6.0
        source.close()


def test_a_slide_that_breaks_after_indexing_does_not_end_the_epoch(tmp_path, slide_set, caplog):
    copies = []
    for e in slide_set[:2]:
        target = tmp_path / e.path.name
        target.write_bytes(e.path.read_bytes())
        copies.append(entry(target, e.line, label=e.label))
    usable, _ = slide_index.index_slides(copies, settings=SETTINGS, cache_dir=tmp_path / "cache", show_progress=False)
    source = slide_index.SlideTileSource(usable, class_names=CLASS_NAMES, teacher_mpp=1.0, tile_px=64)
    copies[0].path.write_bytes(b"truncated")  # the first slide breaks after indexing
    first_slide_tiles = int(np.sum(source.slide_of == 0))
    element = source[0]
    assert element["image"].shape == (64, 64, 3)
    assert set(source.reasons) == {0}
    # the replacement is the first tile of the second slide, read independently
    with slides.open_slide(copies[1].path) as slide:
        x0, y0 = source.coords[first_slide_tiles]
        expected = slides.read_region_at(slide, x0=int(x0), y0=int(y0), size_px=64, base_mpp=1.0, target_mpp=1.0)
    np.testing.assert_array_equal(element["image"], expected)
    assert "became unreadable" in caplog.text
    # every tile of the epoch is still served
    assert all(source[i]["image"].shape == (64, 64, 3) for i in range(len(source)))
