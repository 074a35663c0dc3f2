"""Whole-slide reading: resolution discovery, level choice, multi-resolution reads, tissue masks, tile grids.

References are independent of the module: raw OpenSlide reads, numpy block means,
brute-force Otsu and flood-fill labelling, pixel-sampled tissue fractions. The real
fixture (tests/data/README.md) is a 2220 x 2967 px Aperio SVS at 0.499 µm/px; its
tissue is a vertical band, with white glass at the left and right margins.
"""

from __future__ import annotations

import collections
import logging
import pathlib

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from histokd_jax.data import slides
from histokd_jax.units import resolution_to_mpp

FIXTURE = pathlib.Path(__file__).parent / "data" / "cmu_small_region.svs"
BASE_MPP = 0.499
# Regions as (x_from, x_to, y_from, y_to) fractions of the slide, picked by looking at its thumbnail.
TISSUE_BAND = (0.40, 0.65, 0.70, 0.95)
WHITE_MARGINS = [(0.0, 0.15, 0.45, 1.0), (0.88, 1.0, 0.5, 1.0), (0.75, 1.0, 0.0, 0.15)]


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    h, w, c = image.shape
    return image.reshape(h // factor, factor, w // factor, factor, c).astype(np.float64).mean(axis=(1, 3))


def raw_rgb(slide, x0: int, y0: int, size: int) -> np.ndarray:
    """Level-0 pixels straight from OpenSlide (tissue areas are opaque, so RGB is the pixel)."""
    return np.asarray(slide.read_region((x0, y0), 0, (size, size)).convert("RGB"))


def saturated_fraction(rgb: np.ndarray, level: int = 25) -> float:
    return float((np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1] > level).mean())


@pytest.fixture(scope="module")
def real():
    with slides.open_slide(FIXTURE) as slide:
        yield slide


@pytest.fixture(scope="module")
def real_mask(real):
    return slides.tissue_mask(real)


# ---------------------------------------------------------------- resolution


def test_real_slide_mpp_comes_from_openslide_and_override_wins(real):
    assert slides.slide_mpp(real) == slides.Resolution(pytest.approx(0.499), "openslide.mpp")
    assert slides.slide_mpp(real, override=0.25) == slides.Resolution(0.25, "override")
    with pytest.raises(ValueError, match="positive"):
        slides.slide_mpp(real, override=-1.0)


class FakeSlide:
    """Just what slide_mpp reads: a ``properties`` mapping."""

    def __init__(self, properties=None):
        self.properties = dict(properties or {})

    def __repr__(self):
        return "FakeSlide<test>"


MPP_XY = {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}
HEURISTIC = "objective-power (heuristic)"


def tiff_res(unit, per_unit):
    return {"tiff.ResolutionUnit": unit, "tiff.XResolution": str(per_unit), "tiff.YResolution": str(per_unit)}


@pytest.mark.parametrize(
    "props, mpp, source",
    [
        ({**MPP_XY, **tiff_res("centimeter", 1000), "openslide.objective-power": "20"}, 0.25, "openslide.mpp"),
        ({**tiff_res("centimeter", 40000), "openslide.objective-power": "20"}, 0.25, "tiff.resolution"),
        (tiff_res("inch", 50800), 0.5, "tiff.resolution"),
        ({**tiff_res("none", 1), "openslide.objective-power": "40"}, 0.25, HEURISTIC),
        # 72 dpi is a writer's default, not a microscope: skipped, the chain goes on.
        ({**tiff_res("inch", 72), "openslide.objective-power": "20"}, 0.5, HEURISTIC),
    ],
)
def test_mpp_fallback_chain(props, mpp, source, caplog):
    with caplog.at_level(logging.WARNING):
        found = slides.slide_mpp(FakeSlide(props))
    assert found.source == source
    assert found.mpp == pytest.approx(mpp)
    if source == HEURISTIC:
        assert "objective power" in caplog.text and "override" in caplog.text


def test_mpp_xy_disagreement_warns_and_averages(caplog):
    with caplog.at_level(logging.WARNING):
        found = slides.slide_mpp(FakeSlide({"openslide.mpp-x": "0.24", "openslide.mpp-y": "0.26"}))
    assert found.mpp == pytest.approx(0.25)
    assert "differ" in caplog.text


