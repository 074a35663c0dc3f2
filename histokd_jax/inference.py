"""Whole-slide inference: a trained model over every tissue tile of a slide, at its own resolution.

Reads come from the coarsest pyramid level that is at or finer than the model's
µm/px (never level 0 when a lower level serves), one strip of at most
``strip_tiles`` tiles at a time, so memory stays bounded however large the slide;
a background thread reads the next strip while the device runs the current batch.

Per slide, in ``out_dir``: ``<name>.csv`` (tile rectangles in level-0 px and
class probabilities), ``<name>.geojson`` (QuPath-importable tiles with their
probabilities as measurements), ``<name>.heatmap.png`` (top class over a
thumbnail) and ``<name>.json`` (the summary; written last, so its presence marks
a slide as done). Each is written atomically (complete or absent). ``<name>`` is
the slide's stem, or ``<stem>-<hash>`` where stems clash (see ``output_names``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import openslide
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from histokd_jax import atomic, checkpoint, evaluation, parallel, report
from histokd_jax import cascade as cascade_rules
from histokd_jax.data import slides
from histokd_jax.data.splits import resolve_downsample
from histokd_jax.messages import first_line
from histokd_jax.model_config import make_model
from histokd_jax.stage_names import check_no_old_folders
from histokd_jax.state import abstract_params
from histokd_jax.units import resolution_to_mpp

log = logging.getLogger(__name__)

MODEL_STAGES = {"student": "distill", "teacher": "teacher", "baseline": "baseline"}
# Tab10-like colours for the classes in heatmaps and QuPath classifications.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A trained model and what it needs to see: its input µm/px and the tile's size in µm."""

    role: str
    class_names: tuple[str, ...]
    input_mpp: float
    input_px: int
    apply: Callable[[np.ndarray], np.ndarray]  # uint8 (B, px, px, 3) -> probabilities (B, K); B = batch_size
    batch_size: int
    source: str  # the stage folder the parameters came from

    @property
    def tile_um(self) -> float:
        return self.input_px * self.input_mpp


@dataclasses.dataclass(frozen=True)
class RunModel:
    """A finished model of a training workdir: the network, its best parameters and what it reads."""

    role: str
    workdir: pathlib.Path
    stage_dir: pathlib.Path
    net: Any  # models.ResNetGN
    params: Any
    class_names: tuple[str, ...]
    input_px: int
    input_mpp: float | None  # None: a tile-folder run given no teacher µm/px

    def known_mpp(self) -> float:
        """``input_mpp``, or a ValueError with the fix when the run's resolution is unknown."""
        if self.input_mpp is None:
            raise ValueError(f"the run in {self.workdir} was trained on tiles of unknown µm/px; give the teacher's "
                             "resolution (e.g. --teacher_mpp=1.0)")
        return self.input_mpp


def load_run_model(checkpoint_dir: str | pathlib.Path, *, model: str = "student", teacher_mpp: float | None = None,
                   mesh=None) -> RunModel:
    """The finished ``model`` ("student", "teacher" or "baseline") of a training workdir (``checkpoint_dir`` is
    the workdir or any stage folder in it). ``teacher_mpp`` sets the teacher's µm/px when the run's config does
    not (tile-folder data)."""
    if model not in MODEL_STAGES:
        raise ValueError(f"model must be one of {sorted(MODEL_STAGES)}, got {model!r}")
    path = pathlib.Path(checkpoint_dir).expanduser().absolute()
    workdir = path if (path / "config.json").exists() else path.parent
    if not (workdir / "config.json").exists():
        raise FileNotFoundError(f"{checkpoint_dir} is not a training workdir (or a stage folder in one): "
                                "no config.json")
    check_no_old_folders(workdir)
    stage_dir = workdir / MODEL_STAGES[model]
    if not (stage_dir / "result.json").exists():
        raise FileNotFoundError(f"no finished {model} model in {workdir} ({stage_dir} has no result.json)")
    config, run = report.load_run(workdir)
    if config.data.teacher_magnification:
        teacher_mpp = resolution_to_mpp(config.data.teacher_magnification)
    factor = 1 if model == "teacher" else resolve_downsample(config.data)
    input_px = int(run["teacher_px"]) // factor
    net = make_model(config, num_classes=len(run["class_names"]))
    mesh = mesh if mesh is not None else parallel.make_mesh()
    params, _ = checkpoint.load_best_params(stage_dir, params_like=abstract_params(net, input_px=input_px), mesh=mesh)
    return RunModel(role=MODEL_STAGES[model], workdir=workdir, stage_dir=stage_dir, net=net, params=params,
                    class_names=tuple(run["class_names"]), input_px=input_px,
                    input_mpp=None if teacher_mpp is None else teacher_mpp * factor)


