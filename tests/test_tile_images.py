"""Folder tiles: every supported mode becomes the uint8 RGB an independent numpy computation gives,
others are refused naming the file, and bad tiles are found when the folder is scanned."""

from __future__ import annotations

import pathlib

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image

from histokd_jax.data import sources, tile_images
from histokd_jax.data import splits as splits_lib
from tests.tiny import tiny_config

RNG = np.random.default_rng(0)


def scale16(a: np.ndarray) -> np.ndarray:
    """16 -> 8 bits by 255/65535 with rounding (0 -> 0, 65535 -> 255, 257 * v -> v)."""
    return np.floor(a.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)


def on_white(colour: np.ndarray, alpha: np.ndarray, top: float = 255.0) -> np.ndarray:
    c, a = colour.astype(np.float64) / top, alpha.astype(np.float64)[..., None] / top
    return np.floor((c * a + 1 - a) * 255 + 0.5).astype(np.uint8)


def gray3(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[..., None], 3, axis=-1)


def edge_values16(shape) -> np.ndarray:
    a = RNG.integers(0, 65536, shape, dtype=np.uint16)
    a.flat[:4] = (0, 65535, 128, 257 * 200 + 128)  # the ends, and values where clipping or truncating differ
    return a


def test_16_bit_grayscale_png_and_big_endian_tiff_are_scaled_not_clipped(tmp_path):
    gray = edge_values16((20, 24))
    Image.fromarray(gray).save(tmp_path / "g16.png")  # PIL: I;16
    big = Image.frombytes("I;16B", (24, 20), gray.astype(">u2").tobytes())
    big.save(tmp_path / "g16b.tif")
    assert Image.open(tmp_path / "g16.png").mode == "I;16" and Image.open(tmp_path / "g16b.tif").mode == "I;16B"
    for name in ("g16.png", "g16b.tif"):
        got = tile_images.load_rgb(str(tmp_path / name))
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, gray3(scale16(gray)))


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_48_bit_rgb_tiff_is_scaled_from_all_16_bits(tmp_path, planar):
    rgb = edge_values16((20, 24, 3))
    data = rgb if planar == "contig" else np.moveaxis(rgb, -1, 0)
    tifffile.imwrite(tmp_path / "rgb48.tif", data, photometric="rgb", planarconfig=planar)
    np.testing.assert_array_equal(tile_images.load_rgb(str(tmp_path / "rgb48.tif")), scale16(rgb))


def test_16_bit_rgb_and_rgba_png_are_scaled_from_all_16_bits(tmp_path):
    rgba = edge_values16((20, 24, 4))
    (tmp_path / "rgb.png").write_bytes(imagecodecs.png_encode(np.ascontiguousarray(rgba[..., :3])))
    (tmp_path / "rgba.png").write_bytes(imagecodecs.png_encode(rgba))
    np.testing.assert_array_equal(tile_images.load_rgb(str(tmp_path / "rgb.png")), scale16(rgba[..., :3]))
    np.testing.assert_array_equal(tile_images.load_rgb(str(tmp_path / "rgba.png")),
                                  on_white(rgba[..., :3], rgba[..., 3], top=65535.0))


def test_palette_tiles_with_and_without_transparency(tmp_path):
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    index[0, :4] = 0
    image = Image.fromarray(index, "P")
    image.putpalette(palette.ravel().tolist())
    image.save(tmp_path / "p.png")
    image.save(tmp_path / "p_trns.png", transparency=0)  # index 0 fully transparent
    np.testing.assert_array_equal(tile_images.load_rgb(str(tmp_path / "p.png")), palette[index])
    want = np.where((index == 0)[..., None], 255, palette[index]).astype(np.uint8)
    np.testing.assert_array_equal(tile_images.load_rgb(str(tmp_path / "p_trns.png")), want)


