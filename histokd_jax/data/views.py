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
    """Antialiased downsample of an HWC image (or a batch of them, ``...HWC``) by an integer factor: each
    output pixel is a block mean.

    This is what a scanner's lower magnification approximates: every output pixel
    integrates the light of ``factor x factor`` input pixels. Written here rather than
    ``skimage.measure.block_reduce`` (the same means), which measured 7-20x slower on the loader's
    batches, single tiles and whole-slide thumbnails (``benchmarks/library_vs_handwritten.py``).
    """
    if factor == 1:
        return image
    *lead, h, w, c = image.shape
    if h % factor or w % factor:
        raise ValueError(f"image {h}x{w} is not divisible by the downsample factor {factor}")
    if image.dtype != np.uint8:
        blocks = image.reshape(*lead, h // factor, factor, w // factor, factor, c).astype(np.float32)
        return blocks.mean(axis=(-4, -2))
    # uint8: integer block sums as `factor` strided row slices added, then as many column slices (2-4x
    # faster than reductions over reshaped axes, whose inner loops run over 3 channels), then the float32
    # division and rounding (half to even) that the float mean would give, exactly
    total = np.uint16 if factor * factor * 255 < 1 << 16 else np.uint32
    rows = image[..., 0::factor, :, :].astype(total)
    for offset in range(1, factor):
        rows += image[..., offset::factor, :, :]
    sums = rows[..., 0::factor, :].copy()
    for offset in range(1, factor):
        sums += rows[..., offset::factor, :]
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


def _draw_dihedral(rng: np.random.Generator, *, spec: ViewSpec) -> int:
    """Index into ``DIHEDRAL`` of a random flip (drawn first) and quarter turns, as the spec allows."""
    mirror = bool(spec.flips and rng.random() < 0.5)
    turns = int(rng.integers(0, 4)) if spec.rot90 else 0
    return DIHEDRAL.index((mirror, turns))


def _draw_scanned(rng: np.random.Generator, *, spec: ViewSpec) -> bool:
    """Whether a training student view is scanner-like, with probability ``spec.scanlike`` (no draw at 0 or at f = 1)."""
    return bool(spec.scanlike) and spec.downsample > 1 and bool(rng.random() < spec.scanlike)


def _jitter(image: np.ndarray, rng: np.random.Generator, *, spec: ViewSpec) -> np.ndarray:
    b, c, s, h = spec.jitter
    jittered = color_jitter(image.astype(np.float32) / 255.0, rng, brightness=b, contrast=c, saturation=s, hue=h)
    return np.rint(jittered * 255.0).astype(np.uint8)


def draw_train_views(element: dict, *, spec: ViewSpec, rng: np.random.Generator) -> dict:
    """The per-record half of a training view (grain runs it, in its workers when there are some).

    The random crop, its colour jitter, the scanner-like student view when one is drawn (made
    from the unturned crop, as a scanner builds its levels before any augmentation turns a read),
    and which flip and turn ``finish_train_views`` applies to the whole batch at once: per record
    those copies and the block mean cost more than the read itself on 2 cores (BENCHMARKS.md,
    input pipeline). Colour jitter is per pixel, so it commutes with the flip and turn.
    A record with cached teacher targets is finished here (``_cached_views``).
    """
    if "teacher_map" in element:
        return _cached_views(element, spec=spec, rng=rng)
    teacher = crop(element["image"], spec.teacher_px, rng)
    index = _draw_dihedral(rng, spec=spec)
    if any(spec.jitter):
        teacher = _jitter(teacher, rng, spec=spec)
    drawn = {"crop": np.ascontiguousarray(teacher), "dihedral": np.int8(index),
             "label": np.int32(element["label"]), "has_label": np.bool_(element["has_label"])}
    if spec.scanlike:  # every record carries the pair of keys, so the batch stacks
        scanned = _draw_scanned(rng, spec=spec)
        drawn["scanned"] = np.bool_(scanned)
        drawn["scan_student"] = (scanlike_downsample(teacher, spec.downsample, rng) if scanned
                                 else np.zeros((spec.student_px,) * 2 + (3,), np.uint8))
    return drawn


def finish_train_views(batch: dict[str, np.ndarray], *, spec: ViewSpec) -> dict[str, np.ndarray]:
    """The batch half of training views: block means of all crops at once, then each record's flip and
    turn applied to both its views, eight groups of records at most. Cached-target batches pass as they are."""
    if "crop" not in batch:
        return batch
    crops, index = batch["crop"], batch["dihedral"]
    students = area_downsample(crops, spec.downsample)  # commutes with the flips and turns: square blocks
    if "scanned" in batch and batch["scanned"].any():
        students = np.where(batch["scanned"][:, None, None, None], batch["scan_student"], students)
    return {"teacher_image": _turn_each(crops, index), "student_image": _turn_each(students, index),
            "label": batch["label"], "has_label": batch["has_label"]}


def _turn_each(images: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Record i of an NHWC uint8 batch turned by ``DIHEDRAL[index[i]]``, one group of records per element.

    Pixels are moved as single 3-byte items (a void view): numpy copies flipped or transposed
    RGB arrays element by element over the 3 channels, which took as long as the block mean.
    """
    if images.dtype != np.uint8 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected a batch of square uint8 images, got {images.dtype} {images.shape}")
    pixels = np.ascontiguousarray(images).view(np.dtype((np.void, images.shape[-1])))[..., 0]
    turned = np.empty(pixels.shape, pixels.dtype)
    for k in np.unique(index):
        rows = index == k
        turned[rows] = dihedral(pixels[rows], int(k))
    return turned.view(np.uint8).reshape(images.shape)


def make_views(element: dict, *, spec: ViewSpec, rng: np.random.Generator | None) -> dict:
    """``{image, label, has_label}`` -> ``{teacher_image, student_image, label, has_label}``, one record.

    With ``rng`` (training) this is the training loader's two halves on a batch of one. With
    ``rng=None`` (evaluation) the crop is central and nothing is augmented, and a record that
    brings its own ``student_image`` (read from the slide's pyramid) keeps its central crop.
    A record with cached teacher targets (``teacher_logits``, ``teacher_map``: see
    ``teacher_targets.CachedTargetSource``) is cropped centrally, as when it was
    cached, and only flipped and rotated, together with its map; it has no
    ``teacher_image``.
    """
    if "teacher_map" in element:
        return _cached_views(element, spec=spec, rng=rng)
    if rng is not None:
        drawn = draw_train_views(element, spec=spec, rng=rng)
        batch = finish_train_views({key: np.asarray(value)[None] for key, value in drawn.items()}, spec=spec)
        return {key: value[0] for key, value in batch.items()}
    teacher = crop(element["image"], spec.teacher_px, None)
    if "student_image" in element:  # read from the pyramid: what whole-slide inference sees
        student = crop(element["student_image"], spec.student_px, None)
    else:
        student = area_downsample(teacher, spec.downsample)
    return {
        "teacher_image": teacher,
        "student_image": student,
        "label": np.int32(element["label"]),
        "has_label": np.bool_(element["has_label"]),
    }


def _student_view(teacher: np.ndarray, *, spec: ViewSpec, rng: np.random.Generator | None) -> np.ndarray:
    """The block mean of a cached-target crop, or with probability ``spec.scanlike`` in training a
    scanner-like level (no random draw at all when it is 0)."""
    if rng is not None and _draw_scanned(rng, spec=spec):
        return scanlike_downsample(teacher, spec.downsample, rng)
    return area_downsample(teacher, spec.downsample)


def _cached_views(element: dict, *, spec: ViewSpec, rng: np.random.Generator | None) -> dict:
    teacher, t_map = crop(element["image"], spec.teacher_px, None), element["teacher_map"]
    if rng is not None:
        allowed = [i for i, (mirror, turns) in enumerate(DIHEDRAL)
                   if (spec.flips or not mirror) and (spec.rot90 or not turns)]
        index = allowed[int(rng.integers(0, len(allowed)))]
        teacher = np.ascontiguousarray(dihedral(teacher, index, axes=(0, 1)))
        t_map = np.ascontiguousarray(dihedral(t_map, index, axes=(0, 1)))
    return {  # no teacher image: the step uses the cached targets instead, so it is not sent to the devices
        "student_image": _student_view(teacher, spec=spec, rng=rng),
        "teacher_logits": np.asarray(element["teacher_logits"], np.float32),
        "teacher_map": np.asarray(t_map, np.float32),
        "label": np.int32(element["label"]),
        "has_label": np.bool_(element["has_label"]),
    }


class TrainViews(grain.transforms.RandomMap):
    """grain transform: the per-record half of the training views, seeded per record by grain."""

    def __init__(self, spec: ViewSpec):
        self.spec = spec

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return draw_train_views(element, spec=self.spec, rng=rng)