def load_predictor(checkpoint_dir: str | pathlib.Path, *, model: str = "student", batch_size: int = 256,
                   teacher_mpp: float | None = None, mesh=None) -> Predictor:
    """``load_run_model`` made ready to run over slides: it needs the run's µm/px."""
    mesh = mesh if mesh is not None else parallel.make_mesh()
    found = load_run_model(checkpoint_dir, model=model, teacher_mpp=teacher_mpp, mesh=mesh)
    input_mpp = found.known_mpp()
    batch_size = int(math.ceil(batch_size / mesh.size) * mesh.size)
    eval_fn = evaluation.make_eval_fn(model=found.net, image_key="image", mesh=mesh)

    def apply(images: np.ndarray) -> np.ndarray:
        return np.asarray(eval_fn(found.params, parallel.put_batch({"image": images}, mesh=mesh)))

    return Predictor(role=found.role, class_names=found.class_names, input_mpp=input_mpp, input_px=found.input_px,
                     apply=apply, batch_size=batch_size, source=str(found.stage_dir))


def tile_strips(coords: np.ndarray, *, side: float, strip_tiles: int) -> list[np.ndarray]:
    """Tile indices grouped into strips: runs of side-by-side tiles of one grid row, left to right, at
    most ``strip_tiles`` each. A gap (glass, or tiles a cascade's teacher is not sent) ends a strip, so
    it is never read."""
    strips = []
    for y in np.unique(coords[:, 1]):
        row = np.flatnonzero(coords[:, 1] == y)
        row = row[np.argsort(coords[row, 0], kind="stable")]
        start = 0
        for i in range(1, len(row) + 1):
            if i == len(row) or i - start >= strip_tiles or coords[row[i], 0] - coords[row[i - 1], 0] > side + 1:
                strips.append(row[start:i])
                start = i
    return strips


def read_strip(slide, *, coords: np.ndarray, level: int, factor: float, base_mpp: float, target_mpp: float,
               px: int, side: float) -> tuple[np.ndarray, int]:
    """The tiles of one strip (level-0 top-lefts ``coords``, one row) as uint8 (n, px, px, 3) at ``target_mpp``,
    and how many level pixels were read for them.

    One read covers the whole strip; each tile is then cut at its position rounded
    to the nearest output pixel (under one output pixel from a per-tile read).
    """
    x_first, y = int(coords[0, 0]), int(coords[0, 1])
    scale = base_mpp / target_mpp  # output px per level-0 px
    width = int(round((coords[-1, 0] + side - x_first) * scale))
    offsets = np.minimum(np.rint((coords[:, 0] - x_first) * scale).astype(int), max(width - px, 0))
    region = slides.read_level_region(slide, level, factor, x0=x_first, y0=y, out_w=max(width, px), out_h=px)
    level_px = math.ceil(region.shape[0] * factor - 1e-6) * math.ceil(region.shape[1] * factor - 1e-6)
    return np.stack([region[:, o:o + px] for o in offsets]), level_px


def _batches(strips: Iterator[tuple[np.ndarray, np.ndarray]], batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tile indices, images) in batches of ``batch_size`` (the last one short), from strips of tiles."""
    idx, imgs, n = [], [], 0
    for index, images in strips:
        idx.append(index)
        imgs.append(images)
        n += len(index)
        while n >= batch_size:
            all_idx, all_imgs = np.concatenate(idx), np.concatenate(imgs)
            yield all_idx[:batch_size], all_imgs[:batch_size]
            idx, imgs, n = [all_idx[batch_size:]], [all_imgs[batch_size:]], n - batch_size
    if n:
        yield np.concatenate(idx), np.concatenate(imgs)


def _prefetched(items: Sequence, fn: Callable, depth: int = 2) -> Iterator:
    """``fn(item)`` for each item, computed ``depth`` items ahead on one thread (OpenSlide reads release the GIL)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = [pool.submit(fn, item) for item in items[:depth]]
        for k in range(len(items)):
            result = pending[k].result()
            if k + depth < len(items):
                pending.append(pool.submit(fn, items[k + depth]))
            pending[k] = None
            yield result


