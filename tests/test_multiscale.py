"""The multi-scale generator's stated properties, measured independently of its code: class evidence
per scale (a scikit-learn classifier on block-mean statistics), sizes in µm (connected components),
determinism, the evidence knob, and the slides' pyramid levels as OpenSlide reads them."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from histokd_jax.data import multiscale, synthetic, synthetic_slides


def _block_mean(image: np.ndarray, f: int) -> np.ndarray:
    """Block means written independently of histokd_jax.data.views (a reshape, in float64)."""
    h, w, c = image.shape
    return image.reshape(h // f, f, w // f, f, c).astype(np.float64).mean((1, 3))


def _summary(image: np.ndarray) -> np.ndarray:
    """Colour, brightness and edge statistics of a (block-mean) image: what a person reads at low power."""
    g = image / 255.0
    lum = g.mean(-1)
    sat = g.max(-1) - g.min(-1)
    edges = np.abs(np.diff(lum, axis=0)).mean() + np.abs(np.diff(lum, axis=1)).mean()
    return np.concatenate([g.mean((0, 1)), g.std((0, 1)),
                           [(lum > 0.85).mean(), (lum < 0.45).mean(), sat.mean(), sat.std(), edges]])


def _cv_accuracy(tiles: list[np.ndarray], labels: np.ndarray, factor: int) -> float:
    x = np.stack([_summary(_block_mean(t, factor)) for t in tiles])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(cross_val_score(model, x, labels, cv=5).mean())


@pytest.fixture(scope="module")
def tiles_by_evidence() -> dict[float, tuple[list[np.ndarray], np.ndarray]]:
    out = {}
    for evidence in (1.0, 0.0):
        labels = np.arange(240) % 3
        tiles = [multiscale.render_tile(np.random.default_rng([11, i]), int(k), tile_px=128, evidence=evidence)
                 for i, k in enumerate(labels)]
        out[evidence] = (tiles, labels)
    return out


@pytest.mark.slow
def test_coarse_evidence_survives_8x_block_means_and_the_knob_removes_it(tiles_by_evidence):
    """At evidence 1 the architecture is readable from block means at 5x, 2.5x and 1.25x; at evidence 0
    the coarse scales carry no class, so the same classifier sits near chance (1/3) at 2.5x and 1.25x."""
    tiles, labels = tiles_by_evidence[1.0]
    for factor in (2, 4, 8):
        assert _cv_accuracy(tiles, labels, factor) >= 0.70, factor
    tiles, labels = tiles_by_evidence[0.0]
    for factor in (4, 8):
        assert _cv_accuracy(tiles, labels, factor) <= 0.47, factor


def test_purities_move_coarse_scales_from_chance_and_keep_chromatin():
    assert multiscale.purities(0.0)["architecture"] == pytest.approx(1 / 3)
    assert multiscale.purities(0.0)["cells"] == pytest.approx(1 / 3)
    assert multiscale.purities(0.0)["chromatin"] == multiscale.PURITY["chromatin"]
    assert multiscale.purities(1.0) == pytest.approx(multiscale.PURITY)
    half = multiscale.purities(0.5)["architecture"]
    assert half == pytest.approx((1 / 3 + multiscale.PURITY["architecture"]) / 2)
    with pytest.raises(ValueError, match="evidence"):
        multiscale.purities(1.5)


def test_patch_patterns_follow_the_region_class_at_the_stated_purity():
    """Counted over many patches: the share showing the region's class is the purity."""
    rng = np.random.default_rng(0)
    region = rng.integers(0, 3, 20000)
    for q in (1 / 3, 0.65, 0.8):
        pattern = multiscale._patterns(rng, region, q)
        assert np.mean(pattern == region) == pytest.approx(q, abs=0.015)
        wrong = pattern[pattern != region] - region[pattern != region]
        assert set(np.unique(wrong % 3)) == {1, 2}  # the other classes, both of them


