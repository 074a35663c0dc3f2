"""Paired views: one augmented high-resolution crop, and its downsample for the student.

Both views are cut from the SAME augmented crop, so teacher and student always
see the same tissue with the same flips, rotation and colour; only resolution
differs. Images stay uint8 HWC until the step normalises them.
"""

from __future__ import annotations

import dataclasses
import io

import grain
import numpy as np
from PIL import Image

from histokd_jax.symmetry import DIHEDRAL, dihedral

ALLOWED_DOWNSAMPLES = (1, 2, 4, 8, 16)

# RGB -> YIQ; a rotation of the (I, Q) chroma plane shifts hue without changing luma.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def area_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Antialiased downsample of an HWC image by an integer factor: each output pixel is a block mean.

    This is what a scanner's lower magnification approximates: every output pixel
    integrates the light of ``factor x factor`` input pixels.
    """
    if factor == 1:
        return image
    h, w, c = image.shape
    if h % factor or w % factor:
        raise ValueError(f"image {h}x{w} is not divisible by the downsample factor {factor}")
    if image.dtype != np.uint8:
        return image.reshape(h // factor, factor, w // factor, factor, c).astype(np.float32).mean(axis=(1, 3))
    # uint8: integer block sums, rows first then columns (cheaper than a float mean over both axes of a
    # 5-d view), then the float32 division and rounding (half to even) that mean would give, exactly
    total = np.uint16 if factor * factor * 255 < 1 << 16 else np.uint32
    rows = image.reshape(h // factor, factor, w, c).sum(axis=1, dtype=total)
    sums = rows.reshape(h // factor, w // factor, factor, c).sum(axis=2, dtype=total)
    return np.rint(sums.astype(np.float32) / np.float32(factor * factor)).astype(np.uint8)


# What scanners use to build their reduced levels (data/scanner_slides.py writes slides both ways).
SCAN_FILTERS = (Image.Resampling.LANCZOS, Image.Resampling.BICUBIC)
SCAN_QUALITY = (70, 95)  # JPEG quality drawn in this range (inclusive); scanners store 70-90


def scanlike_downsample(image: np.ndarray, factor: int, rng: np.random.Generator) -> np.ndarray:
    """The downsample a scanner's pyramid level would hold: a smoothing resize (Lanczos or bicubic,
    drawn), then JPEG at a drawn quality with 4:2:0 chroma, decoded again.

    Training the student on a mix of these and block means teaches it the level it reads in use
    (``launch/predict.py`` reads the slide's own level), not only the exact block mean.
    """
    h, w, _ = image.shape
    if h % factor or w % factor:
        raise ValueError(f"image {h}x{w} is not divisible by the downsample factor {factor}")
    resample = SCAN_FILTERS[int(rng.integers(0, len(SCAN_FILTERS)))]
    quality = int(rng.integers(SCAN_QUALITY[0], SCAN_QUALITY[1] + 1))
    small = Image.fromarray(image).resize((w // factor, h // factor), resample)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=quality, subsampling=2)  # 2: 4:2:0
    return np.asarray(Image.open(buffer).convert("RGB"))


def color_jitter(
    image: np.ndarray, rng: np.random.Generator, *, brightness: float, contrast: float, saturation: float, hue: float
) -> np.ndarray:
    """Random brightness, contrast, saturation and hue on a float RGB image in [0, 1].

    Factors are drawn like torchvision's ColorJitter (``1 + U(-x, x)``; hue as a
    fraction of a full turn) and applied in that order. Each operation is affine
    in RGB (the hue shift is a rotation in YIQ chroma space, which keeps luma), so
    they are composed into one 3x3 matrix and offset and applied to the pixels
    once, then clipped: the same result as applying them one by one, at the cost
    of a single matrix product.
    """
    luma = _RGB_TO_YIQ[0]
    matrix, offset = np.eye(3, dtype=np.float32), np.zeros(3, np.float32)  # pixel row p -> p @ matrix + offset
    if brightness:
        factor = rng.uniform(1 - brightness, 1 + brightness)
        matrix, offset = matrix * factor, offset * factor
    if contrast:
        factor = rng.uniform(1 - contrast, 1 + contrast)
        mean_grey = (image.reshape(-1, 3).mean(0) @ matrix + offset) @ luma
        matrix, offset = matrix * factor, offset * factor + (1 - factor) * mean_grey
    if saturation:
        factor = rng.uniform(1 - saturation, 1 + saturation)
        to_grey = factor * np.eye(3, dtype=np.float32) + (1 - factor) * np.outer(luma, np.ones(3, np.float32))
        matrix, offset = matrix @ to_grey, offset @ to_grey
    if hue:
        angle = 2 * np.pi * rng.uniform(-hue, hue)
        cos, sin = np.cos(angle), np.sin(angle)
        rotate = np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]], np.float32)
        shift = (_YIQ_TO_RGB @ rotate @ _RGB_TO_YIQ).T
        matrix, offset = matrix @ shift, offset @ shift
    return np.clip(image @ matrix.astype(np.float32) + offset.astype(np.float32), 0.0, 1.0)


def crop(image: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """A ``size`` square crop: random when ``rng`` is given, central otherwise."""
    h, w, _ = image.shape
    if h < size or w < size:
        raise ValueError(f"tile {h}x{w} is smaller than the teacher crop {size}")
    if rng is None:
        y, x = (h - size) // 2, (w - size) // 2
    else:
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return image[y : y + size, x : x + size]


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """How to turn a tile into the two views. ``jitter`` = (brightness, contrast, saturation, hue)."""

    teacher_px: int
    downsample: int
    flips: bool = True
    rot90: bool = True
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    scanlike: float = 0.0  # share of training student views made by scanlike_downsample (else block means)

    def __post_init__(self):
        if self.downsample not in ALLOWED_DOWNSAMPLES:
            raise ValueError(f"downsample must be one of {ALLOWED_DOWNSAMPLES}, got {self.downsample}")
        if self.teacher_px % self.downsample:
            raise ValueError(f"teacher_px={self.teacher_px} is not divisible by downsample={self.downsample}")
        if not 0.0 <= self.scanlike <= 1.0:
            raise ValueError(f"scanlike (a share of the student views) must be in [0, 1], got {self.scanlike}")

    @property
    def student_px(self) -> int:
        return self.teacher_px // self.downsample


def augment(image: np.ndarray, rng: np.random.Generator, *, spec: ViewSpec) -> np.ndarray:
    """Flip, rotate by a multiple of 90 degrees and colour-jitter a uint8 HWC crop."""
    if spec.flips and rng.random() < 0.5:
        image = image[:, ::-1]
    if spec.rot90:
        image = np.rot90(image, k=int(rng.integers(0, 4)))
    if any(spec.jitter):
        b, c, s, h = spec.jitter
        jittered = color_jitter(image.astype(np.float32) / 255.0, rng, brightness=b, contrast=c, saturation=s, hue=h)
        image = np.rint(jittered * 255.0).astype(np.uint8)
    return np.ascontiguousarray(image)


def student_view(teacher: np.ndarray, *, spec: ViewSpec, rng: np.random.Generator | None) -> np.ndarray:
    """The student's view of the (augmented) teacher crop: its block mean, or with probability
    ``spec.scanlike`` in training a scanner-like level (no random draw at all when it is 0)."""
    if rng is not None and spec.scanlike and spec.downsample > 1 and rng.random() < spec.scanlike:
        return scanlike_downsample(teacher, spec.downsample, rng)
    return area_downsample(teacher, spec.downsample)


def make_views(element: dict, *, spec: ViewSpec, rng: np.random.Generator | None) -> dict:
    """``{image, label, has_label}`` -> ``{teacher_image, student_image, label, has_label}``.

    With ``rng=None`` (evaluation) the crop is central and nothing is augmented, and a record that
    brings its own ``student_image`` (read from the slide's pyramid) keeps its central crop.
    A record with cached teacher targets (``teacher_logits``, ``teacher_map``: see
    ``teacher_targets.CachedTargetSource``) is cropped centrally, as when it was
    cached, and only flipped and rotated, together with its map; it has no
    ``teacher_image``.
    """
    if "teacher_map" in element:
        return _cached_views(element, spec=spec, rng=rng)
    teacher = crop(element["image"], spec.teacher_px, rng)
    if rng is not None:
        teacher = augment(teacher, rng, spec=spec)
    if rng is None and "student_image" in element:  # read from the pyramid: what whole-slide inference sees
        student = crop(element["student_image"], spec.student_px, None)
    else:
        student = student_view(teacher, spec=spec, rng=rng)
    return {
        "teacher_image": teacher,
        "student_image": student,
        "label": np.int32(element["label"]),
        "has_label": np.bool_(element["has_label"]),
    }


def _cached_views(element: dict, *, spec: ViewSpec, rng: np.random.Generator | None) -> dict:
    teacher, t_map = crop(element["image"], spec.teacher_px, None), element["teacher_map"]
    if rng is not None:
        allowed = [i for i, (mirror, turns) in enumerate(DIHEDRAL)
                   if (spec.flips or not mirror) and (spec.rot90 or not turns)]
        index = allowed[int(rng.integers(0, len(allowed)))]
        teacher = np.ascontiguousarray(dihedral(teacher, index, axes=(0, 1)))
        t_map = np.ascontiguousarray(dihedral(t_map, index, axes=(0, 1)))
    return {  # no teacher image: the step uses the cached targets instead, so it is not sent to the devices
        "student_image": student_view(teacher, spec=spec, rng=rng),
        "teacher_logits": np.asarray(element["teacher_logits"], np.float32),
        "teacher_map": np.asarray(t_map, np.float32),
        "label": np.int32(element["label"]),
        "has_label": np.bool_(element["has_label"]),
    }


class TrainViews(grain.transforms.RandomMap):
    """grain transform: augmented paired views, seeded per record by grain."""

    def __init__(self, spec: ViewSpec):
        self.spec = spec

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return make_views(element, spec=self.spec, rng=rng)