class _Clock:
    """Seconds per phase of one slide's prediction (``with clock("read"): ...`` adds to that phase)."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0


@dataclasses.dataclass(frozen=True)
class Cascade:
    """A teacher that re-reads, at its own magnification, the tiles ``rule`` sends it."""

    teacher: Predictor
    rule: cascade_rules.Rule


def _predict_tiles(slide, *, coords: np.ndarray, predictor: Predictor, base_mpp: float, side: float,
                   strip_tiles: int, clock: _Clock, phase: str, desc: str,
                   show_progress: bool) -> tuple[np.ndarray, int, int]:
    """``predictor``'s probabilities for the tiles at level-0 top-lefts ``coords``, read from its level;
    (probs, level, level pixels read). Time goes to the clock's ``<phase>read``, ``read_wait``, ``compute``."""
    level, factor = slides.choose_level(slide.level_downsamples, base_mpp=base_mpp, target_mpp=predictor.input_mpp)
    strips = tile_strips(coords, side=side, strip_tiles=strip_tiles)
    read_px = [0]

    def read(idx):
        with clock(f"{phase}read"):
            images, region_px = read_strip(slide, coords=coords[idx], level=level, factor=factor, base_mpp=base_mpp,
                                           target_mpp=predictor.input_mpp, px=predictor.input_px, side=side)
        read_px[0] += region_px
        return idx, images

    probs = np.zeros((len(coords), len(predictor.class_names)), np.float32)
    bar = tqdm(total=len(coords), desc=desc, unit="tile", disable=not show_progress, leave=False)
    # read ahead about a batch of tiles, however short the strips (a cascade's teacher reads scattered tiles)
    depth = max(2, math.ceil(predictor.batch_size * len(strips) / len(coords)))
    batches = _batches(_prefetched(strips, read, depth=depth), predictor.batch_size)
    while True:
        with clock(f"{phase}read_wait"):
            idx, images = next(batches, (None, None))
        if idx is None:
            break
        with clock(f"{phase}compute"):
            padded = np.zeros((predictor.batch_size, *images.shape[1:]), np.uint8)
            padded[:len(images)] = images
            probs[idx] = predictor.apply(padded)[:len(images)]
        bar.update(len(idx))
    bar.close()
    return probs, level, read_px[0]


def _check_cascade(cascade: Cascade, predictor: Predictor) -> None:
    teacher = cascade.teacher
    if teacher.class_names != predictor.class_names:
        raise ValueError(f"the cascade's teacher has classes {teacher.class_names}, the student "
                         f"{predictor.class_names}")
    if not math.isclose(teacher.tile_um, predictor.tile_um, rel_tol=1e-3):
        raise ValueError(f"the cascade's teacher sees {teacher.tile_um:.4g} µm tiles, the student "
                         f"{predictor.tile_um:.4g} µm: they must cover the same tissue")


