"""grain data sources over tile folders.

Layout: ``root/<split>/<class>/*.png`` for labelled splits and, optionally,
``root/unlabeled/**/*.png`` for the unlabelled pool used by distillation only.
A source is just an indexable list of records; pixels are decoded on access, in
the loader's worker processes (``tile_images``: decoding, and the header checks
made when a folder is scanned).

Every source names itself by content (``repr``: the kind, the record count and a
digest of the records), never by memory address: grain stores ``repr(source)`` in
each checkpoint of a loader and refuses to resume on another one, and the trainer
compares it first to say, in one line, that the data changed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from histokd_jax.data.tile_images import check_tiles, load_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
UNLABELED = -1


@dataclasses.dataclass(frozen=True)
class TileRecord:
    path: str
    label: int  # UNLABELED (-1) for the unlabelled pool


def digest(*parts) -> str:
    """A short, stable hash of arrays, numbers and strings (in this order): the identity of a set of records."""
    h = hashlib.sha256()
    for part in parts:
        array = np.asarray(part)
        if array.dtype == object:
            raise TypeError(f"digest takes arrays of numbers or strings, got {type(part).__name__} of objects")
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


def relative_paths(paths: Sequence[str]) -> list[str]:
    """Paths relative to the folder that holds them all: a dataset moved elsewhere keeps its identity."""
    if not paths:
        return []
    base = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return [os.path.relpath(os.path.abspath(p), base) for p in paths]


def _images_under(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def find_class_names(root: str | pathlib.Path, *, split: str = "train") -> tuple[str, ...]:
    """Class names as the sorted sub-folders of ``root/split`` (the label order)."""
    folder = pathlib.Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"no split folder {folder} (expected root/<split>/<class>/*.png)")
    names = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
    if not names:
        raise FileNotFoundError(f"{folder} has no class sub-folders (expected {folder}/<class>/*.png)")
    return names


def scan_split(root: str | pathlib.Path, split: str, *, class_names: Sequence[str],
               min_px: int | None = None) -> list[TileRecord]:
    """Records of a labelled split; unknown or missing class folders are errors, not silent drops, and so
    are tiles that cannot be used (``check_tiles``: smaller than ``min_px``, the teacher crop, or of a
    mode that cannot become RGB)."""
    folder = pathlib.Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"no split folder {folder} (expected root/<split>/<class>/*.png)")
    present = {p.name for p in folder.iterdir() if p.is_dir()}
    unknown = sorted(present - set(class_names))
    if unknown:
        raise ValueError(f"{folder} has folders {unknown} that are not among the classes {list(class_names)}")
    records = []
    for label, name in enumerate(class_names):
        records += [TileRecord(str(p), label) for p in _images_under(folder / name)] if name in present else []
    if not records:
        raise FileNotFoundError(f"the {split!r} split is empty: no images ({', '.join(IMAGE_SUFFIXES)}) under "
                                f"{folder}/<class>/")
    check_tiles([r.path for r in records], min_px=min_px, what=f"the {split!r} split ({folder})")
    return records


def scan_unlabeled(root: str | pathlib.Path, *, folder: str = "unlabeled", min_px: int | None = None) -> list[TileRecord]:
    """Records of the unlabelled pool (any depth); an absent pool is an empty list. Tiles are checked
    as in ``scan_split``."""
    path = pathlib.Path(root) / folder
    records = [TileRecord(str(p), UNLABELED) for p in _images_under(path)] if path.is_dir() else []
    check_tiles([r.path for r in records], min_px=min_px, what=f"the unlabelled pool ({path})")
    return records


class TileSource:
    """A grain random-access source: ``source[i] -> {image, label, has_label}``.

    ``min_px``: a decoded tile smaller than this (the teacher crop) is an error naming its file (the
    scan checks a sample only where there are very many tiles)."""

    def __init__(self, records: Sequence[TileRecord], *, min_px: int | None = None):
        self.records = list(records)
        self.min_px = min_px

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = load_rgb(record.path)
        if self.min_px and min(image.shape[:2]) < self.min_px:
            raise OSError(f"tile {record.path} is {image.shape[1]}x{image.shape[0]} px, smaller than the "
                          f"teacher crop data.teacher_px={self.min_px}")  # OSError: a bad file, like an unreadable one
        return {
            "image": image,
            "label": np.int32(record.label),
            "has_label": np.bool_(record.label != UNLABELED),
        }

    def labels(self) -> np.ndarray:
        return np.asarray([r.label for r in self.records], np.int32)

    @functools.cached_property
    def identity(self) -> str:  # computed once: grain asks for the repr at every checkpoint
        files = relative_paths([r.path for r in self.records])
        return f"TileSource({len(self)} records, {digest(files, self.labels())})"

    def __repr__(self) -> str:
        return self.identity


class SubsetSource:
    """Records ``indices`` of another source, in that order (a smaller unlabelled pool)."""

    def __init__(self, source, indices: Sequence[int]):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.source[int(self.indices[index])]

    def labels(self) -> np.ndarray:
        return np.asarray(self.source.labels())[self.indices]

    @functools.cached_property
    def identity(self) -> str:
        return f"SubsetSource({self.source!r}, {len(self)} records, {digest(self.indices)})"

    def __repr__(self) -> str:
        return self.identity


class RelabelledSource:
    """Another source with every record's label replaced: the unlabelled pool with its true classes,
    for the low-resolution control that distillation is measured against."""

    def __init__(self, source, labels: np.ndarray):
        if len(labels) != len(source):
            raise ValueError(f"{len(labels)} labels for a source of {len(source)} records")
        self.source, self._labels = source, np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        label = self._labels[index]
        return {**self.source[index], "label": np.int32(label), "has_label": np.bool_(label != UNLABELED)}

    def labels(self) -> np.ndarray:
        return self._labels

    @functools.cached_property
    def identity(self) -> str:
        return f"RelabelledSource({self.source!r}, labels {digest(self._labels)})"

    def __repr__(self) -> str:
        return self.identity


class ConcatSource:
    """Several sources one after another (a labelled split followed by an unlabelled pool)."""

    def __init__(self, parts: Sequence):
        self.parts = list(parts)
        self._ends = np.cumsum([len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> dict:
        part = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[part - 1]) if part else 0
        return self.parts[part][index - start]

    def labels(self) -> np.ndarray:
        return np.concatenate([np.asarray(p.labels(), np.int32) for p in self.parts]) if self.parts else (
            np.zeros(0, np.int32))

    @functools.cached_property
    def identity(self) -> str:
        return f"ConcatSource({', '.join(map(repr, self.parts))})"

    def __repr__(self) -> str:
        return self.identity


def pool_subset(pool, *, n_labelled: int, fraction: float, seed: int):
    """The pool with only ``fraction`` of its unlabelled records (which follow the ``n_labelled``
    labelled ones), chosen by ``seed``; the same seed gives nested subsets for growing fractions."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"data.unlabeled_fraction must be in [0, 1], got {fraction}")
    if fraction == 1.0:
        return pool
    n_unlabeled = len(pool) - n_labelled
    if n_unlabeled == 0:  # a pool-size sweep cell would report a fraction of nothing as if it were data
        raise ValueError(f"data.unlabeled_fraction={fraction} but this data has no unlabelled pool (data.use_unlabeled "
                         "is off, or no unlabelled records were found); set data.unlabeled_fraction=1.0")
    order = np.random.default_rng(seed).permutation(n_unlabeled)
    keep = np.sort(order[: int(round(fraction * n_unlabeled))]) + n_labelled
    return SubsetSource(pool, np.concatenate([np.arange(n_labelled), keep]))
