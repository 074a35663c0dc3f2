"""Slides that fail: at indexing (undecodable JPEG tiles), after indexing (during evaluation), or all of them.

The broken slides are made here with tifffile from the slides' own tile offsets (independently
of the code under test); the expected labels come from the manifest read with the csv module.
"""

from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import openslide
import pytest
import tifffile

from histokd_jax import evaluation, parallel, report, trainer
from histokd_jax.data import manifest, slide_index, slides, splits, synthetic_slides
from histokd_jax.data.synthetic import CLASS_NAMES
from histokd_jax.data.views import ViewSpec
from tests.tiny import chromatin_slide_data

REPO = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = slide_index.IndexSettings(teacher_mpp=1.0, tile_px=64)
SPEC = ViewSpec(teacher_px=64, downsample=4, flips=False, rot90=False)


def corrupt_jpeg_tiles(path: pathlib.Path, *, level0_tiles: slice = slice(None), all_levels: bool = True) -> None:
    """Zero the second half of the entropy-coded data of JPEG tiles: the file still opens, those tiles
    fail to decode ("Corrupt JPEG data: premature end of data segment"). The size stays the same."""
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        for k, page in enumerate(tif.pages):
            if k and not all_levels:
                break
            chosen = list(zip(page.dataoffsets, page.databytecounts))
            for offset, count in chosen[level0_tiles] if k == 0 else chosen:
                half = offset + count // 2
                data[half : offset + count - 2] = bytes(offset + count - 2 - half)
    path.write_bytes(bytes(data))


def manifest_labels(path: pathlib.Path) -> dict[str, str]:
    """slide path (resolved) -> label, read from the manifest csv directly."""
    with open(path, newline="") as handle:
        return {str((path.parent / row["slide"]).resolve()): row["label"] for row in csv.DictReader(handle)}


def skipped_rows(csv_path: pathlib.Path) -> list[dict]:
    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_slide_with_undecodable_jpeg_tiles_is_skipped_and_the_other_bad_slides_are_reached(tmp_path):
    good = manifest.read_manifest(
        synthetic_slides.write_slide_set(tmp_path / "set", seed=5, n_per_class=1, n_unlabeled=0,
                                         splits={"train": 1.0}, tile_grid=(4, 4)), class_names=CLASS_NAMES)
    jpeg = tmp_path / "bad_jpeg.tiff"
    jpeg.write_bytes(good[0].path.read_bytes())
    corrupt_jpeg_tiles(jpeg)
    with slides.open_slide(jpeg) as slide:  # it opens: only reading its tiles fails
        assert slide.dimensions == (256, 256)
    no_mpp = tmp_path / "nompp.tiff"
    tifffile.imwrite(no_mpp, np.full((256, 256, 3), (200, 120, 180), np.uint8), tile=(256, 256), photometric="rgb")
    header = tmp_path / "corrupt.svs"
    header.write_bytes(b"II*\x00 not a slide")

    def entry(path, line):
        return manifest.SlideEntry(path=path, label="solid", split="train", mpp=None, line=line)

    bad = [entry(jpeg, 10), entry(no_mpp, 11), entry(header, 12), entry(tmp_path / "missing.svs", 13)]
    usable, skipped = slide_index.index_slides([bad[0], *good, *bad[1:]], settings=SETTINGS,
                                               cache_dir=tmp_path / "cache", show_progress=False)
    assert [t.entry for t in usable] == good
    reasons = {e.line: r for e, r in skipped}
    assert sorted(reasons) == [10, 11, 12, 13]
    assert str(jpeg) in reasons[10] and "Corrupt JPEG data" in reasons[10]
    assert str(no_mpp) in reasons[11] and "override" in reasons[11]
    for reason in reasons.values():
        assert "PosixPath" not in reason and "OpenSlide(" not in reason
    rows = skipped_rows(tmp_path / "cache" / "skipped_slides.csv")
    assert [(r["slide"], r["reason"]) for r in rows] == [(str(e.path), reasons[e.line]) for e in bad]