def predict_slide(path: str | pathlib.Path, *, predictor: Predictor, out_dir: str | pathlib.Path,
                  mpp: float | None = None, min_tissue: float = 0.5, thumb_mpp: float = 8.0,
                  heatmap_mpp: float | None = None, strip_tiles: int = 32, label: str | None = None,
                  name: str | None = None, cascade: Cascade | None = None, show_progress: bool = True) -> dict:
    """Run ``predictor`` over the tissue of one slide and write its four outputs, ``out_dir/<name>.*``
    (default name: the slide's stem); returns the summary.

    With a ``cascade``, its teacher then re-reads the tiles its rule picks from ``predictor``'s
    probabilities, and its probabilities replace the student's there; the tile CSV says which model
    decided each tile and the student's confidence, the summary's ``cascade`` how many went where.

    The summary's ``timings_s`` splits the wall time (``seconds``): ``mask`` (thumbnail, tissue
    mask, tile grid), ``read`` (strip reads and decoding, on a background thread, so they overlap
    ``compute``), ``read_wait`` (time the model waited for reads), ``compute`` (the forward passes)
    and ``outputs`` (the heatmap's thumbnail and the four files), and ``teacher_read`` / ``_read_wait``
    / ``_compute`` for a cascade's teacher; ``read_mpx`` counts the level pixels read (millions)."""
    path = pathlib.Path(path)
    name = name or path.stem
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cascade is not None:
        _check_cascade(cascade, predictor)
    started, clock = time.perf_counter(), _Clock()
    with slides.open_slide(path) as slide:
        with clock("mask"):
            resolution = slides.slide_mpp(slide, override=mpp)
            finest = cascade.teacher if cascade else predictor  # the finer reader: the teacher of a cascade
            if resolution.mpp > finest.input_mpp * 1.02:
                raise ValueError(f"level 0 is {resolution.mpp:.3g} µm/px, coarser than the "
                                 f"{'cascade teacher' if cascade else 'model'}'s {finest.input_mpp:.3g} µm/px")
            mask_thumb, mask_mpp = slides.read_thumbnail(slide, base_mpp=resolution.mpp, target_mpp=thumb_mpp)
            mask = slides.mask_of_thumbnail(mask_thumb)
            side = predictor.tile_um / resolution.mpp
            coords, _ = slides.tile_grid(mask, mask_mpp=mask_mpp, base_mpp=resolution.mpp,
                                         slide_dims=slide.dimensions, tile_um=predictor.tile_um,
                                         min_tissue=min_tissue)
        if not len(coords):
            raise ValueError("no tissue tiles (nothing passed the tissue mask and min_tissue)")
        tiles = dict(coords=coords, base_mpp=resolution.mpp, side=side, strip_tiles=strip_tiles, clock=clock,
                     show_progress=show_progress)
        probs, level, read_px = _predict_tiles(slide, predictor=predictor, phase="", desc=path.name, **tiles)
        extra_columns, cascade_summary = {}, {}
        if cascade is not None:
            probs, extra_columns, cascade_summary, teacher_px = _cascade_step(slide, cascade, probs=probs,
                                                                              desc=path.name, **tiles)
            read_px += teacher_px
        with clock("outputs"):
            # default: about 1024 px across the slide's longer side, never finer than level 0; the mask's
            # thumbnail serves when it is no more than 2x finer than that (a second read of a fine level
            # cost 1 s on a 2x-step scan, BENCHMARKS.md)
            heat_mpp = heatmap_mpp or max(resolution.mpp, max(slide.dimensions) * resolution.mpp / 1024)
            close = heatmap_mpp is None and heat_mpp / 2 <= mask_mpp <= heat_mpp
            if close or slides.thumbnail_mpp(slide, base_mpp=resolution.mpp, target_mpp=heat_mpp) == mask_mpp:
                thumb, heat_mpp = mask_thumb, mask_mpp  # the same read: reuse it
            else:
                thumb, heat_mpp = slides.read_thumbnail(slide, base_mpp=resolution.mpp, target_mpp=heat_mpp)
            level_downsample, levels = float(slide.level_downsamples[level]), len(slide.level_downsamples)
    with clock("outputs"):
        write_tile_csv(out_dir / f"{name}.csv", coords=coords, side=side, probs=probs,
                       class_names=predictor.class_names, extra=extra_columns)
        write_geojson(out_dir / f"{name}.geojson", coords=coords, side=side, probs=probs,
                      class_names=predictor.class_names, decided_by=extra_columns.get("decided_by"))
        write_heatmap(out_dir / f"{name}.heatmap.png", thumb=thumb, thumb_mpp=heat_mpp, base_mpp=resolution.mpp,
                      coords=coords, side=side, probs=probs, class_names=predictor.class_names)
    seconds = time.perf_counter() - started
    mean = probs.mean(0)
    summary = {
        "slide": str(path), "slide_resolved": _slide_key(path), "name": name,
        "model": predictor.role, "checkpoint": predictor.source,
        "predicted": predictor.class_names[int(mean.argmax())],
        "probs": {c: round(float(p), 5) for c, p in zip(predictor.class_names, mean)}, "aggregation": "mean",
        **({"label": label} if label else {}),
        "slide_mpp": resolution.mpp, "mpp_source": resolution.source, "input_mpp": predictor.input_mpp,
        "input_px": predictor.input_px, "tile_um": predictor.tile_um, "level": int(level),
        "level_downsample": level_downsample, "levels": levels,
        "tiles": int(len(coords)), "seconds": round(seconds, 3), "tiles_per_s": round(len(coords) / seconds, 1),
        "timings_s": {k: round(v, 4) for k, v in clock.seconds.items()}, "read_mpx": round(read_px / 1e6, 6),
        "heatmap_mpp": heat_mpp, **({"cascade": cascade_summary} if cascade else {}),
    }
    atomic.write_json(out_dir / f"{name}.json", summary, indent=1)  # last: its presence marks the slide done
    return summary


