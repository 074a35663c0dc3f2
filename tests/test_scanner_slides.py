"""Scan-like slides: OpenSlide sees a scanner's pyramid (µm/px, downsamples), level 0 holds the bank's
blocks where the layout puts them, and reduced levels are the scanner's filter of level 0, not a block mean."""

import numpy as np
import openslide
import pytest
from PIL import Image

from histokd_jax.data import scanner_slides as ss
from histokd_jax.data.views import area_downsample

SIZE_UM = 2048.0  # 8192 px at 40x: small enough for a test, every level whole


@pytest.fixture(scope="module")
def bank():
    return ss.tissue_bank(seed=3, workers=1)


@pytest.fixture(scope="module")
def scan(bank, tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "a40.tiff"
    return ss.write_scan(path, scanner=ss.APERIO_40X, seed=5, size_um=SIZE_UM, bank=bank, background_fraction=0.3)


def _rgb(region) -> np.ndarray:
    return np.asarray(region.convert("RGB")).astype(np.float64)


@pytest.mark.parametrize("scanner", [ss.APERIO_40X, ss.APERIO_20X, ss.STEPS_40X])
def test_openslide_sees_the_scanners_pyramid(scanner, bank, tmp_path):
    ss.write_scan(tmp_path / "s.tiff", scanner=scanner, seed=1, size_um=SIZE_UM, bank=bank)
    with openslide.OpenSlide(tmp_path / "s.tiff") as slide:
        side = int(SIZE_UM / scanner.mpp)
        assert slide.dimensions == (side, side)
        assert slide.level_downsamples == pytest.approx([float(d) for d in scanner.downsamples])
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(scanner.mpp)
        assert int(slide.properties["openslide.level[0].tile-width"]) == ss.TILE


def test_level0_holds_the_bank_block_the_layout_names(scan, bank):
    layout = scan["layout"]
    n = int(ss.BLOCK_UM / 0.25)
    off = int(layout.offset_um / 0.25)
    tissue = np.argwhere(layout.classes[1:-1, 1:-1] >= 0) + 1  # cells wholly inside the slide
    assert len(tissue) >= 4
    with openslide.OpenSlide(scan["path"]) as slide:
        for i, j in tissue[:4]:
            got = _rgb(slide.read_region((int(j * n - off), int(i * n - off)), 0, (n, n)))
            block = bank[layout.classes[i, j], layout.blocks[i, j]]
            errors = [np.abs(got - ss._oriented(block, o)).mean() for o in range(8)]
            assert int(np.argmin(errors)) == layout.orient[i, j]
            assert errors[layout.orient[i, j]] < 3.0  # JPEG q80, 4:2:0
            # and ground truth names that class at the cell's centre
            assert ss.true_classes(layout, x=np.array([j * n - off + n / 2]), y=np.array([i * n - off + n / 2]),
                                   mpp=0.25)[0] == layout.classes[i, j]


def test_glass_cells_read_as_glass(scan):
    layout = scan["layout"]
    glass = np.argwhere(layout.classes[1:-1, 1:-1] < 0) + 1
    assert len(glass)
    n, off = int(ss.BLOCK_UM / 0.25), int(layout.offset_um / 0.25)
    i, j = glass[0]
    with openslide.OpenSlide(scan["path"]) as slide:
        got = _rgb(slide.read_region((int(j * n - off), int(i * n - off)), 0, (n, n)))
    assert got.min() > 220 and got.mean() > 235


def _level1_against_level0(path) -> tuple[np.ndarray, np.ndarray]:
    with openslide.OpenSlide(path) as slide:
        x = y = 2048  # level-0 px; 1024 px square -> 256 at level 1 (downsample 4); margin for the filter
        level0 = np.asarray(slide.read_region((x, y), 0, (1024 + 64, 1024 + 64)).convert("RGB"))
        level1 = _rgb(slide.read_region((x, y), 1, (256, 256)))
    return level0, level1


def test_reduced_levels_are_the_scanners_filter_not_a_block_mean(bank, tmp_path):
    # near-lossless JPEG, so the filter shows through the second compression
    exact = ss.Scanner(mpp=0.25, downsamples=(1, 4, 16, 32), quality=100, subsampling=(1, 1))
    ss.write_scan(tmp_path / "q100.tiff", scanner=exact, seed=5, size_um=SIZE_UM, bank=bank, background_fraction=0.3)
    level0, level1 = _level1_against_level0(tmp_path / "q100.tiff")
    lanczos = np.asarray(Image.fromarray(level0).resize((272, 272), Image.Resampling.LANCZOS), np.float64)[:256, :256]
    block_mean = area_downsample(level0, 4)[:256, :256].astype(np.float64)
    to_lanczos, to_mean = np.abs(level1 - lanczos).mean(), np.abs(level1 - block_mean).mean()
    assert to_lanczos < 1.0
    assert to_mean > 1.5 * to_lanczos  # measured 0.97 against 0.50


def test_reduced_levels_are_compressed_again(scan, bank, tmp_path):
    """At the default quality 80 with 4:2:0 chroma, level 1 departs from the filtered level 0 by the
    second JPEG's error, several times the near-lossless one."""
    level0, level1 = _level1_against_level0(scan["path"])
    lanczos = np.asarray(Image.fromarray(level0).resize((272, 272), Image.Resampling.LANCZOS), np.float64)[:256, :256]
    assert 2.0 < np.abs(level1 - lanczos).mean() < 8.0


def test_bad_sizes_are_refused(bank, tmp_path):
    with pytest.raises(ValueError, match="multiple of 8"):
        ss.write_scan(tmp_path / "x.tiff", size_um=1001.0, bank=bank)
    with pytest.raises(ValueError, match="label"):
        ss.write_scan(tmp_path / "x.tiff", size_um=SIZE_UM, bank=bank, label=7)
    assert not (tmp_path / "x.tiff").exists()


@pytest.mark.parametrize("scanner", [ss.APERIO_40X, ss.STEPS_40X])
def test_tissue_mask_keeps_pale_lepidic_tissue_and_no_glass(scanner, bank, tmp_path):
    """All-lepidic scans (the palest class): the mask must keep the tiles lying wholly in tissue and
    none lying wholly on glass (the ground truth is the layout). Otsu on saturation kept 185 of 999
    tissue tiles of a mixed 40x scan, most of the lepidic ones lost."""
    from histokd_jax.data import slides

    info = ss.write_scan(tmp_path / "lepidic.tiff", scanner=scanner, seed=2, size_um=SIZE_UM, bank=bank, label=0)
    with slides.open_slide(tmp_path / "lepidic.tiff") as slide:
        mask, mask_mpp = slides.tissue_mask(slide, base_mpp=scanner.mpp)
        coords, _ = slides.tile_grid(mask, mask_mpp=mask_mpp, base_mpp=scanner.mpp, slide_dims=slide.dimensions,
                                     tile_um=128.0, min_tissue=0.5)
    side = int(128.0 / scanner.mpp)
    grid = np.arange(0, int(SIZE_UM / scanner.mpp) - side + 1, side)
    xs, ys = (a.ravel() for a in np.meshgrid(grid, grid))
    corners = [(xs + dx, ys + dy) for dx in (2, side - 2) for dy in (2, side - 2)]
    classes = np.stack([ss.true_classes(info["layout"], x=x, y=y, mpp=scanner.mpp) for x, y in corners])
    tissue, glass = (classes >= 0).all(0), (classes < 0).all(0)
    kept = {(int(x), int(y)) for x, y in coords}
    kept_tissue = np.array([(int(x), int(y)) in kept for x, y in zip(xs[tissue], ys[tissue])])
    kept_glass = [(int(x), int(y)) in kept for x, y in zip(xs[glass], ys[glass])]
    assert tissue.sum() > 50 and glass.sum() > 20
    assert kept_tissue.mean() >= 0.95, f"{kept_tissue.sum()} of {tissue.sum()} lepidic tiles kept"
    assert not any(kept_glass)
