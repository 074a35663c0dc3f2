"""Slides shaped like real scans: a 40x (0.25 µm/px) or 20x (0.5 µm/px) level 0 tens of thousands of
pixels across, 256 px JPEG tiles, and reduced levels built the way a scanner builds them.

A scanner does not block-average: it smooths with its own filter, resamples, and JPEG-compresses
every level again (from the already compressed level 0). ``Scanner`` states those choices: the
level-0 µm/px, the level downsamples (Aperio-like 1 / 4 / 16 / 32, or 2x steps 1 / 2 / 4 / 8), the
smoothing filter (PIL's Lanczos or bicubic, both antialiasing when they shrink), the JPEG quality
and YCbCr 4:2:0 chroma subsampling.

Drawing 1.6 gigapixels of ``multiscale`` tissue would take hours on 2 cores, so a slide is a mosaic
of a small *bank* of rendered tissue blocks (256 µm squares at 0.25 µm/px, ``per_class`` per
class, each placed in one of its 8 rotations/mirrors) on glass. Level 0's tiles are JPEG-encoded
once per (block, orientation) and their bytes reused; each reduced level is composed from every
block's own filtered copy (made once from the decoded level-0 block) and encoded tile by tile.
The block grid is shifted by half a block against the tile grid of a 10x reader, so a 256 µm tile
straddles four blocks. Tissue is a blob of whole blocks (smooth noise minus a radial fall-off);
a mixed slide has 3-5 Voronoi regions of random classes over the blocks, a labelled one a single
class; ``true_classes`` gives the class at any level-0 point.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from PIL import Image

from histokd_jax import atomic
from histokd_jax.data import multiscale, process_pool
from histokd_jax.data.render_ops import smooth_noise

__all__ = ["Scanner", "APERIO_40X", "APERIO_20X", "STEPS_40X", "tissue_bank", "write_scan", "true_classes",
           "BANK_MPP", "BLOCK_UM"]

BANK_MPP = 0.25  # the bank is drawn at 40x; a 20x scan is its filtered resample
BLOCK_UM = 256.0  # one bank block: 1024 px at 40x, 512 at 20x, 16 px at 16 µm/px
TILE = 256  # TIFF tile side at every level
_BANK_CODE, _LAYOUT_CODE, _GLASS_CODE = 11, 12, 13  # SeedSequence streams
_K = len(multiscale.CLASS_NAMES)


@dataclasses.dataclass(frozen=True)
class Scanner:
    """How a scanner writes its pyramid."""

    mpp: float  # level 0, µm/px
    downsamples: tuple[int, ...]
    resample: Image.Resampling = Image.Resampling.LANCZOS  # its smoothing filter
    quality: int = 80  # JPEG quality at every level
    subsampling: tuple[int, int] = (2, 2)  # YCbCr 4:2:0, as Aperio stores JPEG tiles

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.downsamples[level]


APERIO_40X = Scanner(mpp=0.25, downsamples=(1, 4, 16, 32))
APERIO_20X = Scanner(mpp=0.5, downsamples=(1, 4, 16, 32))
STEPS_40X = Scanner(mpp=0.25, downsamples=(1, 2, 4, 8), resample=Image.Resampling.BICUBIC, quality=85)


def _render_block(job: tuple[int, int, int]) -> np.ndarray:
    seed, cls, k = job
    rng = np.random.default_rng(np.random.SeedSequence([seed, _BANK_CODE, cls, k]))
    n = int(round(BLOCK_UM / BANK_MPP))
    rgb, _ = multiscale.render_tissue(rng, shape=(n, n), class_at=lambda y, x: np.full(np.shape(y), cls),
                                      mpp=BANK_MPP)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def tissue_bank(*, seed: int, per_class: int = 1, workers: int | None = None) -> np.ndarray:
    """uint8 (classes, per_class, 1024, 1024, 3): ``multiscale`` tissue blocks at 0.25 µm/px, one
    class per block (about 1.3 s per block on one core; ``workers`` processes draw them)."""
    jobs = [(int(seed), c, k) for c in range(_K) for k in range(int(per_class))]
    workers = workers if workers is not None else min(len(jobs), len(os.sched_getaffinity(0)))
    blocks = list(process_pool.map_in_order(_render_block, jobs, workers=workers))
    return np.stack(blocks).reshape(_K, int(per_class), *blocks[0].shape)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which bank block, in which orientation, fills each cell of the block grid (class -1: glass).
    Cell (i, j) covers level-0 µm [i * BLOCK_UM - offset_um, (i + 1) * BLOCK_UM - offset_um) in y
    (likewise x)."""

    classes: np.ndarray  # (rows, cols) int
    blocks: np.ndarray  # (rows, cols) index within the class's bank
    orient: np.ndarray  # (rows, cols) 0-7: rot90 k = orient % 4, then mirrored when orient >= 4
    offset_um: float

    def cell_of(self, y_um: np.ndarray, x_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = self.classes.shape
        i = np.clip(np.floor((np.asarray(y_um) + self.offset_um) / BLOCK_UM).astype(int), 0, rows - 1)
        j = np.clip(np.floor((np.asarray(x_um) + self.offset_um) / BLOCK_UM).astype(int), 0, cols - 1)
        return i, j


def make_layout(*, seed: int, size_um: float, label: int | None, per_class: int,
                background_fraction: float = 0.4) -> Layout:
    """The block grid of a slide ``size_um`` square: a tissue blob of whole blocks, classes, orientations."""
    offset = BLOCK_UM / 2
    n = int(math.ceil((size_um + offset) / BLOCK_UM))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _LAYOUT_CODE]))
    centre = (np.arange(n) + 0.5) / n * 2 - 1
    r2 = centre[:, None] ** 2 + centre[None, :] ** 2
    field = smooth_noise(rng, 1, n, 3)[0] + 0.6 * smooth_noise(rng, 1, n, 7)[0] - 0.8 * r2
    tissue = field > np.quantile(field, background_fraction)
    if label is None:
        k = int(rng.integers(3, 6))
        seeds = rng.random((k, 2)) * n
        region = rng.permutation(np.resize(np.arange(_K), k))
        yy, xx = np.mgrid[0:n, 0:n] + 0.5
        nearest = np.argmin((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, -1)
        classes = region[nearest]
    else:
        if not 0 <= int(label) < _K:
            raise ValueError(f"label must be None or in [0, {_K}), got {label}")
        classes = np.full((n, n), int(label))
    return Layout(classes=np.where(tissue, classes, -1), blocks=rng.integers(0, per_class, (n, n)),
                  orient=rng.integers(0, 8, (n, n)), offset_um=offset)


def true_classes(layout: Layout, *, x: np.ndarray, y: np.ndarray, mpp: float) -> np.ndarray:
    """The class (-1: glass) at level-0 points (x, y) of a slide with this layout and level-0 ``mpp``."""
    i, j = layout.cell_of(np.asarray(y, float) * mpp, np.asarray(x, float) * mpp)
    return layout.classes[i, j]


def _oriented(block: np.ndarray, orient: int) -> np.ndarray:
    out = np.rot90(block, orient % 4)
    return np.ascontiguousarray(out[:, ::-1] if orient >= 4 else out)


def _resize(image: np.ndarray, side: int, resample: Image.Resampling) -> np.ndarray:
    if image.shape[0] == side:
        return image
    return np.asarray(Image.fromarray(image).resize((side, side), resample))


class _Pyramid:
    """The blocks of one slide at each level, made once and reused: level 0 as JPEG bytes per tile
    (decoded back, since the scanner builds lower levels from what it stored) and the filtered copy
    of each decoded block at every reduced level."""

    def __init__(self, bank: np.ndarray, scanner: Scanner, glass: np.ndarray):
        self.bank, self.scanner, self.glass = bank, scanner, glass
        self.encode = functools.partial(imagecodecs.jpeg_encode, level=scanner.quality,
                                        subsampling=scanner.subsampling, colorspace="RGB", outcolorspace="YCBCR")
        self._level0: dict = {}
        self._levels: dict = {}

    def block_px(self, level: int) -> int:
        return int(round(BLOCK_UM / self.scanner.level_mpp(level)))

    def level0(self, cls: int, block: int, orient: int) -> tuple[list[bytes], np.ndarray]:
        """Level 0 of one placed block: its tiles' JPEG bytes (row-major) and the decoded block."""
        key = (cls, block, orient)
        if key not in self._level0:
            side = self.block_px(0)
            image = _resize(_oriented(self.bank[cls, block], orient), side, self.scanner.resample)
            n = side // TILE
            encoded = [self.encode(np.ascontiguousarray(image[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]))
                       for r in range(n) for c in range(n)]
            decoded = np.block([[[imagecodecs.jpeg_decode(encoded[r * n + c])] for c in range(n)] for r in range(n)])
            self._level0[key] = (encoded, decoded.reshape(side, side, 3))
        return self._level0[key]

    def at_level(self, cls: int, block: int, orient: int, level: int) -> np.ndarray:
        key = (cls, block, orient, level)
        if key not in self._levels:
            self._levels[key] = _resize(self.level0(cls, block, orient)[1], self.block_px(level), self.scanner.resample)
        return self._levels[key]


def _glass_tile(seed: int) -> np.ndarray:
    """Near-white glass with sensor noise (one 256 px tile, repeated)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _GLASS_CODE]))
    tint = rng.uniform(238.0, 248.0) + rng.uniform(-2.0, 2.0, 3)
    return np.clip(np.rint(tint + rng.normal(0.0, 1.2, (TILE, TILE, 3))), 0, 255).astype(np.uint8)


def _level0_tiles(pyramid: _Pyramid, layout: Layout, n_tiles: int) -> Iterator[bytes]:
    side = pyramid.block_px(0)
    per_block, off = side // TILE, int(round(layout.offset_um / pyramid.scanner.mpp))
    glass = pyramid.encode(pyramid.glass)
    for ty in range(n_tiles):
        i, r = divmod(ty * TILE + off, side)
        for tx in range(n_tiles):
            j, c = divmod(tx * TILE + off, side)
            cls = int(layout.classes[i, j]) if i < layout.classes.shape[0] and j < layout.classes.shape[1] else -1
            if cls < 0:
                yield glass
            else:
                encoded, _ = pyramid.level0(cls, int(layout.blocks[i, j]), int(layout.orient[i, j]))
                yield encoded[(r // TILE) * per_block + c // TILE]


def _band(pyramid: _Pyramid, layout: Layout, level: int, y0: int, width: int) -> np.ndarray:
    """Rows [y0, y0 + TILE) of a reduced level, ``width`` px wide (a whole number of tiles)."""
    side = pyramid.block_px(level)
    off = int(round(layout.offset_um / pyramid.scanner.level_mpp(level)))
    band = np.tile(pyramid.glass, (1, width // TILE, 1))
    for i in range((y0 + off) // side, (y0 + TILE - 1 + off) // side + 1):
        top = i * side - off
        r0, r1 = max(y0, top) - top, min(y0 + TILE, top + side) - top
        if r1 <= r0 or i >= layout.classes.shape[0]:
            continue
        for j in range(min(layout.classes.shape[1], (width + off - 1) // side + 1)):
            cls = int(layout.classes[i, j])
            if cls < 0:
                continue
            left = j * side - off
            c0, c1 = max(0, left) - left, min(width, left + side) - left
            block = pyramid.at_level(cls, int(layout.blocks[i, j]), int(layout.orient[i, j]), level)
            band[top + r0 - y0:top + r1 - y0, left + c0:left + c1] = block[r0:r1, c0:c1]
    return band


def _reduced_tiles(pyramid: _Pyramid, layout: Layout, level: int, n_tiles: int) -> Iterator[bytes]:
    glass = pyramid.encode(pyramid.glass)
    for ty in range(n_tiles):
        band = _band(pyramid, layout, level, ty * TILE, n_tiles * TILE)
        for tx in range(n_tiles):
            tile = band[:, tx * TILE:(tx + 1) * TILE]
            yield glass if np.array_equal(tile, pyramid.glass) else pyramid.encode(np.ascontiguousarray(tile))


def write_scan(path: str | os.PathLike, *, scanner: Scanner = APERIO_40X, seed: int = 0, size_um: float = 10240.0,
               label: int | None = None, bank: np.ndarray | None = None, per_class: int = 1,
               background_fraction: float = 0.4) -> dict:
    """Write a scan-like pyramidal TIFF of a ``size_um`` square of tissue and glass; return what was
    written (``layout`` gives the ground truth through ``true_classes``). ``bank``: blocks from
    ``tissue_bank`` (drawn here from ``seed`` when not given; share one across slides to save
    the drawing). The default, 10.24 mm at 40x, is 40960 px square."""
    top = scanner.mpp * max(scanner.downsamples)
    if size_um <= 0 or abs(size_um / top - round(size_um / top)) > 1e-9:
        raise ValueError(f"size_um must be a positive multiple of {top:g} µm (a whole number of pixels at "
                         f"every level), got {size_um}")
    if list(scanner.downsamples) != sorted(set(scanner.downsamples)) or scanner.downsamples[0] != 1:
        raise ValueError(f"downsamples must start at 1 and increase, got {scanner.downsamples}")
    if bank is None:
        bank = tissue_bank(seed=seed, per_class=per_class)
    layout = make_layout(seed=seed, size_um=size_um, label=label, per_class=bank.shape[1],
                         background_fraction=background_fraction)
    pyramid = _Pyramid(bank, scanner, _glass_tile(seed))
    side0 = int(round(size_um / scanner.mpp))
    description = json.dumps({"generator": "histokd_jax.scanner_slides", "seed": int(seed), "mpp": scanner.mpp})
    with atomic.atomic_open(Path(path), "wb") as handle, tifffile.TiffWriter(handle, bigtiff=True) as tif:
        for level, ds in enumerate(scanner.downsamples):
            side = side0 // ds
            n_tiles = -(-side // TILE)  # the last column and row of tiles may be partly outside
            tiles = (_level0_tiles(pyramid, layout, n_tiles) if level == 0
                     else _reduced_tiles(pyramid, layout, level, n_tiles))
            res = 1e4 / scanner.level_mpp(level)  # pixels per centimetre
            tif.write(tiles, shape=(side, side, 3), dtype=np.uint8, photometric="rgb", tile=(TILE, TILE),
                      compression="jpeg", compressionargs={"level": scanner.quality},
                      subsampling=scanner.subsampling, subfiletype=1 if level else 0, resolution=(res, res),
                      resolutionunit="CENTIMETER", metadata=None, description=None if level else description)
    return {"path": str(path), "mpp": scanner.mpp, "downsamples": list(scanner.downsamples),
            "level_dimensions": [(side0 // d, side0 // d) for d in scanner.downsamples], "layout": layout,
            "label": label, "seed": int(seed)}