@pytest.fixture
def slide_splits(tmp_path) -> tuple[splits.DataSplits, pathlib.Path, pathlib.Path]:
    """Sources of a small slide set (3 slides per class: one each in train, val, test), via the same
    ``load_slide_splits`` a run uses; (splits, manifest, workdir)."""
    path = synthetic_slides.write_slide_set(tmp_path / "set", seed=7, n_per_class=3, n_unlabeled=0,
                                            tile_grid=(6, 6), splits={"train": 1, "val": 1, "test": 1})
    data = chromatin_slide_data()
    data.kind, data.manifest = "slides", str(path)
    workdir = tmp_path / "run"
    return splits.load_slide_splits(data, workdir=workdir, config_name="test"), path, workdir


def fake_eval_fn(params, batch):
    """Class 'probabilities' from the image itself (mean colour), so each output row shows which tile it saw."""
    mean = jnp.mean(batch["teacher_image"].astype(jnp.float32), axis=(1, 2)) / 255.0
    return mean / jnp.sum(mean, axis=-1, keepdims=True)


def expected_probs(image: np.ndarray) -> np.ndarray:
    mean = image.astype(np.float32).mean(axis=(0, 1)) / 255.0
    return mean / mean.sum()


@pytest.mark.parametrize("split, breakage", [("test", "bad_jpeg_tiles"), ("val", "truncated")])
def test_a_slide_broken_after_indexing_is_dropped_whole_from_evaluation(slide_splits, split, breakage, caplog):
    data_splits, path, workdir = slide_splits
    source = getattr(data_splits, split)
    assert len(source.paths) >= 3
    broken = source.paths[1]
    n_broken = int(np.sum(source.slide_of == 1))
    if breakage == "truncated":
        size = pathlib.Path(broken).stat().st_size
        pathlib.Path(broken).write_bytes(pathlib.Path(broken).read_bytes()[: size // 3])
    else:  # all but the first (top-left) level-0 TIFF tile: the slide's first tiles read, later ones fail
        corrupt_jpeg_tiles(pathlib.Path(broken), level0_tiles=slice(1, None), all_levels=False)
        tiles = source.coords[source.slide_of == 1]
        for (x0, y0), reads in ((tiles[0], True), (tiles[-1], False)):
            with slides.open_slide(broken) as slide:
                try:
                    slides.read_region_at(slide, x0=int(x0), y0=int(y0), size_px=64, base_mpp=1.0, target_mpp=1.0)
                    read = True
                except openslide.OpenSlideError:
                    read = False
            assert read == reads, (x0, y0)

    scored = evaluation.evaluate_split(None, source, model=None, image_key="teacher_image", spec=SPEC,
                                    mesh=parallel.make_mesh(), batch_size=8, eval_fn=fake_eval_fn)

    labels_by_slide = manifest_labels(path)
    kept = [i for i in range(len(source)) if source.paths[source.slide_of[i]] != broken]
    expected = [CLASS_NAMES.index(labels_by_slide[str(pathlib.Path(source.paths[source.slide_of[i]]).resolve())])
                for i in kept]
    np.testing.assert_array_equal(scored.labels, expected)
    assert len(scored.labels) == len(source) - n_broken
    np.testing.assert_array_equal(scored.records, kept)
    # the outputs are those of the right tiles, read independently
    for row in (0, len(kept) // 2, len(kept) - 1):
        i = kept[row]
        with slides.open_slide(source.paths[source.slide_of[i]]) as slide:
            x0, y0 = (int(v) for v in source.coords[i])
            image = slides.read_region_at(slide, x0=x0, y0=y0, size_px=64, base_mpp=1.0, target_mpp=1.0)
        np.testing.assert_allclose(scored.probs[row], expected_probs(image), rtol=1e-5)
    assert scored.dropped == ((broken, scored.dropped[0][1]),) and broken in scored.dropped[0][1]
    assert scored.counts() == {"tiles_scored": len(kept), "slides_scored": len(source.paths) - 1,
                               "slides_dropped": 1}
    assert "dropped" in caplog.text and broken in caplog.text
    rows = [r for r in skipped_rows(workdir / "slide_index" / "skipped_slides.csv") if r["slide"] == broken]
    assert len(rows) == 1 and rows[0]["reason"].startswith("unreadable during evaluation: ")
    assert rows[0]["split"] == split
    if breakage == "bad_jpeg_tiles":
        assert "Corrupt JPEG" in rows[0]["reason"]

    # evaluating again (the next validation) gives the same result and lists the slide once
    again = evaluation.evaluate_split(None, source, model=None, image_key="teacher_image", spec=SPEC,
                                   mesh=parallel.make_mesh(), batch_size=8, eval_fn=fake_eval_fn)
    np.testing.assert_array_equal(again.labels, scored.labels)
    assert len([r for r in skipped_rows(workdir / "slide_index" / "skipped_slides.csv") if r["slide"] == broken]) == 1
    # a rerun indexes the slides again (rewriting the csv): the row of the evaluation's drop stays
    slide_index.index_slides(manifest.read_manifest(path, class_names=CLASS_NAMES), settings=SETTINGS,
                             cache_dir=workdir / "slide_index", show_progress=False)
    assert [r["reason"] for r in skipped_rows(workdir / "slide_index" / "skipped_slides.csv")
            if r["slide"] == broken and r["reason"].startswith("unreadable during evaluation: ")] == [rows[0]["reason"]]

    # the saved predictions hold the scored tiles only, with their slides; the report says what was scored
    trainer.save_test_predictions(workdir / "teacher", scored=scored, splits=data_splits)
    preds = report.load_predictions(workdir / "teacher")
    np.testing.assert_array_equal(preds["labels"], expected)
    assert broken not in set(preds["slides"])
    assert [str(pathlib.Path(s).resolve()) for s in preds["slides"]] == [
        str(pathlib.Path(source.paths[source.slide_of[i]]).resolve()) for i in kept]
    entry = report.model_report(preds, n_boot=20)
    assert entry["scored"]["tiles"] == len(kept) and entry["scored"]["slides"] == len(source.paths) - 1
    assert entry["tiles"]["n"] == len(kept) and entry["slides"]["n"] == len(source.paths) - 1
    assert [d["name"] for d in entry["scored"]["dropped"]] == [broken]
    text = report.markdown({"teacher": entry})
    assert "Scored and dropped" in text and broken in text


def test_training_sources_substitute_and_evaluation_sources_refuse(slide_splits):
    data_splits, _, _ = slide_splits
    train, test = data_splits.train, data_splits.test
    corrupt_jpeg_tiles(pathlib.Path(train.paths[0]))
    corrupt_jpeg_tiles(pathlib.Path(test.paths[0]))
    first_of_next = int(np.flatnonzero(train.slide_of == 1)[0])
    with slides.open_slide(train.paths[1]) as slide:  # the next slide's first tile, read independently
        x0, y0 = (int(v) for v in train.coords[first_of_next])
        next_tile = slides.read_region_at(slide, x0=x0, y0=y0, size_px=64, base_mpp=float(train.mpps[1]),
                                          target_mpp=1.0)
    np.testing.assert_array_equal(train[0]["image"], next_tile)  # replaced by the next slide's tile
    assert set(train.reasons) == {0}
    assert all(train[i]["image"].shape == (64, 64, 3) for i in range(0, len(train), 5))
    with pytest.raises(OSError, match=str(test.paths[0])):
        test[0]
    with pytest.raises(OSError, match="unreadable after indexing"):
        test[1]  # known bad now: refused without another read
    first_of_second = int(np.flatnonzero(test.slide_of == 1)[0])
    assert test[first_of_second]["image"].shape == (64, 64, 3)  # the other slides still read


def test_every_test_slide_unreadable_is_a_clear_error_naming_them(slide_splits):
    data_splits, _, workdir = slide_splits
    source = data_splits.test
    for p in source.paths:
        corrupt_jpeg_tiles(pathlib.Path(p))
    started = time.perf_counter()
    with pytest.raises(ValueError, match="nothing left to evaluate") as error:
        evaluation.evaluate_split(None, source, model=None, image_key="teacher_image", spec=SPEC,
                               mesh=parallel.make_mesh(), batch_size=8, eval_fn=fake_eval_fn)
    assert time.perf_counter() - started < 30
    assert all(p in str(error.value) for p in source.paths)
    assert "skipped_slides.csv" in str(error.value)


def test_every_slide_skipped_at_indexing_names_them(tmp_path):
    path = synthetic_slides.write_slide_set(tmp_path / "set", seed=7, n_per_class=3, n_unlabeled=0,
                                            tile_grid=(4, 4), splits={"train": 1, "val": 1, "test": 1})
    entries = manifest.read_manifest(path, class_names=CLASS_NAMES)
    for e in entries:
        corrupt_jpeg_tiles(e.path)
    data = chromatin_slide_data()
    data.kind, data.manifest = "slides", str(path)
    with pytest.raises(ValueError, match="no usable labelled slide") as error:
        splits.load_slide_splits(data, workdir=tmp_path / "run", config_name="test")
    message = str(error.value)
    assert "skipped_slides.csv" in message and "Corrupt JPEG" in message
    assert all(str(e.path) in message for e in entries[:5])


TRAIN_SCRIPT = """
import pathlib, sys
from absl import flags
flags.FLAGS.mark_as_parsed()
from histokd_jax.data import manifest, pipeline, slide_index
from histokd_jax.data.synthetic import CLASS_NAMES
from histokd_jax.data.views import ViewSpec

if __name__ == "__main__":
    cache, workers, *paths = sys.argv[1:]
    entries = [manifest.SlideEntry(pathlib.Path(p), "solid", "train", None, i) for i, p in enumerate(paths)]
    usable, _ = slide_index.index_slides(entries, settings=slide_index.IndexSettings(teacher_mpp=1.0, tile_px=64),
                                         cache_dir=cache, show_progress=False)
    source = slide_index.SlideTileSource(usable, class_names=CLASS_NAMES, teacher_mpp=1.0, tile_px=64)
    from tests.test_slide_failures import corrupt_jpeg_tiles
    for p in paths:
        corrupt_jpeg_tiles(pathlib.Path(p))
    loader = pipeline.make_train_loader(source, spec=ViewSpec(teacher_px=64, downsample=4), batch_size=4, seed=0,
                                        workers=int(workers))
    try:
        next(iter(loader))
    except Exception as err:
        print("ERROR:", type(err).__name__, err, flush=True)
        sys.exit(3)
    print("NO ERROR", flush=True)
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_training_with_every_slide_unreadable_fails_fast_naming_them(tmp_path, workers):
    path = synthetic_slides.write_slide_set(tmp_path / "set", seed=9, n_per_class=1, n_unlabeled=0,
                                            tile_grid=(4, 4), splits={"train": 1.0})
    paths = [str(e.path) for e in manifest.read_manifest(path, class_names=CLASS_NAMES)]
    script = tmp_path / "train_all_bad.py"
    script.write_text(TRAIN_SCRIPT)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "cache"), str(workers), *paths],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 3, out.stdout + out.stderr
    assert time.perf_counter() - started < 60  # measured 7-11 s, most of it starting Python and JAX
    assert "every slide of this source is unreadable" in out.stdout + out.stderr
    assert all(p in out.stdout + out.stderr for p in paths)


def test_a_corrupt_folder_tile_is_dropped_from_evaluation_with_its_reason(tmp_path):
    from PIL import Image

    from histokd_jax.data import sources

    records = []
    for i in range(5):
        path = tmp_path / f"tile_{i}.png"
        Image.fromarray(np.full((64, 64, 3), 40 * (i + 1), np.uint8)).save(path)
        records.append(sources.TileRecord(str(path), i % 3))
    pathlib.Path(records[2].path).write_bytes(b"not a png")
    # a tile smaller than the teacher crop that the scan's sample missed (splits of more than 20,000 tiles)
    small = tmp_path / "tile_small.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(small)
    records.append(sources.TileRecord(str(small), 2))
    scored = evaluation.evaluate_split(None, sources.TileSource(records, min_px=64), model=None,
                                       image_key="teacher_image", spec=SPEC, mesh=parallel.make_mesh(),
                                       batch_size=4, eval_fn=fake_eval_fn)
    np.testing.assert_array_equal(scored.labels, [0, 1, 0, 1])
    np.testing.assert_array_equal(scored.records, [0, 1, 3, 4])
    assert scored.slides is None and scored.counts() == {"tiles_scored": 4, "tiles_dropped": 2}
    assert "smaller than the teacher crop" in dict(scored.dropped)[str(small)]
    assert scored.dropped[0][0] == records[2].path and records[2].path in scored.dropped[0][1]