def _cascade_step(slide, cascade: Cascade, *, probs: np.ndarray, coords: np.ndarray, desc: str,
                  **tiles: Any) -> tuple[np.ndarray, dict, dict, int]:
    """The teacher's pass over the tiles the rule picks from the student's ``probs``: (probs with the
    teacher's where it decided, the CSV's extra columns, the summary's ``cascade``, level pixels read)."""
    confidence = cascade.rule.confidence(probs)
    to_teacher = cascade.rule.to_teacher(confidence)
    probs, teacher_level, read_px = probs.copy(), None, 0
    if to_teacher.any():
        chosen = np.flatnonzero(to_teacher)
        probs[chosen], teacher_level, read_px = _predict_tiles(
            slide, coords=coords[chosen], predictor=cascade.teacher, phase="teacher_", desc=f"{desc} (teacher)",
            **tiles)
    columns = {"decided_by": np.where(to_teacher, "teacher", "student"),
               f"student_{cascade.rule.score}": np.round(confidence, 5)}
    summary = {**cascade.rule.describe(), "teacher_checkpoint": cascade.teacher.source,
               "teacher_input_mpp": cascade.teacher.input_mpp, "teacher_input_px": cascade.teacher.input_px,
               "teacher_level": teacher_level, "to_teacher": int(to_teacher.sum()),
               "teacher_share": round(float(to_teacher.mean()), 5)}
    return probs, columns, summary, read_px


def _rectangles(coords: np.ndarray, side: float) -> np.ndarray:
    """(N, 4) minx, miny, width, height in level-0 px (the tile's extent rounded to whole pixels)."""
    size = int(round(side))
    return np.column_stack([coords[:, 0], coords[:, 1], np.full(len(coords), size), np.full(len(coords), size)])


def write_tile_csv(path: pathlib.Path, *, coords: np.ndarray, side: float, probs: np.ndarray,
                   class_names: Sequence[str], extra: dict[str, np.ndarray] | None = None) -> None:
    """One row per tile: its rectangle, class probabilities and the ``extra`` columns (one value per tile)."""
    extra = extra or {}
    with atomic.atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["minx", "miny", "width", "height", *(f"prob_{c}" for c in class_names), *extra])
        for i, (rect, p) in enumerate(zip(_rectangles(coords, side), probs)):
            writer.writerow([*rect.tolist(), *(f"{v:.5f}" for v in p), *(column[i] for column in extra.values())])


def write_geojson(path: pathlib.Path, *, coords: np.ndarray, side: float, probs: np.ndarray,
                  class_names: Sequence[str], decided_by: Sequence[str] | None = None) -> None:
    """A FeatureCollection of tile polygons (level-0 px, as QuPath expects), classified by the top class,
    with every class probability as a measurement (and, in a cascade, the model that decided it)."""
    features = []
    for i, ((x, y, w, h), p) in enumerate(zip(_rectangles(coords, side).tolist(), probs)):
        top = int(p.argmax())
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]},
            "properties": {
                "objectType": "tile",
                "classification": {"name": class_names[top], "color": list(PALETTE[top % len(PALETTE)])},
                "measurements": {f"prob_{c}": round(float(v), 5) for c, v in zip(class_names, p)},
                **({"decided_by": str(decided_by[i])} if decided_by is not None else {}),
            },
        })
    atomic.write_json(path, {"type": "FeatureCollection", "features": features}, indent=None)