def test_mpp_missing_everywhere_asks_for_an_override():
    with pytest.raises(ValueError, match="override") as error:
        slides.slide_mpp(FakeSlide({"openslide.vendor": "generic-tiff", **tiff_res("none", 1)}))
    assert "FakeSlide<test>" in str(error.value)
    assert slides.slide_mpp(FakeSlide(), override=0.3) == slides.Resolution(0.3, "override")


def test_resolution_to_mpp():
    assert resolution_to_mpp("10x") == pytest.approx(1.0)
    assert resolution_to_mpp("1.25X") == pytest.approx(8.0)
    assert resolution_to_mpp(0.5) == 0.5
    assert resolution_to_mpp(" 0.5 ") == 0.5
    for bad in ("ten", "-1", "0x", "0"):
        with pytest.raises(ValueError):
            resolution_to_mpp(bad)


# ---------------------------------------------------------------- level choice


@pytest.mark.parametrize(
    "downsamples, wanted, level, factor",
    [
        ((1, 4.0002, 16.0036), 4, 1, 1.0),
        ((1, 4.0002, 16.0036), 8, 1, 2.0),
        ((1, 4.0002, 16.0036), 16.0036, 2, 1.0),
        ((1, 4.0002, 16.0036), 16, 2, 1.0),  # reported 16.0036 counts as 16
        ((1, 4.0002, 16.0036), 6, 1, 6 / 4.0002),  # not near an integer: kept as is
        ((1, 4.0002, 16.0036), 100, 2, 100 / 16.0036),
        ((1, 4.0002, 16.0036), 0.99, 0, 1.0),  # finer than level 0, but within tolerance
        ((1,), 3.998, 0, 4.0),  # near-integers snap
        ((1,), 1 / BASE_MPP, 0, 2.0),  # "10x" on a 0.499 µm/px slide is 2 level-0 px per px
    ],
)
def test_choose_level(downsamples, wanted, level, factor):
    got = slides.choose_level(downsamples, base_mpp=0.5, target_mpp=0.5 * wanted)
    assert got == (level, pytest.approx(factor))


def test_choose_level_refuses_upsampling():
    with pytest.raises(ValueError, match="finer"):
        slides.choose_level((1, 4, 16), base_mpp=0.5, target_mpp=0.25)


# ---------------------------------------------------------------- synthetic pyramid


