"""Tile indexes of whole slides, and a grain source that reads tiles through OpenSlide.

Indexing a slide (resolution, tissue mask, tile grid) costs a thumbnail read;
its result is cached per slide under ``cache_dir`` (keyed by the file's size,
mtime, the indexing settings and the mask's rule), so reruns and interrupted runs redo nothing.
A slide that cannot be used (missing, unreadable, unsupported, no resolution,
no tissue) is skipped with a one-line reason and a row in ``skipped_slides.csv``;
the rest go on. A slide that breaks after indexing is replaced by other slides'
tiles in training sources, and refused (never replaced) in evaluation sources,
whose evaluation then drops the whole slide and lists it in the same csv.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import hashlib
import json
import logging
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
import openslide
from tqdm.auto import tqdm

from histokd_jax import atomic
from histokd_jax.messages import first_line, listed
from histokd_jax.data import process_pool, slides
from histokd_jax.data.manifest import SlideEntry
from histokd_jax.data.sources import UNLABELED, digest, relative_paths

log = logging.getLogger(__name__)

SKIPPED_COLUMNS = ("slide", "label", "split", "line", "reason")
EVALUATION_DROP = "unreadable during evaluation: "  # the reason of a slide dropped from an evaluation
# What a slide read can raise: missing/unsupported files (OSError/ValueError from slides.open_slide) and
# OpenSlide's own errors from decoding (a corrupt JPEG tile), which are neither.
READ_ERRORS = (OSError, ValueError, openslide.OpenSlideError)


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    teacher_mpp: float  # resolution of the teacher view
    tile_px: int  # side of a tile at the teacher resolution
    min_tissue: float = 0.5
    overlap: float = 0.0
    thumb_mpp: float = 8.0  # resolution of the tissue mask

    @property
    def tile_um(self) -> float:
        return self.tile_px * self.teacher_mpp


@dataclasses.dataclass(frozen=True)
class SlideTiles:
    """The usable tiles of one slide."""

    entry: SlideEntry
    mpp: float  # level-0 µm/px actually used
    mpp_source: str
    coords: np.ndarray  # (N, 2) level-0 top-left (x0, y0)
    tissue: np.ndarray  # (N,) tissue fraction


def _cache_file(entry: SlideEntry, settings: IndexSettings, cache_dir: pathlib.Path) -> pathlib.Path:
    stat = entry.path.stat()
    key = json.dumps([str(entry.path.resolve()), stat.st_size, stat.st_mtime_ns, entry.mpp,
                      dataclasses.asdict(settings), slides.MASK_VERSION])
    return cache_dir / f"{entry.path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"


def index_slide(entry: SlideEntry, *, settings: IndexSettings, cache_dir: pathlib.Path) -> SlideTiles:
    """Tiles of one slide (from the cache when it is there); raises ValueError/OSError with the reason."""
    if not entry.path.is_file():
        raise FileNotFoundError(f"slide not found: {entry.path}")
    cached = _cache_file(entry, settings, cache_dir)
    if cached.exists():
        data = np.load(cached)
        return SlideTiles(entry, float(data["mpp"]), str(data["source"]), data["coords"], data["tissue"])
    with slides.open_slide(entry.path) as slide:
        resolution = slides.slide_mpp(slide, override=entry.mpp)
        if resolution.mpp > settings.teacher_mpp * 1.02:
            raise ValueError(f"level 0 is {resolution.mpp:.3g} µm/px, coarser than the teacher's {settings.teacher_mpp:.3g}")
        try:
            mask, mask_mpp = slides.tissue_mask(slide, thumb_mpp=settings.thumb_mpp, base_mpp=resolution.mpp)
            coords, tissue = slides.tile_grid(
                mask, mask_mpp=mask_mpp, base_mpp=resolution.mpp, slide_dims=slide.dimensions,
                tile_um=settings.tile_um, min_tissue=settings.min_tissue, overlap=settings.overlap,
            )
            slides.save_mask_preview(slide, mask, cached.with_suffix(".mask.png"))
        except openslide.OpenSlideError as err:  # it opened, but its tiles do not decode
            raise OSError(f"{entry.path}: OpenSlide cannot read its tiles ({err or type(err).__name__})") from err
    if not len(coords):
        raise ValueError("no tissue tiles (nothing passed the tissue mask and min_tissue)")
    # atomic: an interrupted index never leaves a half file
    atomic.save_npz(cached, mpp=resolution.mpp, source=resolution.source, coords=coords, tissue=tissue)
    return SlideTiles(entry, resolution.mpp, resolution.source, coords, tissue)


def _index_or_reason(entry: SlideEntry, *, settings: IndexSettings, cache_dir: pathlib.Path) -> SlideTiles | str:
    """The slide's tiles, or the one-line reason it cannot be used."""
    try:
        return index_slide(entry, settings=settings, cache_dir=cache_dir)
    except READ_ERRORS as err:
        return first_line(err)


