"""Tile image files -> uint8 RGB, and the cheap header checks made when a tile folder is scanned.

Tiles become uint8 RGB: 8-bit RGB, grayscale (L), palette (P) and CMYK through
PIL; any alpha (RGBA, LA, PA, a palette or tRNS transparency) composited on
white; 16 bits per channel (I;16*, 48/64-bit TIFF read with tifffile, 16-bit PNG
with imagecodecs) scaled by 255/65535 and rounded. Other modes are refused. What
would only fail in the loader's workers (a tile smaller than the teacher crop, a
mode that cannot be turned into RGB) is found at scan time from the headers alone,
with the file's name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

# PIL modes converted to RGB by PIL itself (alpha and transparency composited on white first)
PIL_RGB_MODES = ("1", "L", "P", "RGB", "CMYK", "YCbCr", "LA", "PA", "RGBA", "RGBa", "La")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Headers read per split at scan time: all of them up to this many, else this many spread evenly over the
# files (about 40-160 µs a header for small PNGs: 5000 take 0.2-0.8 s). A tile missed by the sample still
# fails with its name, when the loader reaches it.
MAX_HEADERS_CHECKED = 20_000


def _decoder(image: Image.Image) -> str:
    """How a tile is decoded: "pil", "tiff16" (tifffile) or "png16" (imagecodecs); ValueError for a mode
    that cannot become RGB. Reads headers only."""
    if image.mode in SIXTEEN_BIT_MODES:
        return "pil"
    if image.mode not in PIL_RGB_MODES:
        raise ValueError(f"image mode {image.mode!r} cannot be converted to 8-bit RGB (supported: "
                         f"{', '.join(PIL_RGB_MODES + SIXTEEN_BIT_MODES)}, 16-bit RGB TIFF/PNG)")
    if image.format == "TIFF" and max(image.tag_v2.get(258, (8,))) > 8:
        return "tiff16"
    if image.format == "PNG" and any(";16" in str(tile[3]) for tile in image.tile):
        return "png16"  # PIL would decode 16-bit RGB(A) PNGs to 8 bits by dropping the low byte, silently
    return "pil"


def _tiff16_page(tif):
    """The first page of a >8-bit TIFF, if it is gray or RGB (CMYK, Lab... are refused)."""
    page = tif.pages[0]
    if page.photometric.name not in ("MINISBLACK", "RGB"):
        raise ValueError(f"a {page.bitspersample}-bit {page.photometric.name} TIFF cannot be converted to RGB "
                         "(supported at more than 8 bits: gray or RGB)")
    return page


def tile_size(path: str) -> tuple[int, int]:
    """(width, height) of a tile from its header; ValueError/OSError naming why it cannot be used."""
    with Image.open(path) as image:
        decoder = _decoder(image)
        if decoder == "tiff16":
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = _tiff16_page(tif)
                return int(page.imagewidth), int(page.imagelength)
        return image.size


def check_tiles(paths: Sequence[str], *, min_px: int | None, what: str,
                max_checked: int = MAX_HEADERS_CHECKED) -> None:
    """Raise ValueError naming the first bad tile (and how many others) among ``paths``: unreadable, of
    an unsupported mode, or smaller than ``min_px`` on a side. Headers only; beyond ``max_checked``
    files, that many spread evenly over them."""
    if not paths:
        return
    picked = paths if len(paths) <= max_checked else [paths[int(i)] for i in
                                                      np.linspace(0, len(paths) - 1, max_checked).round()]
    bad = []
    for path in picked:
        try:
            w, h = tile_size(path)
        except (OSError, ValueError) as err:
            bad.append((path, f"cannot be used: {err}"))
            continue
        if min_px and min(w, h) < min_px:
            bad.append((path, f"is {w}x{h} px, smaller than the teacher crop data.teacher_px={min_px}"))
    if bad:
        sampled = f" (of {len(picked)} checked out of {len(paths)})" if len(picked) < len(paths) else ""
        others = f"; and {len(bad) - 1} other bad tile(s){sampled}, e.g. {bad[1][0]}" if len(bad) > 1 else ""
        raise ValueError(f"tile {bad[0][0]} {bad[0][1]} (in {what}){others}. Remove or fix these tiles.")


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 RGBA HWC -> uint8 RGB, transparent pixels (e.g. unscanned slide areas) shown as white glass."""
    if rgba[..., 3].min(initial=255) == 255:  # opaque, as scanned tissue nearly always is: its colour as it is
        return np.ascontiguousarray(rgba[..., :3])  # (what the blend gives; 1/4 of its time on a slide thumbnail)
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    return np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def array_to_rgb(array: np.ndarray) -> np.ndarray:
    """uint8 or uint16 gray / gray+alpha / RGB / RGBA (HW or HWC) -> uint8 RGB HWC, alpha composited on
    white and 16 bits scaled by 255/65535 with rounding (a plain cast would clip or wrap)."""
    if array.dtype.kind != "u" or array.dtype.itemsize not in (1, 2):
        raise ValueError(f"{array.dtype} pixels cannot be converted to 8-bit RGB (supported: 8 or 16 bits)")
    top = 255.0 if array.dtype.itemsize == 1 else 65535.0
    a = array.astype(np.float64)[..., None] if array.ndim == 2 else array.astype(np.float64)
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"pixels of shape {array.shape} are not gray, gray+alpha, RGB or RGBA")
    colour = a[..., :-1] if a.shape[-1] in (2, 4) else a
    colour = np.repeat(colour, 3, axis=-1) if colour.shape[-1] == 1 else colour
    alpha = a[..., -1:] / top if a.shape[-1] in (2, 4) else 1.0
    return np.rint((colour / top * alpha + (1.0 - alpha)) * 255.0).astype(np.uint8)


def image_to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image of a supported 8-bit or I;16 mode as uint8 RGB HWC, any alpha composited on white."""
    if image.mode in SIXTEEN_BIT_MODES:
        return array_to_rgb(np.asarray(image))
    if image.mode not in PIL_RGB_MODES:
        raise ValueError(f"image mode {image.mode!r} cannot be converted to 8-bit RGB")
    if image.mode in ("LA", "PA", "RGBA", "RGBa", "La") or "transparency" in image.info:
        return composite_on_white(np.asarray(image.convert("RGBA")))
    return np.asarray(image.convert("RGB"))


def load_rgb(path: str) -> np.ndarray:
    """Decode an image file to uint8 RGB HWC (see the module docstring for the modes converted)."""
    try:
        with Image.open(path) as image:
            decoder = _decoder(image)
            if decoder == "pil":
                return image_to_rgb(image)
        if decoder == "tiff16":
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = _tiff16_page(tif)
                pixels = page.asarray()
                return array_to_rgb(np.moveaxis(pixels, 0, -1) if page.planarconfig.name == "SEPARATE" else pixels)
        import imagecodecs

        with open(path, "rb") as handle:
            return array_to_rgb(imagecodecs.png_decode(handle.read()))
    except (OSError, ValueError) as err:
        raise OSError(f"cannot read tile image {path}: {err}") from err
