"""Whole-slide images: resolution, multi-resolution reads, tissue detection and tile grids.

Conventions: µm/px is canonical (magnification strings are converted with the
``units`` heuristic); coordinates are level-0 pixels of a tile's top-left
corner, as in OpenSlide's ``read_region``. A read picks the coarsest pyramid
level at or finer than the wanted resolution and area-resizes the rest, so a
student view at 1.25x integrates the same light as a block mean of the 10x view.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence

import numpy as np
import openslide
from PIL import Image
from scipy import ndimage
from skimage import filters

from histokd_jax.data.tile_images import composite_on_white
from histokd_jax.data.views import area_downsample
from histokd_jax.units import magnification_to_mpp

log = logging.getLogger(__name__)

# A resolution outside this range is a default DPI (72 dpi -> 353 µm/px), not a scanner's.
PLAUSIBLE_MPP = (0.02, 50.0)
_UM_PER_UNIT = {"centimeter": 1e4, "inch": 25400.0}


@dataclasses.dataclass(frozen=True)
class Resolution:
    """A slide's level-0 µm/px and where it came from (the heuristic source deserves suspicion)."""

    mpp: float
    source: str  # "override" | "openslide.mpp" | "tiff.resolution" | "objective-power (heuristic)"


def _mean_of(props, keys: tuple[str, str], convert=float) -> float | None:
    """Mean of the x/y values that are present; warns when they disagree (non-square pixels)."""
    values = [convert(props[k]) for k in keys if k in props]
    if not values:
        return None
    if len(values) == 2 and abs(values[0] - values[1]) > 0.01 * max(values):
        log.warning("%s=%s and %s=%s differ by more than 1%%; using their mean", keys[0], values[0], keys[1], values[1])
    return sum(values) / len(values)


def _plausible(mpp: float | None, source: str, name: str) -> float | None:
    if mpp is None or not math.isfinite(mpp):
        return None
    if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        return mpp
    log.warning("%s: ignoring %s = %.4g µm/px (implausible for a microscope; a default DPI?)", name, source, mpp)
    return None


def slide_name(slide) -> str:
    """The file an OpenSlide handle reads, as a plain path for messages (``repr`` gives
    ``OpenSlide(PosixPath('...'))``); other slide-like objects fall back to their repr."""
    filename = getattr(slide, "_filename", None)  # set by openslide.OpenSlide.__init__
    return os.fspath(filename) if filename is not None else repr(slide)


def slide_mpp(slide, *, override: float | None = None) -> Resolution:
    """Level-0 µm/px: override, then OpenSlide's mpp, TIFF resolution tags, objective power (heuristic).

    OpenSlide 4 already turns generic TIFF resolution tags (centimeter or inch)
    into ``openslide.mpp-*``; the ``tiff.*`` step serves slides where it did not.
    """
    if override is not None:
        if not (override > 0 and math.isfinite(override)):
            raise ValueError(f"mpp override must be a positive number, got {override!r}")
        return Resolution(float(override), "override")
    props, name = slide.properties, slide_name(slide)
    mpp = _plausible(_mean_of(props, ("openslide.mpp-x", "openslide.mpp-y")), "openslide.mpp", name)
    if mpp is not None:
        return Resolution(mpp, "openslide.mpp")
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    if unit in _UM_PER_UNIT:  # tags are pixels per unit
        per_unit = _mean_of(props, ("tiff.XResolution", "tiff.YResolution"))
        mpp = _plausible(_UM_PER_UNIT[unit] / per_unit if per_unit else None, "tiff.resolution", name)
        if mpp is not None:
            return Resolution(mpp, "tiff.resolution")
    power = props.get("openslide.objective-power")
    if power is not None and float(power) > 0:
        mpp = magnification_to_mpp(float(power))
        log.warning("%s: no µm/px recorded; assuming %.4g from objective power %s (mpp = 10/power, "
                    "often off by ~10%%; pass an mpp override if you know better)", name, mpp, power)
        return Resolution(mpp, "objective-power (heuristic)")
    raise ValueError(f"{name}: cannot find the slide's resolution (no openslide.mpp-x/y, TIFF resolution "
                     "or objective power); give an mpp override (µm per level-0 pixel)")