def index_slides(
    entries: Sequence[SlideEntry], *, settings: IndexSettings, cache_dir: str | pathlib.Path, show_progress: bool = True,
    workers: int | None = None,
) -> tuple[list[SlideTiles], list[tuple[SlideEntry, str]]]:
    """(usable slides, skipped (entry, reason)); writes ``cache_dir/skipped_slides.csv``. Slides are
    indexed by ``workers`` processes (default: one per core for 16 slides or more), in manifest order."""
    cache_dir = pathlib.Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    usable, skipped = [], []
    indexed = process_pool.map_in_order(functools.partial(_index_or_reason, settings=settings, cache_dir=cache_dir),
                                        list(entries), workers=workers)
    for entry, tiles in tqdm(zip(entries, indexed), total=len(entries), desc="indexing slides", unit="slide",
                             disable=not show_progress):
        if isinstance(tiles, SlideTiles):
            usable.append(tiles)
        else:
            log.warning("skipping slide %s (manifest line %d): %s", entry.path, entry.line, tiles)
            skipped.append((entry, tiles))
    csv_path = cache_dir / "skipped_slides.csv"
    # rows of slides an earlier run dropped from an evaluation stay: that stage may not evaluate again
    dropped_earlier = [row for row in _read_skipped(csv_path) if row[-1].startswith(EVALUATION_DROP)]
    _write_skipped(csv_path, [_skipped_row(e, r) for e, r in skipped] + dropped_earlier)
    return usable, skipped


def _skipped_row(entry: SlideEntry, reason: str) -> list[str]:
    return [str(entry.path), entry.label or "", entry.split, str(entry.line), reason]


