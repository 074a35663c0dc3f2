"""Tests for the synthetic H&E tile generator (histokd_jax.data.synthetic)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histokd_jax.data.synthetic import CLASS_NAMES, contact_sheet, render_tile, write_tile_folder

SMALL = dict(n_train=7, n_unlabeled=9, n_val=4, n_test=5)

# Standard haematoxylin / eosin optical-density vectors (Ruifrok & Johnston), used
# here independently of the generator to colour-deconvolve its output.
_H = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])
_DECONV = np.linalg.inv(np.stack([_H, _E, np.cross(_H, _E)]))


def _png_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _h_od(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density per pixel by Beer-Lambert colour deconvolution."""
    od = -np.log10((np.asarray(rgb, dtype=np.float64) + 1.0) / 256.0)
    return od @ _DECONV[:, 0]


def _area_down(x: np.ndarray, f: int = 4) -> np.ndarray:
    n, h, w, c = x.shape
    return x.reshape(n, h // f, f, w // f, f, c).astype(np.float64).mean((2, 4))


def _fisher(per_class: list[np.ndarray]) -> float:
    """Between-class variance of the class means over the mean within-class variance."""
    means = np.array([s.mean() for s in per_class])
    return float(means.var() / np.mean([s.var() for s in per_class]))


def _nuclear_texture(h: np.ndarray) -> np.ndarray:
    """Per tile: mean |first difference| of H OD over the most stained 20% of pixels
    (nuclei), relative to their mean H OD -- a chromatin fine-texture contrast."""
    grad = np.abs(h - np.roll(h, 1, -1)) + np.abs(h - np.roll(h, 1, -2))
    nuc = h > np.percentile(h.reshape(len(h), -1), 80, axis=1)[:, None, None]
    return (grad * nuc).sum((1, 2)) / (h * nuc).sum((1, 2))


@pytest.fixture(scope="module")
def tiles_by_class() -> list[np.ndarray]:
    n = 90
    return [np.stack([render_tile(np.random.default_rng([2024, k, i]), k) for i in range(n)])
            for k in range(len(CLASS_NAMES))]


@pytest.mark.parametrize("tile_px", [32, 64, 128])
def test_render_dtype_and_shape(tile_px: int) -> None:
    for label in range(len(CLASS_NAMES)):
        tile = render_tile(np.random.default_rng(label), label, tile_px=tile_px)
        assert tile.dtype == np.uint8 and tile.shape == (tile_px, tile_px, 3)
        assert tile.std() > 5  # not a blank image


def test_render_rejects_bad_label() -> None:
    with pytest.raises(ValueError):
        render_tile(np.random.default_rng(0), len(CLASS_NAMES))


def test_render_is_deterministic_per_rng() -> None:
    a = render_tile(np.random.default_rng(11), 1)
    b = render_tile(np.random.default_rng(11), 1)
    c = render_tile(np.random.default_rng(12), 1)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_looks_like_h_and_e(tiles_by_class: list[np.ndarray]) -> None:
    rgb = np.concatenate(tiles_by_class).reshape(-1, 3).astype(float)
    r, g, b = rgb.mean(0)
    assert g < r and g < b  # eosin/haematoxylin both absorb green: pink-purple, not grey
    h = _h_od(np.concatenate(tiles_by_class))
    assert np.mean(h > 0.5) > 0.03  # dark nuclei exist
    assert np.mean(rgb.min(1) > 215) > 0.001  # some near-white gaps


def test_layout_counts_and_json(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    meta = write_tile_folder(root, seed=3, **SMALL)
    for split in ("train", "val", "test"):
        n = SMALL[f"n_{split}"]
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(CLASS_NAMES)
        got = [len(list((root / split / c).glob("*.png"))) for c in CLASS_NAMES]
        want = [len(range(k, n, len(CLASS_NAMES))) for k in range(len(CLASS_NAMES))]  # round robin
        assert got == want and sum(got) == n
        assert meta["counts"][split] == dict(zip(CLASS_NAMES, want))
    unl = sorted((root / "unlabeled").iterdir())
    assert [p.name for p in unl] == [f"{i:05d}.png" for i in range(SMALL["n_unlabeled"])]
    labels = json.loads((root / "synthetic.json").read_text())["unlabeled_labels"]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # balanced, kept only for diagnostics
    assert meta["params"]["seed"] == 3 and meta["params"]["tile_px"] == 64
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary leftovers
    with Image.open(unl[0]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"


def test_same_seed_identical_other_seed_different(tmp_path: Path) -> None:
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_tile_folder(tmp_path / name, seed=seed, **SMALL)
    a, b, c = (_png_bytes(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_tile_independent_of_other_split_sizes(tmp_path: Path) -> None:
    write_tile_folder(tmp_path / "a", seed=9, n_train=6, n_unlabeled=3, n_val=3, n_test=3)
    write_tile_folder(tmp_path / "b", seed=9, n_train=6, n_unlabeled=12, n_val=9, n_test=0)
    a, b = _png_bytes(tmp_path / "a"), _png_bytes(tmp_path / "b")
    shared = [k for k in a if not k.startswith("test")]
    assert len(shared) == 12 and all(a[k] == b[k] for k in shared)


def test_rerun_is_noop_and_mismatch_raises(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    meta = write_tile_folder(root, seed=1, **SMALL)
    files = sorted(root.rglob("*"))
    mtimes = [p.stat().st_mtime_ns for p in files]
    assert write_tile_folder(root, seed=1, **SMALL) == meta
    assert sorted(root.rglob("*")) == files and [p.stat().st_mtime_ns for p in files] == mtimes
    with pytest.raises(ValueError, match="seed"):
        write_tile_folder(root, seed=2, **SMALL)
    with pytest.raises(ValueError, match="n_train") as err:
        write_tile_folder(root, seed=1, **{**SMALL, "n_train": 8})
    assert "seed" not in str(err.value)
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import histokd_jax.data.synthetic as synthetic

    calls = []
    real = synthetic.render_tile

    def flaky(rng, label, *, tile_px=64):  # dies part-way, like a Ctrl-C
        calls.append(label)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(rng, label, tile_px=tile_px)

    monkeypatch.setattr(synthetic, "render_tile", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_tile_folder(tmp_path / "ds", seed=0, **SMALL)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "render_tile", real)
    write_tile_folder(tmp_path / "ds", seed=0, **SMALL)  # a clean retry then succeeds
    assert (tmp_path / "ds" / "synthetic.json").is_file()


def test_refuses_foreign_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_tile_folder(tmp_path / "ds", seed=0, **SMALL)
    assert (tmp_path / "ds" / "keep.txt").read_text() == "mine"


def test_equal_stain_but_fine_texture_separates_only_at_high_resolution(
    tiles_by_class: list[np.ndarray],
) -> None:
    # Equal haematoxylin: the class explains almost none of the per-tile H OD variance.
    h_mean = [_h_od(t).mean((1, 2)) for t in tiles_by_class]
    pooled = np.mean(np.concatenate(h_mean))
    assert all(abs(m.mean() - pooled) < 0.1 * pooled for m in h_mean)
    assert _fisher(h_mean) < 0.05
    # Chromatin texture separates classes at 64 px, far less after a 4x area downsample.
    hr = _fisher([_nuclear_texture(_h_od(t)) for t in tiles_by_class])
    lr = _fisher([_nuclear_texture(_h_od(_area_down(t))) for t in tiles_by_class])
    assert hr > 0.25, hr
    assert hr > 4 * lr, (hr, lr)


def test_contact_sheet(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_tile_folder(root, seed=0, n_train=9, n_unlabeled=0, n_val=0, n_test=0)
    sheet = contact_sheet(root, per_class=2)
    assert isinstance(sheet, Image.Image) and sheet.mode == "RGB"
    assert sheet.height >= len(CLASS_NAMES) * 64 and sheet.width >= 2 * 2 * 64
    assert contact_sheet(root, per_class=3).width > sheet.width
    arr = np.asarray(sheet)

    def found(img: np.ndarray) -> bool:  # img appears in the sheet at some integer zoom
        for zoom in range(1, 17):
            big = img.repeat(zoom, 0).repeat(zoom, 1)
            hh, ww = big.shape[:2]
            ys, xs = np.nonzero((arr[: arr.shape[0] - hh + 1, : arr.shape[1] - ww + 1] == big[0, 0]).all(-1))
            if any((arr[y:y + hh, x:x + ww] == big).all() for y, x in zip(ys, xs)):
                return True
        return False

    for name in CLASS_NAMES:
        tile = np.asarray(Image.open(root / "train" / name / f"{CLASS_NAMES.index(name):05d}.png"))
        assert found(tile)  # full resolution, unchanged
        assert found(np.rint(_area_down(tile[None])[0]).astype(np.uint8))  # 4x area-downsampled
