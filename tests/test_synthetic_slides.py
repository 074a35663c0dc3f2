"""Tests for the synthetic whole-slide generator (histokd_jax.data.synthetic_slides),
read back through OpenSlide (the reader the project uses) and tifffile (an independent one)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from histokd_jax.data import synthetic_slides as ss
from histokd_jax.data.synthetic import CLASS_NAMES
from histokd_jax.data.synthetic_slides import render_slide, write_slide, write_slide_set

# non-square on purpose, so that a width/height or x/y swap shows
GRID = (4, 6)  # rows, cols -> level 0 is 384 px wide and 256 px high at tile_px 64
SET = dict(n_per_class=3, n_unlabeled=2, tile_grid=(4, 4), tile_px=64, mpp=0.5)


def _rgb(region) -> np.ndarray:
    return np.asarray(region.convert("RGB"), dtype=np.float64)


def _block_mean(x: np.ndarray, f: int) -> np.ndarray:
    h, w, c = x.shape
    return x.astype(np.float64).reshape(h // f, f, w // f, f, c).mean((1, 3))


def _saturation(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x.max(-1) - x.min(-1)) / np.maximum(x.max(-1), 1.0)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("slide") / "s.tiff"
    info = write_slide(path, label=1, seed=11, tile_grid=GRID, mpp=0.25)
    return path, info


@pytest.mark.parametrize("mpp,levels", [(1.0, (1, 4, 16)), (0.25, (1, 2, 8))])
def test_openslide_pyramid_and_mpp(tmp_path: Path, mpp: float, levels: tuple[int, ...]) -> None:
    path = tmp_path / "s.tiff"
    info = write_slide(path, label=0, seed=3, tile_grid=GRID, mpp=mpp, levels=levels)
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    with openslide.OpenSlide(str(path)) as s:
        assert s.level_count == len(levels)
        np.testing.assert_allclose(s.level_downsamples, levels)
        assert s.level_dimensions == tuple((384 // f, 256 // f) for f in levels)  # (width, height)
        assert [tuple(d) for d in info["level_dimensions"]] == list(s.level_dimensions)
        p = s.properties
        # OpenSlide derives openslide.mpp-x/-y from tiff.XResolution/YResolution (pixels per
        # ResolutionUnit; here centimetre): mpp = 1e4 / XResolution
        assert float(p[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(mpp)
        assert float(p[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(mpp)
        assert p["tiff.ResolutionUnit"] == "centimeter"
        assert float(p["tiff.XResolution"]) == pytest.approx(1e4 / mpp)
        assert int(p["openslide.level[0].tile-width"]) == 256
    with tifffile.TiffFile(path) as tf:  # separate pages, not SubIFDs
        assert len(tf.pages) == len(levels) and all(not pg.subifds for pg in tf.pages)
        assert [pg.subfiletype for pg in tf.pages] == [0] + [1] * (len(levels) - 1)
        for pg, f in zip(tf.pages, levels):
            assert pg.is_tiled and pg.tilewidth == pg.tilelength == 256
            assert pg.compression == tifffile.COMPRESSION.JPEG
            assert pg.photometric == tifffile.PHOTOMETRIC.RGB
            x_res = pg.tags["XResolution"].value
            assert x_res[0] / x_res[1] == pytest.approx(1e4 / (mpp * f), rel=1e-6)


def test_pixels_match_generated_array_and_block_means(slide) -> None:
    path, info = slide
    expected = render_slide(label=1, seed=11, tile_grid=GRID)[0].astype(np.float64)
    with openslide.OpenSlide(str(path)) as s:
        level0 = _rgb(s.read_region((0, 0), 0, s.level_dimensions[0]))
        assert level0.shape == expected.shape == (256, 384, 3)
        assert np.abs(level0 - expected).mean() < 3.0  # JPEG q90, no chroma subsampling
        # an offset, non-square window straddling 256-px TIFF tiles: x is the column
        window = _rgb(s.read_region((300, 200), 0, (80, 50)))
        assert np.abs(window - expected[200:250, 300:380]).mean() < 3.0
        for k, f in enumerate(info["levels"][1:], start=1):
            level_k = _rgb(s.read_region((0, 0), k, s.level_dimensions[k]))
            err = np.abs(level_k - _block_mean(expected, f)).mean()
            # JPEG q90 error grows on coarse levels, where nearly every pixel is an edge (~3.1 at 16x)
            assert err < (3.0 if f <= 4 else 4.0)
            # an area (block-mean) downsample, not decimation
            assert err < 0.5 * np.abs(level_k - expected[f // 2::f, f // 2::f]).mean()
    with tifffile.TiffFile(path) as tf:  # independent decoder agrees with OpenSlide
        assert np.abs(tf.pages[0].asarray().astype(np.float64) - level0).max() <= 1.0


def test_glass_is_white_and_tissue_is_coloured(slide) -> None:
    path, info = slide
    frac = info["tissue_fraction"]
    assert frac.shape == GRID
    assert 0.45 < frac.mean() < 0.75  # default background_fraction 0.4
    with openslide.OpenSlide(str(path)) as s:
        img = _rgb(s.read_region((0, 0), 0, s.level_dimensions[0]))
    cells = img.reshape(GRID[0], 64, GRID[1], 64, 3).transpose(0, 2, 1, 3, 4)
    glass, tissue = cells[frac == 0.0], cells[frac == 1.0]
    assert len(glass) and len(tissue)
    assert glass.mean() > 220 and tissue.mean() < 215
    assert _saturation(tissue).mean() > 0.2 > 0.05 > _saturation(glass).mean()


def test_labels_and_mixed_slides(tmp_path: Path) -> None:
    for label in range(len(CLASS_NAMES)):
        _, info = render_slide(label=label, seed=label, tile_grid=(2, 2))
        assert (info["tile_labels"] == label).all()
    mixed = [np.unique(render_slide(label=None, seed=s, tile_grid=(4, 4))[1]["tile_labels"]).size
             for s in range(4)]
    assert max(mixed) > 1
    with pytest.raises(ValueError, match="label"):
        render_slide(label=len(CLASS_NAMES), seed=0)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="divisible"):
        write_slide(tmp_path / "s.tiff", label=0, seed=0, tile_grid=(1, 1), tile_px=48, levels=(1, 32))


@pytest.fixture(scope="module")
def slide_set(tmp_path_factory) -> Path:
    return write_slide_set(tmp_path_factory.mktemp("set") / "data", seed=5, **SET)


def _manifest(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["slide", "label", "split", "mpp"]
        return list(reader)


def test_manifest_rows(slide_set: Path) -> None:
    assert slide_set.name == "manifest.csv"
    rows = _manifest(slide_set)
    assert len(rows) == 3 * len(CLASS_NAMES) + 2
    for r in rows:
        path = slide_set.parent / r["slide"]
        assert path.is_file() and path.parent.name == "slides" and path.suffix == ".tiff"
        assert r["label"] in CLASS_NAMES or r["label"] == ""
        assert r["split"] in ("train", "val", "test")
        assert r["mpp"] == "" or float(r["mpp"]) == 0.5
    unlabeled = [r for r in rows if r["label"] == ""]
    assert len(unlabeled) == 2 and {r["split"] for r in unlabeled} == {"train"}
    for split in ("train", "val", "test"):  # each split has every class, equally often
        counts = [sum(r["label"] == c and r["split"] == split for r in rows) for c in CLASS_NAMES]
        assert len(set(counts)) == 1 and counts[0] >= 1
    with openslide.OpenSlide(str(slide_set.parent / rows[-1]["slide"])) as s:
        assert s.level_dimensions[0] == (256, 256)
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)


def test_deterministic_idempotent_and_checked(slide_set: Path, tmp_path: Path) -> None:
    again = write_slide_set(tmp_path / "again", seed=5, workers=2, **SET)  # drawn by two processes
    assert again.read_bytes() == slide_set.read_bytes()
    meta = [(p.parent / "synthetic_slides.json").read_text() for p in (slide_set, again)]
    assert meta[0] == meta[1]
    for r in _manifest(slide_set):
        a = tifffile.imread(slide_set.parent / r["slide"], key=0)
        b = tifffile.imread(again.parent / r["slide"], key=0)
        np.testing.assert_array_equal(a, b)
    other = write_slide_set(tmp_path / "other", seed=6, **SET)
    first = _manifest(other)[0]["slide"]
    assert not np.array_equal(tifffile.imread(other.parent / first, key=0),
                              tifffile.imread(slide_set.parent / first, key=0))

    before = {p: p.stat().st_mtime_ns for p in again.parent.rglob("*")}
    assert write_slide_set(tmp_path / "again", seed=5, **SET) == again  # no-op
    assert {p: p.stat().st_mtime_ns for p in again.parent.rglob("*")} == before
    with pytest.raises(ValueError, match="n_unlabeled") as err:
        write_slide_set(tmp_path / "again", seed=5, **{**SET, "n_unlabeled": 3})
    assert "tile_px" not in str(err.value)
    with pytest.raises(ValueError, match="tile_px"):
        write_slide_set(tmp_path / "again", seed=5, **{**SET, "tile_px": 32})
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_slide_set(tmp_path / "foreign", seed=5, **SET)
    with pytest.raises(ValueError, match="unknown class"):
        write_slide_set(tmp_path / "bad", seed=5, n_per_class={"nope": 1})


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = ss.write_slide
    monkeypatch.setattr(ss, "write_slide", failing)
    with pytest.raises(KeyboardInterrupt):
        write_slide_set(tmp_path / "data", seed=1, n_per_class=1, n_unlabeled=0, tile_grid=(2, 2))
    assert list(tmp_path.iterdir()) == []


def test_split_counts_per_class(tmp_path: Path) -> None:
    manifest = write_slide_set(tmp_path / "d", seed=2, n_per_class={"solid": 5, "speckled": 2}, n_unlabeled=0,
                               splits={"train": 0.6, "val": 0.2, "test": 0.2}, tile_grid=(1, 1), tile_px=32,
                               levels=(1, 2))
    rows = _manifest(manifest)
    count = {(c, s): sum(r["label"] == c and r["split"] == s for r in rows)
             for c in CLASS_NAMES for s in ("train", "val", "test")}
    assert [count["solid", s] for s in ("train", "val", "test")] == [3, 1, 1]
    assert sum(count["speckled", s] for s in ("train", "val", "test")) == 2
    assert sum(count["vesicular", s] for s in ("train", "val", "test")) == 0