def _read_skipped(path: pathlib.Path) -> list[list[str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [row for row in csv.reader(handle)][1:]


def _write_skipped(path: pathlib.Path, rows: Sequence[Sequence[str]]) -> None:
    with atomic.atomic_open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(SKIPPED_COLUMNS)
        writer.writerows(rows)


def append_skipped(path: str | pathlib.Path, skipped: Sequence[tuple[SlideEntry, str]]) -> None:
    """Add rows to a ``skipped_slides.csv`` (rewritten atomically); a row already there is not repeated,
    so a slide dropped at every validation is listed once."""
    path = pathlib.Path(path)
    rows = _read_skipped(path)
    new = [row for row in (_skipped_row(e, r) for e, r in skipped) if row not in rows]
    if new:
        _write_skipped(path, rows + new)


class SlideTileSource:
    """A grain source over slide tiles: ``source[i] -> {image, label, has_label[, student_image]}``.

    ``image`` is the teacher view read at ``teacher_mpp``. With ``student_mpp``
    the student view is also read from the pyramid at that resolution (the same
    region), which is what whole-slide inference does; for training the student
    view is instead the downsample of the augmented teacher crop (data/views.py).
    Slide handles are opened lazily, once per process, and never pickled.

    ``substitute``: what a tile of a slide that fails after indexing gives. True
    (training, the distillation pool): the next readable slide's tile, so one bad
    slide does not end an epoch. False (validation, test): an OSError naming the
    slide, so the evaluation can drop that slide instead of scoring another one's
    tile under its label. ``skipped_csv``: where slides dropped from an evaluation
    are listed (``note_dropped``).
    """

    def __init__(self, tiles: Sequence[SlideTiles], *, class_names: Sequence[str], teacher_mpp: float, tile_px: int,
                 student_mpp: float | None = None, substitute: bool = True,
                 skipped_csv: str | pathlib.Path | None = None):
        self.paths = [str(t.entry.path) for t in tiles]
        self.entries = [t.entry for t in tiles]
        self.mpps = np.asarray([t.mpp for t in tiles], np.float64)
        labels = [class_names.index(t.entry.label) if t.entry.label else UNLABELED for t in tiles]
        counts = [len(t.coords) for t in tiles]
        self.slide_of = np.repeat(np.arange(len(tiles)), counts).astype(np.int32)
        self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if tiles else np.zeros(0, np.int64)
        self.coords = np.concatenate([t.coords for t in tiles]) if tiles else np.zeros((0, 2), np.int64)
        self.tile_labels = np.repeat(np.asarray(labels, np.int32), counts)
        self.teacher_mpp, self.tile_px, self.student_mpp = teacher_mpp, tile_px, student_mpp
        self.substitute = substitute
        self.skipped_csv = None if skipped_csv is None else str(skipped_csv)
        self._handles: dict[int, object] = {}
        self.reasons: dict[int, str] = {}  # slides that failed while reading, in this process, and why

    def __len__(self) -> int:
        return len(self.coords)

    def reading_student_at(self, student_mpp: float) -> "SlideTileSource":
        """The same tiles, each also read at ``student_mpp`` from the slide's own pyramid level (as
        ``launch/predict.py`` reads it), with handles of its own."""
        other = copy.copy(self)
        other.__dict__.pop("identity", None)
        other._handles, other.reasons, other.student_mpp = {}, dict(self.reasons), float(student_mpp)
        return other

    def __getstate__(self) -> dict:  # worker processes open their own handles
        return {**self.__dict__, "_handles": {}}

    def _slide(self, index: int):
        if index not in self._handles:
            self._handles[index] = slides.open_slide(self.paths[index])
        return self._handles[index]

    def __getitem__(self, index: int) -> dict:
        """The record at ``index``; for a slide that fails, see ``substitute``.

        A slide can pass indexing and still fail later (a truncated file, a bad JPEG
        tile, a lost network mount); it is logged once and not read again. Each
        failure marks one more slide unreadable, so the loop ends within
        ``len(paths)`` rounds: with a tile, or with an error naming every slide.
        """
        for _ in range(len(self.paths) + 1):  # the last round finds no readable slide and raises
            index = self._readable_index(index)
            try:
                return self._read(index)
            except READ_ERRORS as err:
                s = int(self.slide_of[index])
                self._mark_unreadable(s, err)
                if not self.substitute:
                    raise self._refusal(s) from err
        raise AssertionError("unreachable: _readable_index raises once every slide is unreadable")

    def _readable_index(self, index: int) -> int:
        """``index`` if its slide is readable; else (substituting) the first tile of the next readable slide."""
        s = int(self.slide_of[index])
        if s not in self.reasons:
            return int(index)
        if not self.substitute:
            raise self._refusal(s)
        for step in range(1, len(self.paths)):
            t = (s + step) % len(self.paths)
            if t not in self.reasons:
                return int(self._starts[t])
        raise OSError(f"every slide of this source is unreadable: {self.describe_unreadable()}")

    def _mark_unreadable(self, s: int, err: BaseException) -> None:
        reason = first_line(err)
        if self.paths[s] not in reason:
            reason = f"{self.paths[s]}: {reason}"
        self.reasons[s] = reason
        # Its handle is not closed here: grain's threads may be reading it now, and closing an OpenSlide
        # handle under a read aborts the process (tiffcache assertion). It is never read again.
        log.warning("slide %s became unreadable (%s); %s", self.paths[s], reason,
                    "its tiles are replaced by others" if self.substitute else "it is left out of this evaluation")

    def _refusal(self, s: int) -> OSError:
        return OSError(f"slide unreadable after indexing: {self.reasons[s]}")

    def describe_unreadable(self) -> str:
        """The unreadable slides with their reasons, for an error message."""
        return listed([self.reasons[s] for s in sorted(self.reasons)])

    def note_dropped(self, reasons: Mapping[int, str]) -> None:
        """Append the slides (by index) dropped from an evaluation, with why, to ``skipped_csv``."""
        if self.skipped_csv and reasons:
            append_skipped(self.skipped_csv, [(self.entries[s], f"{EVALUATION_DROP}{r}")
                                              for s, r in sorted(reasons.items())])

    def _read(self, index: int) -> dict:
        s = int(self.slide_of[index])
        x0, y0 = (int(v) for v in self.coords[index])
        read = lambda mpp, px: slides.read_region_at(  # noqa: E731
            self._slide(s), x0=x0, y0=y0, size_px=px, base_mpp=self.mpps[s], target_mpp=mpp)
        label = self.tile_labels[index]
        element = {"image": read(self.teacher_mpp, self.tile_px), "label": np.int32(label),
                   "has_label": np.bool_(label != UNLABELED)}
        if self.student_mpp is not None:
            px = round(self.tile_px * self.teacher_mpp / self.student_mpp)
            element["student_image"] = read(self.student_mpp, px)
        return element

    def labels(self) -> np.ndarray:
        return self.tile_labels

    @functools.cached_property
    def identity(self) -> str:  # by content (see data/sources.py), once: grain asks for it at every checkpoint
        settings = np.asarray([self.teacher_mpp, self.tile_px, self.student_mpp or 0.0], np.float64)
        records = digest(relative_paths(self.paths), self.mpps, self.slide_of, self.coords, self.tile_labels, settings)
        return f"SlideTileSource({len(self.paths)} slides, {len(self)} tiles, {records})"

    def __repr__(self) -> str:
        return self.identity

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