def write_heatmap(path: pathlib.Path, *, thumb: np.ndarray, thumb_mpp: float, base_mpp: float, coords: np.ndarray,
                  side: float, probs: np.ndarray, class_names: Sequence[str]) -> None:
    """The thumbnail with each tile tinted by its top class (stronger when more certain), and a legend."""
    h, w = thumb.shape[:2]
    colour = np.zeros((h, w, 3), np.uint16)
    alpha = np.zeros((h, w, 1), np.uint16)  # in 256ths
    scale = base_mpp / thumb_mpp
    k = len(class_names)
    top = probs.argmax(1)
    certainty = (probs.max(1) - 1 / k) / (1 - 1 / k) if k > 1 else np.ones(len(probs))
    weight = np.rint(256 * (0.35 + 0.4 * np.clip(certainty, 0.0, 1.0))).astype(np.uint16)
    for (x, y), c, a in zip(coords.tolist(), top.tolist(), weight.tolist()):
        x0, y0 = int(x * scale), int(y * scale)
        x1, y1 = max(x0 + 1, int(round((x + side) * scale))), max(y0 + 1, int(round((y + side) * scale)))
        colour[y0:y1, x0:x1] = PALETTE[c % len(PALETTE)]
        alpha[y0:y1, x0:x1] = a
    # integer blend, rounded: (thumb (256 - a) + colour a) / 256 stays below 2^16; a = 0 leaves the thumbnail as it is
    blended = ((thumb.astype(np.uint16) * (256 - alpha) + colour * alpha + 128) >> 8).astype(np.uint8)
    legend_h = 16 * k + 24
    canvas = Image.new("RGB", (max(w, 220), h + legend_h), "white")
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(class_names):
        y = h + 4 + 16 * c
        draw.rectangle((4, y, 16, y + 12), fill=PALETTE[c % len(PALETTE)])
        draw.text((22, y), name, fill="black")
    draw.text((4, h + 4 + 16 * k), f"{thumb_mpp:.3g} µm/px; top class per tile".replace("µ", "u"), fill="black")
    with atomic.atomic_open(path, "wb") as handle:
        canvas.save(handle, format="PNG", compress_level=1)  # 0.07 s vs 0.10 s at level 6 (1280 px)


OUTPUT_SUFFIXES = (".json", ".csv", ".geojson", ".heatmap.png")


def outputs_complete(name: str, out_dir: str | pathlib.Path) -> bool:
    """All four outputs ``out_dir/<name>.*`` exist (each is written atomically, so existing means complete)."""
    return all((pathlib.Path(out_dir) / f"{name}{s}").exists() for s in OUTPUT_SUFFIXES)


def _slide_key(path: str | pathlib.Path) -> str:
    """What identifies a slide across runs: its resolved absolute path."""
    return str(pathlib.Path(path).expanduser().resolve())


# Files of the run itself in --out (skipped_slides.csv, summary.json): a slide of that stem is named by its hash.
RESERVED_NAMES = ("skipped_slides", "summary")


def hashed_name(path: str | pathlib.Path) -> str:
    """``<stem>-<8 hex digits of the SHA-256 of the resolved path>``: the name of a slide whose stem clashes."""
    return f"{pathlib.Path(path).stem}-{hashlib.sha256(_slide_key(path).encode()).hexdigest()[:8]}"