def choose_level(
    level_downsamples: Sequence[float], *, base_mpp: float, target_mpp: float, rel_tol: float = 0.02
) -> tuple[int, float]:
    """(level, remaining factor): the coarsest level at or finer than the target, then what is left.

    Scanners report downsamples like 16.0036; within ``rel_tol`` a level counts as
    matching and the remaining factor snaps to the nearest integer, so reads stay
    exact block means instead of slightly-off resamplings.
    """
    wanted = target_mpp / base_mpp  # level-0 pixels per output pixel
    if wanted < 1 - rel_tol:
        raise ValueError(f"target {target_mpp:.4g} µm/px is finer than the slide's level 0 ({base_mpp:.4g} µm/px); "
                         "upsampling is not supported")
    usable = [(ds, i) for i, ds in enumerate(level_downsamples) if ds <= wanted * (1 + rel_tol)]
    downsample, level = max(usable)
    factor = wanted / downsample
    if abs(factor - round(factor)) <= rel_tol * factor:
        factor = float(round(factor))
    return level, max(factor, 1.0)


def _rgb(region: Image.Image) -> np.ndarray:
    """RGBA from OpenSlide (alpha 0 outside scanned areas) composited onto white, as uint8 RGB."""
    return composite_on_white(np.asarray(region.convert("RGBA")))


def _area_resize_axis(image: np.ndarray, out_n: int, factor: float, axis: int) -> np.ndarray:
    """Exact area means along one axis: output i averages input span [i * factor, (i + 1) * factor).

    Input pixels are unit boxes; a cumulative sum, linear inside each pixel, gives the
    integral up to any fractional edge. (PIL's BOX filter is not this: at non-integer
    scales it weights each input pixel 0 or 1 by where its centre falls.)
    """
    moved = np.moveaxis(image, axis, 0).astype(np.float64)
    cumulative = np.concatenate([np.zeros_like(moved[:1]), np.cumsum(moved, 0)])
    edges = np.arange(out_n + 1) * factor
    k = np.minimum(np.floor(edges).astype(int), moved.shape[0] - 1)
    frac = (edges - k).reshape(-1, *[1] * (moved.ndim - 1))
    integral = cumulative[k] + frac * moved[k]
    return np.moveaxis((integral[1:] - integral[:-1]) / factor, 0, axis)


def _read_resized(slide, level: int, factor: float, *, x0: int, y0: int, out_w: int, out_h: int) -> np.ndarray:
    """Read the level px covering (out_w * factor, out_h * factor) and area-resize them to (out_w, out_h)."""
    if factor.is_integer():
        f = int(factor)
        return area_downsample(_rgb(slide.read_region((x0, y0), level, (out_w * f, out_h * f))), f)
    size = (math.ceil(out_w * factor - 1e-6), math.ceil(out_h * factor - 1e-6))
    region = _rgb(slide.read_region((x0, y0), level, size))
    resized = _area_resize_axis(_area_resize_axis(region, out_h, factor, 0), out_w, factor, 1)
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def read_level_region(slide, level: int, factor: float, *, x0: int, y0: int, out_w: int, out_h: int) -> np.ndarray:
    """uint8 RGB (out_h, out_w, 3): the level-0 rectangle at (x0, y0) read from ``level`` and area-resized by
    ``factor`` (from ``choose_level``): whole strips of tiles in one read, for inference."""
    return _read_resized(slide, level, factor, x0=int(x0), y0=int(y0), out_w=out_w, out_h=out_h)


def read_region_at(slide, *, x0: int, y0: int, size_px: int, base_mpp: float, target_mpp: float) -> np.ndarray:
    """uint8 RGB (size_px, size_px, 3) at ``target_mpp`` of the square whose top-left is level-0 (x0, y0)."""
    level, factor = choose_level(slide.level_downsamples, base_mpp=base_mpp, target_mpp=target_mpp)
    return _read_resized(slide, level, factor, x0=int(x0), y0=int(y0), out_w=size_px, out_h=size_px)


def _thumbnail_level(slide, *, base_mpp: float, target_mpp: float) -> tuple[int, float, float]:
    """(level, integer factor after it, the µm/px they give) of ``read_thumbnail``."""
    level, factor = choose_level(slide.level_downsamples, base_mpp=base_mpp, target_mpp=max(target_mpp, base_mpp))
    factor = float(max(1, round(factor)))
    return level, factor, base_mpp * slide.level_downsamples[level] * factor


def thumbnail_mpp(slide, *, base_mpp: float, target_mpp: float) -> float:
    """The µm/px ``read_thumbnail`` obtains for ``target_mpp``."""
    return _thumbnail_level(slide, base_mpp=base_mpp, target_mpp=target_mpp)[2]