SYN_MPP, SYN_W, SYN_H = 0.5, 768, 512


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Tiled deflate TIFF, levels at 1, 4, 16 as reduced pages; level-0 content: gradients and 64-px blocks."""
    yy, xx = np.mgrid[0:SYN_H, 0:SYN_W]
    blocks = ((xx // 64 + yy // 64) % 2) * 180 + 40
    level0 = np.stack([xx * 255 // SYN_W, yy * 255 // SYN_H, blocks], -1).astype(np.uint8)
    path = tmp_path_factory.mktemp("syn") / "pyramid.tif"
    with tifffile.TiffWriter(path) as writer:
        for i, ds in enumerate((1, 4, 16)):
            level = np.rint(block_mean(level0, ds)).astype(np.uint8)
            writer.write(level, tile=(16, 16), compression="deflate", photometric="rgb", subfiletype=1 if i else 0,
                         resolution=(1e4 / (SYN_MPP * ds),) * 2, resolutionunit="CENTIMETER")
    with slides.open_slide(path) as slide:
        yield slide, level0


def test_synthetic_pyramid_opens_and_reports_mpp(synthetic):
    slide, _ = synthetic
    assert slide.level_downsamples == pytest.approx((1, 4, 16))
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    # OpenSlide 4 converts generic-TIFF resolution tags itself (cm and inch), so the source is its mpp.
    assert slide.properties["tiff.ResolutionUnit"] == "centimeter"
    assert slides.slide_mpp(slide) == slides.Resolution(pytest.approx(SYN_MPP), "openslide.mpp")


@pytest.mark.parametrize("wanted, size, tol", [(8, 16, 1.0), (16, 8, 1.0), (6, 16, 1.5), (4, 32, 1.0)])
def test_synthetic_reads_match_block_means_of_level0(synthetic, wanted, size, tol):
    slide, level0 = synthetic
    x0, y0 = 96, 48  # multiples of the coarse levels' pixels
    got = slides.read_region_at(slide, x0=x0, y0=y0, size_px=size, base_mpp=SYN_MPP, target_mpp=SYN_MPP * wanted)
    assert got.shape == (size, size, 3) and got.dtype == np.uint8
    extent = size * wanted
    if wanted == 6:  # no integer block: average 3x3 blocks of a 2x nearest-upsampled region (exact area weights)
        region = np.repeat(np.repeat(level0[y0 : y0 + extent, x0 : x0 + extent], 2, 0), 2, 1)
        want = block_mean(region, 12)
    else:
        want = block_mean(level0[y0 : y0 + extent, x0 : x0 + extent], wanted)
    assert np.abs(got - want).max() <= tol


def test_outside_the_scanned_area_is_white(synthetic):
    slide, level0 = synthetic
    got = slides.read_region_at(slide, x0=SYN_W - 8, y0=0, size_px=16, base_mpp=SYN_MPP, target_mpp=SYN_MPP)
    assert (got[:, 8:] == 255).all()
    np.testing.assert_array_equal(got[:, :8], level0[:16, SYN_W - 8 :])


# ---------------------------------------------------------------- real slide reads


def test_real_reads_at_three_magnifications_see_the_same_tissue(real):
    width, height = real.dimensions
    x0, y0 = int(0.5 * width), int(0.8 * height)  # inside the tissue band
    at10, at5, at125 = (
        slides.read_region_at(real, x0=x0, y0=y0, size_px=size, base_mpp=BASE_MPP, target_mpp=resolution_to_mpp(mag))
        for mag, size in (("10x", 64), ("5x", 32), ("1.25x", 8))
    )
    assert (at10.shape, at5.shape, at125.shape) == ((64, 64, 3), (32, 32, 3), (8, 8, 3))
    assert saturated_fraction(at10) > 0.5  # really tissue, so the comparisons below mean something
    # 10x on 0.499 µm/px is 128 level-0 px (factor 2.004 snaps to 2): compare with OpenSlide's own pixels.
    raw = raw_rgb(real, x0, y0, 128)
    assert np.abs(at10 - block_mean(raw, 2)).max() <= 0.5 + 1e-9
    assert np.abs(at5.astype(float) - block_mean(at10, 2)).mean() < 2.0
    assert np.abs(at125.astype(float) - block_mean(at10, 8)).mean() < 2.0
    assert np.abs(at125 - block_mean(raw, 16)).max() <= 0.5 + 1e-9


def test_real_fractional_factor_is_an_area_average(real):
    x0, y0 = 1100, 2300
    got = slides.read_region_at(real, x0=x0, y0=y0, size_px=32, base_mpp=BASE_MPP, target_mpp=1.5 * BASE_MPP)
    region = np.repeat(np.repeat(raw_rgb(real, x0, y0, 48), 2, 0), 2, 1)  # 1.5 px -> 3 half-px: exact area weights
    assert np.abs(got - block_mean(region, 3)).max() <= 1.0


# ---------------------------------------------------------------- tissue mask and tiles


def region_fraction(mask, box):
    x_from, x_to, y_from, y_to = box
    h, w = mask.shape
    return mask[int(y_from * h) : int(y_to * h), int(x_from * w) : int(x_to * w)].mean()


def test_tissue_mask_finds_the_band_and_not_the_glass(real, real_mask):
    mask, mpp = real_mask
    assert mask.dtype == bool
    assert mpp == pytest.approx(8.0, rel=0.02)
    width, height = real.dimensions
    assert mask.shape == (int(height * BASE_MPP / mpp), int(width * BASE_MPP / mpp))
    assert region_fraction(mask, TISSUE_BAND) > 0.85
    for box in WHITE_MARGINS:
        assert region_fraction(mask, box) < 0.01, box
    assert 0.15 < mask.mean() < 0.6


def test_mask_preview_is_a_tinted_thumbnail(real, real_mask, tmp_path):
    mask, _ = real_mask
    path = tmp_path / "preview.png"
    slides.save_mask_preview(real, mask, path, max_side=400)
    preview = np.asarray(Image.open(path).convert("RGB")).astype(float)
    scale = 400 // max(mask.shape)
    assert preview.shape == (mask.shape[0] * scale, mask.shape[1] * scale, 3)
    big = np.repeat(np.repeat(mask, scale, 0), scale, 1)
    greenness = preview[..., 1] - preview[..., [0, 2]].mean(-1)
    assert greenness[big].mean() > greenness[~big].mean() + 20


def test_tile_grid_at_10x_covers_only_tissue(real, real_mask):
    mask, mpp = real_mask
    width, height = real.dimensions
    coords, fractions = slides.tile_grid(mask, mask_mpp=mpp, base_mpp=BASE_MPP, slide_dims=(width, height), tile_um=64)
    side = 64 / BASE_MPP  # 128.26 level-0 px; positions are floor(i * side)
    assert coords.dtype == np.int64 and coords.shape == (len(fractions), 2) and len(coords) > 50
    assert (coords >= 0).all() and (coords[:, 0] + side <= width).all() and (coords[:, 1] + side <= height).all()
    assert (fractions >= 0.5).all() and (fractions <= 1 + 1e-9).all()
    for axis in (0, 1):
        grid_index = coords[:, axis] / side
        np.testing.assert_array_equal(coords[:, axis], np.floor(np.rint(grid_index) * side))
        columns, index = np.unique(coords[:, axis]), np.unique(np.rint(grid_index))
        assert set(np.diff(columns)[np.diff(index) == 1]) == {128, 129}  # neighbouring grid lines
    for x0, y0 in coords:
        rgb = raw_rgb(real, int(x0), int(y0), 128)
        assert saturated_fraction(rgb) > 0.3 and rgb.mean() < 225, (x0, y0)


def test_tile_fractions_match_pixel_sampling(real_mask):
    mask, mpp = real_mask
    coords, fractions = slides.tile_grid(mask, mask_mpp=mpp, base_mpp=BASE_MPP, slide_dims=(2220, 2967), tile_um=64,
                                         min_tissue=0.0, overlap=0.5)
    side = 64 / BASE_MPP
    assert len(coords) == (int((2220 - side) / (side / 2)) + 1) * (int((2967 - side) / (side / 2)) + 1)
    assert set(np.diff(np.unique(coords[:, 0]))) == {64, 65}
    rng = np.random.default_rng(0)
    offsets = (np.arange(200) + 0.5) * side / 200
    for i in rng.choice(len(coords), 40, replace=False):
        xs = ((coords[i, 0] + offsets) * BASE_MPP / mpp).astype(int)
        ys = ((coords[i, 1] + offsets) * BASE_MPP / mpp).astype(int)
        inside = (ys[:, None] < mask.shape[0]) & (xs[None, :] < mask.shape[1])
        sampled = np.where(inside, mask[np.minimum(ys, mask.shape[0] - 1)][:, np.minimum(xs, mask.shape[1] - 1)], 0)
        assert fractions[i] == pytest.approx(sampled.mean(), abs=0.015)


def test_tile_grid_guards():
    mask = np.ones((10, 10), bool)
    with pytest.raises(ValueError, match="overlap"):
        slides.tile_grid(mask, mask_mpp=8, base_mpp=1, slide_dims=(80, 80), tile_um=16, overlap=1.0)
    coords, fractions = slides.tile_grid(mask, mask_mpp=8, base_mpp=1, slide_dims=(80, 80), tile_um=100)
    assert coords.shape == (0, 2) and fractions.shape == (0,)
    half = np.zeros((10, 10), bool)
    half[:, :5] = True  # left 40 level-0 px
    coords, fractions = slides.tile_grid(half, mask_mpp=8, base_mpp=1, slide_dims=(80, 80), tile_um=16, min_tissue=0.0)
    np.testing.assert_allclose(fractions, np.clip((40 - coords[:, 0]) / 16, 0.0, 1.0))  # x=32 is half in
    coords, fractions = slides.tile_grid(half, mask_mpp=8, base_mpp=1, slide_dims=(80, 80), tile_um=20, min_tissue=0.0)
    np.testing.assert_allclose(fractions[coords[:, 0] == 20], 1.0)
    np.testing.assert_allclose(fractions[coords[:, 0] == 40], 0.0)


# ---------------------------------------------------------------- algorithms


def _brute_force_otsu(values: np.ndarray) -> int:
    """The cut k minimising the within-class variance of ``values <= k`` and ``values > k``."""
    v = values.astype(float)

    def within(k):
        low, high = v[v <= k], v[v > k]
        return low.size * low.var() + high.size * high.var() if low.size and high.size else np.inf

    return min(range(255), key=within)


def _saturations(rng, *parts: tuple[float, float, int]) -> np.ndarray:
    return np.clip(np.concatenate([rng.normal(m, sd, n) for m, sd, n in parts]), 0, 255).astype(np.uint8)


def test_glass_threshold_keeps_pale_tissue_that_otsu_splits_off():
    # glass (sat ~2) covering half the thumbnail, pale tissue (~30) and dense tissue (~110)
    values = _saturations(np.random.default_rng(1), (2, 1, 50_000), (30, 6, 25_000), (110, 20, 25_000))
    otsu = _brute_force_otsu(values)
    assert 50 < otsu < 90  # Otsu cuts between the two tissues: the pale one would be lost
    t = slides.glass_threshold(values)
    glass, pale = values[:50_000], values[50_000:75_000]
    assert (glass > t).mean() < 0.001
    assert (pale > t).mean() > 0.99


def test_glass_threshold_on_two_classes_and_on_bare_glass():
    rng = np.random.default_rng(2)
    # glass and one tissue: the cut lies between them, never inside the tissue
    values = _saturations(rng, (3, 1.5, 60_000), (120, 25, 30_000))
    t = slides.glass_threshold(values)
    assert (values[:60_000] > t).mean() < 0.001 and (values[60_000:] > t).mean() > 0.995
    # glass whose colour noise reaches past the floor: the cut is at the foot of its peak, not inside it
    values = _saturations(rng, (10, 3, 60_000), (120, 25, 30_000))
    t = slides.glass_threshold(values)
    assert (values[:60_000] > t).mean() < 0.01 and (values[60_000:] > t).mean() > 0.995
    # bare glass with colour noise: the floor keeps it out; a constant histogram has no peak to cut
    noise = _saturations(rng, (3, 1.5, 100_000))
    assert slides.glass_threshold(noise) >= 8 and (noise > slides.glass_threshold(noise)).mean() < 0.001
    assert slides.glass_threshold(np.full(100, 5, np.uint8), min_saturation=8) == 8
    assert slides.glass_threshold(np.zeros(0, np.uint8)) == 8


def flood_fill_sizes(mask):
    """Component size per pixel, by a plain breadth-first search with 8-connectivity."""
    h, w = mask.shape
    size = np.zeros((h, w), int)
    seen = np.zeros((h, w), bool)
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], queue, members = True, collections.deque([start]), []
        while queue:
            y, x = queue.popleft()
            members.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        for member in members:
            size[member] = len(members)
    return size


@pytest.mark.parametrize("density", [0.3, 0.45, 0.6])
def test_remove_small_objects_matches_flood_fill(density):
    mask = np.random.default_rng(2).random((40, 50)) < density
    for min_px in (1, 3, 10):
        want = mask & (flood_fill_sizes(mask) >= min_px)
        np.testing.assert_array_equal(slides.remove_small_objects(mask, min_px), want)


# ---------------------------------------------------------------- opening


def test_open_slide_errors_name_the_file(tmp_path):
    missing = tmp_path / "nowhere.svs"
    with pytest.raises(FileNotFoundError, match="nowhere.svs"):
        slides.open_slide(missing)
    fake = tmp_path / "notes.svs"
    fake.write_text("not a slide\n")
    with pytest.raises(ValueError, match="notes.svs") as error:
        slides.open_slide(fake)
    assert "Unsupported" in str(error.value)
    assert isinstance(error.value.__cause__, openslide.OpenSlideError)