def _summary_owner(summary_file: pathlib.Path) -> str | None:
    """The resolved slide path a summary was written for; None where there is no readable summary."""
    try:
        summary = json.loads(summary_file.read_text())
        return summary.get("slide_resolved") or _slide_key(summary["slide"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def output_names(paths: Sequence[str | pathlib.Path], *, out_dir: str | pathlib.Path) -> list[str]:
    """The output name of each slide: its plain stem where that is unique in the run and not taken in
    ``out_dir`` by another slide, else ``hashed_name`` (stem plus a hash of the resolved path).

    Names already in ``out_dir`` for the same slide are kept (so a rerun, whatever else it lists, finds
    the slide's outputs complete); stems compare case-insensitively (``X.svs`` and ``x.svs`` are one
    file name on macOS and Windows disks).
    """
    out_dir = pathlib.Path(out_dir)
    keys = [_slide_key(p) for p in paths]
    slides_per_stem = collections.Counter(pathlib.Path(p).stem.casefold() for p in dict(zip(keys, paths)).values())
    names = []
    for path, key in zip(paths, keys):
        plain, hashed = pathlib.Path(path).stem, hashed_name(path)
        plain_owner = _summary_owner(out_dir / f"{plain}.json")
        if _summary_owner(out_dir / f"{hashed}.json") == key:
            names.append(hashed)
        elif plain_owner == key:
            names.append(plain)
        elif (slides_per_stem[plain.casefold()] > 1 or (out_dir / f"{plain}.json").exists()
              or plain.casefold() in RESERVED_NAMES):
            names.append(hashed)
        else:
            names.append(plain)
    return names


def _producer(checkpoint: str | None, cascade: dict | None) -> dict:
    """What makes a slide's outputs: the model's checkpoint, and a cascade's teacher and rule."""
    rule = {k: cascade.get(k) for k in ("teacher_checkpoint", "score", "threshold", "budget")} if cascade else None
    return {"checkpoint": checkpoint, "cascade": rule}


def _made_by(summary: dict) -> dict:
    return _producer(summary.get("checkpoint"), summary.get("cascade"))


def _made_by_now(predictor: Predictor, cascade: Cascade | None) -> dict:
    rule = None if cascade is None else {"teacher_checkpoint": cascade.teacher.source, **cascade.rule.describe()}
    return _producer(predictor.source, rule)


def predict_slides(entries: Sequence[tuple[pathlib.Path, float | None, str | None]], *, predictor: Predictor,
                   out_dir: str | pathlib.Path, overwrite: bool = False, **kwargs: Any) -> tuple[list[dict], list]:
    """Every slide of ``entries`` ((path, mpp override or None, label or None)); (summaries, skipped).

    Outputs are named by ``output_names``; each summary says its ``name``. A slide whose outputs are
    complete, from the same model (and cascade), is not recomputed (unless ``overwrite``); a bad one is
    skipped with a one-line reason, logged and listed in ``out_dir/skipped_slides.csv``, and the rest go on.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries, skipped = [], []
    names = output_names([path for path, _, _ in entries], out_dir=out_dir)
    for (path, mpp, label), name in zip(entries, names):
        if not overwrite and outputs_complete(name, out_dir):
            done = json.loads((out_dir / f"{name}.json").read_text())
            if _made_by(done) == _made_by_now(predictor, kwargs.get("cascade")):
                summaries.append({**done, "name": name})
                log.info("%s: outputs complete (%s.*), not recomputed", path, name)
                continue
            log.warning("%s: the outputs in %s were made by %s: recomputed", path, out_dir, _made_by(done))
        try:
            summaries.append(predict_slide(path, predictor=predictor, out_dir=out_dir, mpp=mpp, label=label,
                                           name=name, **kwargs))
        except (OSError, ValueError, openslide.OpenSlideError) as err:
            reason = first_line(err)
            log.warning("skipping slide %s: %s", path, reason)
            skipped.append((str(path), reason))
    with atomic.atomic_open(out_dir / "skipped_slides.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["slide", "reason"])
        writer.writerows(skipped)
    return summaries, skipped


def slide_entries(inputs: Sequence[str]) -> list[tuple[pathlib.Path, float | None, str | None]]:
    """Slides from command-line arguments: slide files, or manifest CSVs (``slide`` column, optional ``mpp``
    and ``label``; paths relative to the CSV). A manifest without a ``slide`` column is an error."""
    entries = []
    for item in inputs:
        path = pathlib.Path(item).expanduser()
        if path.suffix.lower() != ".csv":
            entries.append((path, None, None))
            continue
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if rows and "slide" not in rows[0]:
            raise ValueError(f"{path}: a manifest needs a 'slide' column, got {list(rows[0])}")
        for row in rows:
            slide = pathlib.Path(row["slide"])
            mpp = float(row["mpp"]) if (row.get("mpp") or "").strip() else None
            entries.append((slide if slide.is_absolute() else path.parent / slide, mpp, (row.get("label") or None)))
    return entries