def test_tiles_are_deterministic_per_seed():
    a = multiscale.render_tile(np.random.default_rng([3, 1]), 2, tile_px=64)
    b = multiscale.render_tile(np.random.default_rng([3, 1]), 2, tile_px=64)
    c = multiscale.render_tile(np.random.default_rng([3, 2]), 2, tile_px=64)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 5


def _nuclear_radii_um(mpp: float, pattern: int, monkeypatch) -> np.ndarray:
    """Equivalent radii (µm) of isolated dark blobs on a canvas whose cells all follow ``pattern``."""
    monkeypatch.setitem(multiscale.PURITY, "cells", 1.0)
    side_um = 256
    n = int(side_um / mpp)
    radii = []
    for seed in range(3):
        rgb, maps = multiscale.render_tissue(np.random.default_rng([5, seed]), shape=(n, n), mpp=mpp,
                                             class_at=lambda y, x: np.full(np.shape(y), pattern))
        assert (maps["cells"] == pattern).all()
        dark = rgb.mean(-1) < 150
        labelled, count = ndimage.label(dark)
        areas = ndimage.sum_labels(np.ones_like(dark), labelled, index=np.arange(1, count + 1)) * mpp ** 2
        radii.append(np.sqrt(areas / np.pi))
    return np.concatenate(radii)


@pytest.mark.parametrize("pattern", [0, 2])
def test_nuclei_have_their_stated_size_in_micrometres_at_any_resolution(pattern, monkeypatch):
    """The median blob radius matches NUCLEUS_RADIUS_UM (within 25%: blobs touch, edges blur) and does
    not depend on the µm/px the tissue is drawn at."""
    stated = multiscale.NUCLEUS_RADIUS_UM[pattern]
    at_1 = np.median(_nuclear_radii_um(1.0, pattern, monkeypatch))
    at_half = np.median(_nuclear_radii_um(0.5, pattern, monkeypatch))
    assert at_1 == pytest.approx(stated, rel=0.25)
    assert at_half == pytest.approx(at_1, rel=0.15)


def test_multiscale_tile_folder_and_slide_set_name_the_lung_patterns(tmp_path):
    meta = synthetic.write_tile_folder(tmp_path / "tiles", seed=0, tile_px=64, n_train=3, n_unlabeled=3, n_val=3,
                                       n_test=3, generator="multiscale", evidence=0.5)
    assert meta["params"]["class_names"] == list(multiscale.CLASS_NAMES)
    assert meta["params"]["evidence"] == 0.5
    assert sorted(p.name for p in (tmp_path / "tiles" / "train").iterdir()) == sorted(multiscale.CLASS_NAMES)
    with pytest.raises(ValueError, match="generator"):
        synthetic.write_tile_folder(tmp_path / "bad", seed=0, n_train=3, n_unlabeled=0, n_val=3, n_test=3,
                                    generator="gland")


@pytest.mark.slow
def test_slide_pyramid_levels_have_their_stated_micrometres_per_pixel(tmp_path):
    """OpenSlide reads the stated µm/px at level 0, each level's downsample, and level images that are
    the block means of level 0 (up to JPEG error)."""
    manifest = synthetic_slides.write_slide_set(tmp_path / "set", seed=1, n_per_class=1, n_unlabeled=1,
                                                splits={"test": 1.0}, tile_grid=(4, 4), tile_px=64, mpp=0.5,
                                                levels=(1, 4, 16), generator="multiscale", n_test_per_class=1)
    lines = manifest.read_text().splitlines()[1:]
    assert len(lines) == 3 * 2 + 1
    slide = openslide.OpenSlide(str(manifest.parent / lines[0].split(",")[0]))
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5, rel=1e-4)
    assert [round(d, 3) for d in slide.level_downsamples] == [1.0, 4.0, 16.0]
    level0 = np.asarray(slide.read_region((0, 0), 0, slide.level_dimensions[0]).convert("RGB"))
    for k, f in enumerate((4, 16)):
        level = np.asarray(slide.read_region((0, 0), k + 1, slide.level_dimensions[k + 1]).convert("RGB"))
        assert level.shape[:2] == (256 // f, 256 // f)
        assert np.abs(level - _block_mean(level0, f)).mean() < 4.0