def read_thumbnail(slide, *, base_mpp: float, target_mpp: float,
                   max_pixels: int = 1 << 24) -> tuple[np.ndarray, float]:
    """The whole slide as uint8 RGB at about ``target_mpp``, and its exact µm/px.

    The factor after the chosen level is rounded to an integer (a cheap exact block
    mean even for a large level); the returned µm/px is the one really obtained.
    It is read in bands of at most ``max_pixels`` level pixels: bounded memory on any slide.
    """
    level, factor, mpp = _thumbnail_level(slide, base_mpp=base_mpp, target_mpp=target_mpp)
    width, height = slide.dimensions
    out_w, out_h = max(1, int(width * base_mpp / mpp)), max(1, int(height * base_mpp / mpp))
    # in bands of output rows, so a single-level slide is never held whole at level 0
    rows = max(1, int(max_pixels // (out_w * factor * factor)))
    step = rows * factor * slide.level_downsamples[level]  # level-0 px per band
    bands = [_read_resized(slide, level, factor, x0=0, y0=int(round(i * step)), out_w=out_w,
                           out_h=min(rows, out_h - i * rows)) for i in range(math.ceil(out_h / rows))]
    return np.concatenate(bands), mpp


def remove_small_objects(mask: np.ndarray, min_px: int) -> np.ndarray:
    """Drop 8-connected components of fewer than ``min_px`` pixels.

    Chosen over a morphological opening, which would also erase thin strands of
    tissue that belong to large pieces. ``scipy.ndimage.label`` does the labelling: 33x faster
    than the vectorised union-find it replaced (0.018 vs 0.58 s on a 1280 px mask of a 40x scan).
    """
    mask = np.asarray(mask, bool)
    if min_px <= 1 or not mask.any():
        return mask
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    keep = np.bincount(labels.ravel()) >= min_px
    keep[0] = False  # the background
    return keep[labels]


def tissue_mask(
    slide, *, thumb_mpp: float = 8.0, min_saturation: int = 8, dark_below: int = 40, min_object_px: int = 16,
    base_mpp: float | None = None,
) -> tuple[np.ndarray, float]:
    """(bool mask, its µm/px): tissue on a ``thumb_mpp`` thumbnail: HSV saturation above the glass
    peak (``mask_of_thumbnail``)."""
    base = slide_mpp(slide).mpp if base_mpp is None else base_mpp
    thumb, mpp = read_thumbnail(slide, base_mpp=base, target_mpp=thumb_mpp)
    return mask_of_thumbnail(thumb, min_saturation=min_saturation, dark_below=dark_below,
                             min_object_px=min_object_px), mpp


# Bumped whenever the tissue mask's rule changes, so cached slide indexes made by the old rule are redone.
MASK_VERSION = 2  # 2: glass-peak threshold (glass_threshold); 1: Otsu with a floor of 20


def glass_threshold(saturation: np.ndarray, *, min_saturation: int = 8) -> int:
    """The saturation (uint8) above which a thumbnail pixel is tissue: the upper edge of the glass peak.

    Otsu alone splits the histogram where the between-class variance peaks, which on slides of pale
    and dense tissue is between the two tissues: on scan-like lung slides it kept 185 of 999 tissue
    tiles, dropping most pale (lepidic) tissue. The triangle method finds the foot of the dominant
    glass peak instead; the lower of the two is taken (Otsu where tissue, not glass, is the highest
    peak: triangle then cuts the tissue's far tail; there, pale tissue outweighing the glass is
    still split off as before). ``min_saturation`` keeps JPEG colour
    noise on glass out (glass here is 0-3, its 99.9th percentile 19; specks go with
    ``remove_small_objects``); 8 is also the fixed saturation cut CLAM's tissue segmentation uses."""
    values = np.asarray(saturation, np.uint8).ravel()
    if values.size == 0 or values.min() == values.max():
        return int(min_saturation)
    cut = min(int(filters.threshold_otsu(values)), int(filters.threshold_triangle(values)))
    return max(cut, int(min_saturation))


def mask_of_thumbnail(thumb: np.ndarray, *, min_saturation: int = 8, dark_below: int = 40,
                      min_object_px: int = 16) -> np.ndarray:
    """Tissue pixels of a uint8 RGB thumbnail.

    Stained tissue is coloured, glass is white/grey: tissue is what lies above the glass peak of the
    saturation histogram (``glass_threshold``). Pixels whose brightest channel is below
    ``dark_below`` are black (ink, dust, slide edges) with meaningless saturation: excluded from the
    histogram and from the mask. Components under ``min_object_px`` mask pixels (default: 16 px at
    8 µm/px = 0.001 mm²) are specks, not tissue.
    """
    _, saturation, value = np.moveaxis(np.asarray(Image.fromarray(thumb).convert("HSV")), -1, 0)
    bright = value >= dark_below
    threshold = glass_threshold(saturation[bright], min_saturation=min_saturation)
    return remove_small_objects(bright & (saturation > threshold), min_object_px)


def save_mask_preview(slide, mask: np.ndarray, path: str | os.PathLike, *, max_side: int = 1024) -> None:
    """A PNG of the slide thumbnail with tissue tinted green, for a person to check the mask."""
    scale = max(1, max_side // max(mask.shape))
    size = (mask.shape[1] * scale, mask.shape[0] * scale)
    thumb = np.asarray(slide.get_thumbnail(size).convert("RGB").resize(size, Image.BOX), np.float32)
    big = np.repeat(np.repeat(np.asarray(mask, bool), scale, 0), scale, 1)[..., None]
    tinted = np.where(big, 0.6 * thumb + 0.4 * np.array([0, 200, 0], np.float32), thumb)
    Image.fromarray(np.rint(tinted).astype(np.uint8)).save(path, format="PNG")


def tile_grid(
    mask: np.ndarray, *, mask_mpp: float, base_mpp: float, slide_dims: tuple[int, int], tile_um: float,
    min_tissue: float = 0.5, overlap: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(coords int64 (N, 2) of level-0 top-left (x0, y0), tissue fractions float (N,)) of tissue tiles.

    Tiles are squares of ``tile_um`` µm (``tile_um / base_mpp`` level-0 px, usually
    fractional). Positions lie on the exact grid ``i * stride`` (stride = side *
    (1 - overlap)) floored to whole pixels, so spacing alternates between
    floor(stride) and ceil(stride) without drift. A tile is kept when it lies
    fully inside the slide and the mask covers at least ``min_tissue`` of its
    area, measured exactly (partial mask pixels count by area) from a summed-area table.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    side = tile_um / base_mpp
    stride = side * (1.0 - overlap)
    width, height = slide_dims
    xs, ys = (np.floor(np.arange(max(0, math.floor((n - side) / stride) + 2)) * stride) for n in (width, height))
    xs, ys = xs[xs + side <= width], ys[ys + side <= height]
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.int64)
    table = np.pad(np.cumsum(np.cumsum(np.asarray(mask, np.float64), 0), 1), ((1, 0), (1, 0)))
    mh, mw = mask.shape

    def integral(x, y):  # exact area of mask over [0, x) x [0, y): the table is bilinear inside each cell
        x, y = np.clip(x, 0, mw), np.clip(y, 0, mh)
        x0, y0 = np.minimum(np.floor(x).astype(int), mw - 1), np.minimum(np.floor(y).astype(int), mh - 1)
        fx, fy = x - x0, y - y0
        return ((1 - fx) * (1 - fy) * table[y0, x0] + fx * (1 - fy) * table[y0, x0 + 1]
                + (1 - fx) * fy * table[y0 + 1, x0] + fx * fy * table[y0 + 1, x0 + 1])

    scale = base_mpp / mask_mpp  # mask px per level-0 px
    left, top = coords[:, 0] * scale, coords[:, 1] * scale
    right, bottom = left + side * scale, top + side * scale
    area = integral(right, bottom) - integral(left, bottom) - integral(right, top) + integral(left, top)
    fractions = np.clip(area / (side * scale) ** 2, 0.0, 1.0)  # differences of sums: clip float noise
    keep = fractions >= min_tissue
    return coords[keep], fractions[keep]


def open_slide(path: str | os.PathLike) -> openslide.OpenSlide:
    """OpenSlide handle, with errors that name the file (OpenSlide's own say only 'unsupported')."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"slide not found: {os.fspath(path)}")
    try:
        return openslide.OpenSlide(path)
    except openslide.OpenSlideError as error:  # includes OpenSlideUnsupportedFormatError
        raise ValueError(f"{os.fspath(path)}: OpenSlide cannot read it ({error or type(error).__name__})") from error