def test_grayscale_with_and_without_alpha(tmp_path):
    gray = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    Image.fromarray(np.stack([gray, alpha], -1), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(tile_images.load_rgb(str(tmp_path / "l.png")), gray3(gray))
    np.testing.assert_array_equal(tile_images.load_rgb(str(tmp_path / "la.png")), on_white(gray3(gray), alpha))


def test_cmyk_is_converted_by_the_subtractive_formula(tmp_path):
    cmyk = RNG.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    c, k = cmyk[..., :3].astype(np.float64) / 255, cmyk[..., 3:].astype(np.float64) / 255
    want = 255 * (1 - c) * (1 - k)
    got = tile_images.load_rgb(str(tmp_path / "cmyk.tif")).astype(np.float64)
    assert np.abs(got - want).max() <= 1.0  # PIL's integer arithmetic rounds within one level


@pytest.mark.parametrize("kind", ["float", "int32", "cmyk16"])
def test_modes_that_cannot_become_rgb_are_refused_naming_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.tif"
    if kind == "float":
        Image.fromarray(RNG.random((16, 16)).astype(np.float32), "F").save(path)
    elif kind == "int32":
        Image.fromarray(RNG.integers(0, 2**20, (16, 16)).astype(np.int32), "I").save(path)
    else:
        tifffile.imwrite(path, edge_values16((16, 16, 4)), photometric="separated")
    with pytest.raises(OSError, match=f"{kind}.tif.*cannot be converted"):
        tile_images.load_rgb(str(path))
    with pytest.raises(ValueError, match=f"{kind}.tif.*cannot be converted"):
        tile_images.check_tiles([str(path)], min_px=None, what="a test")


def tile_folder(root: pathlib.Path, sizes: dict[str, int]) -> None:
    """root/<split>/a/<name>.png of the given sizes, RGB."""
    for name, px in sizes.items():
        split, stem = name.split("/")
        (root / split / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(RNG.integers(0, 256, (px, px, 3), dtype=np.uint8)).save(root / split / "a" / f"{stem}.png")


def test_tiles_smaller_than_the_teacher_crop_are_an_error_at_scan_time(tmp_path):
    tile_folder(tmp_path, {"train/ok": 64, "train/small1": 48, "train/small2": 32, "train/big": 80})
    with pytest.raises(ValueError) as err:
        sources.scan_split(tmp_path, "train", class_names=("a",), min_px=64)
    message = str(err.value)
    assert str(tmp_path / "train" / "a" / "small1.png") in message and "48x48" in message
    assert "1 other bad tile" in message and "small2.png" in message and "'train' split" in message
    assert len(sources.scan_split(tmp_path, "train", class_names=("a",), min_px=32)) == 4


def test_a_tile_the_sample_missed_still_fails_with_its_name(tmp_path):
    tile_folder(tmp_path, {f"train/t{i}": 64 for i in range(5)} | {"train/t2": 40})
    paths = [str(p) for p in sorted((tmp_path / "train" / "a").iterdir())]
    tile_images.check_tiles(paths, min_px=64, what="a test", max_checked=2)  # checks t0 and t4 only
    with pytest.raises(ValueError, match="t2.png is 40x40 px, smaller than the teacher crop"):
        tile_images.check_tiles(paths, min_px=64, what="a test", max_checked=5)
    source = sources.TileSource([sources.TileRecord(p, 0) for p in paths], min_px=64)
    assert source[0]["image"].shape == (64, 64, 3)
    with pytest.raises(OSError, match="t2.png is 40x40 px"):  # a bad file: evaluation drops it, naming it
        source[2]


def folder_config(root: pathlib.Path):
    config = tiny_config(str(root))
    config.data.kind, config.data.use_unlabeled = "folder", False
    return config


def test_load_splits_checks_folder_tiles_against_data_teacher_px(tmp_path):
    config = folder_config(tmp_path)
    tile_folder(tmp_path, {"train/x": 64, "val/x": 64, "test/x": 64, "test/tiny": config.data.teacher_px - 1})
    with pytest.raises(ValueError, match=r"tiny\.png is 63x63 px, smaller than the teacher crop.*'test' split"):
        splits_lib.load_splits(config.data, workdir=tmp_path / "work")
    (tmp_path / "test" / "a" / "tiny.png").unlink()
    assert splits_lib.load_splits(config.data, workdir=tmp_path / "work").counts["test"] == 1


def test_an_empty_split_is_an_error_naming_it(tmp_path):
    config = folder_config(tmp_path)
    tile_folder(tmp_path, {"train/x": 64, "test/x": 64})
    (tmp_path / "val" / "a").mkdir(parents=True)  # the class folder is there, with no tile in it
    with pytest.raises(FileNotFoundError, match="the 'val' split is empty"):
        splits_lib.load_splits(config.data, workdir=tmp_path / "work")
    # any data kind (TFDS, slides): a split without records stops before training, not at np.concatenate([])
    empty = splits_lib.DataSplits(class_names=("a",), train=[1], pool=[1], val=[], test=[1], root=tmp_path,
                                  counts={})
    with pytest.raises(ValueError, match=r"\['val'\].*no records"):
        splits_lib.check_not_empty(empty)


def test_composite_on_white_of_opaque_and_partly_transparent_regions():
    """OpenSlide's RGBA reads: an opaque region keeps its colour exactly, one with transparent pixels
    (unscanned areas) is blended onto white pixel by pixel, whichever path the function takes."""
    colour = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for alpha in (np.full((8, 8), 255, np.uint8), RNG.integers(0, 256, (8, 8), dtype=np.uint8),
                  np.where(RNG.random((8, 8)) < 0.1, 0, 255).astype(np.uint8)):
        out = tile_images.composite_on_white(np.dstack([colour, alpha]))
        assert out.dtype == np.uint8 and out.flags.c_contiguous
        assert np.abs(out.astype(int) - on_white(colour, alpha).astype(int)).max() <= 1  # rint vs half up
    opaque = tile_images.composite_on_white(np.dstack([colour, np.full((8, 8), 255, np.uint8)]))
    np.testing.assert_array_equal(opaque, colour)
