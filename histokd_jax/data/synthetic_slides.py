"""Synthetic whole-slide images: pyramidal tiled TIFFs that OpenSlide opens as generic TIFF.

Each slide is a canvas of H&E-like tissue built from ``synthetic.render_tile``
tiles on white glass, so a slide-level pipeline (tissue detection, tiling at a
chosen µm/px, weak slide labels) can be exercised end to end without real data.

* Tissue: an irregular blob (smooth noise minus a radial fall-off, thresholded
  so that about ``1 - background_fraction`` of the slide is tissue, with a soft
  edge a few pixels wide); everything else is near-white glass.
* Labels: a labelled slide uses tiles of its class only (tiles inherit the
  slide label); ``label=None`` gives an unlabelled slide of 3-5 Voronoi regions
  of random classes (every class appears).
* Seams: tiles are laid out with a ``tile_px // 8`` overlap and cross-faded, so
  there are no hard grid lines (each tile is still rendered at ``tile_px``, so
  the tissue scale matches the tile dataset at the same µm/px).
* File: one page per level (not SubIFDs), 256x256 JPEG tiles stored as RGB (no
  chroma subsampling), reduced levels marked ``subfiletype=1``, and
  ``XResolution``/``YResolution`` in pixels per centimetre, from which OpenSlide
  derives ``openslide.mpp-x``/``openslide.mpp-y`` (it also exposes the raw
  ``tiff.XResolution``/``tiff.YResolution``/``tiff.ResolutionUnit``).
  Level k is the area (block-mean) downsample of level 0 by ``levels[k]``.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tifffile

from histokd_jax import atomic
from histokd_jax.data import multiscale, process_pool
from histokd_jax.data.render_ops import smooth_noise as _smooth_noise
from histokd_jax.data.synthetic import CLASS_NAMES, render_tile, stored_meta
from histokd_jax.data.views import area_downsample

__all__ = ["render_slide", "write_slide", "write_slide_set", "true_classes", "write_pyramid_tiff", "DEFAULT_SPLITS"]

GENERATOR_VERSION = 1
DEFAULT_SPLITS: dict[str, float] = {"train": 0.6, "val": 0.2, "test": 0.2}
_TIFF_TILE = 256
_LAYOUT_CODE, _TILE_CODE, _SET_CODE = 1, 2, 3  # SeedSequence streams


def render_slide(*, label: int | None, seed: int, tile_grid: tuple[int, int] = (8, 8), tile_px: int = 64,
                 background_fraction: float = 0.4, generator: str = "chromatin", evidence: float = 1.0,
                 mpp: float = 1.0) -> tuple[np.ndarray, dict]:
    """Level-0 RGB uint8 (rows*tile_px, cols*tile_px, 3) and diagnostics:
    ``tissue_fraction`` (rows, cols; tissue share of each tile_px cell) and
    ``tile_labels`` (rows, cols; class at each cell centre).

    ``generator``: "chromatin" (cross-faded ``synthetic.render_tile`` tiles, evidence in nuclear
    texture only) or "multiscale" (``multiscale.render_tissue`` drawn over the whole canvas at
    ``mpp`` µm/px, evidence at three scales set by ``evidence``)."""
    rows, cols = (int(v) for v in tile_grid)
    if rows < 1 or cols < 1:
        raise ValueError(f"tile_grid must be positive, got {tile_grid}")
    if label is not None and not 0 <= int(label) < len(CLASS_NAMES):
        raise ValueError(f"label must be None or in [0, {len(CLASS_NAMES)}), got {label}")
    if not 0.0 <= background_fraction < 1.0:
        raise ValueError(f"background_fraction must be in [0, 1), got {background_fraction}")
    h, w = rows * tile_px, cols * tile_px
    layout = np.random.default_rng(np.random.SeedSequence([int(seed), _LAYOUT_CODE]))
    class_at = _class_layout(layout, label=label, h=h, w=w)
    if generator == "multiscale":
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), _TILE_CODE]))
        tissue = multiscale.render_tissue(rng, shape=(h, w), class_at=class_at, mpp=mpp, evidence=evidence)[0]
    elif generator == "chromatin":
        tissue = _chromatin_tissue(seed=seed, class_at=class_at, h=h, w=w, tile_px=tile_px)
    else:
        raise ValueError(f"generator must be 'chromatin' or 'multiscale', got {generator!r}")
    return _on_glass(tissue, layout=layout, class_at=class_at, rows=rows, cols=cols, tile_px=tile_px,
                     background_fraction=background_fraction)


def _chromatin_tissue(*, seed: int, class_at, h: int, w: int, tile_px: int) -> np.ndarray:
    """The chromatin-only generator's tissue: ``render_tile`` tiles cross-faded over their overlaps."""
    # tiles at stride tile_px - ov, cross-faded over the ov-pixel overlaps
    ov = max(2, tile_px // 8)
    stride = tile_px - ov
    ramp = np.minimum(1.0, (np.arange(tile_px) + 0.5) / ov)
    win = np.minimum(ramp, ramp[::-1])
    win = (win[:, None] * win[None, :]).astype(np.float32)
    acc = np.zeros((h, w, 3), np.float32)
    wsum = np.zeros((h, w, 1), np.float32)
    for i in range(math.ceil((h - ov) / stride)):
        for j in range(math.ceil((w - ov) / stride)):
            y0, x0 = i * stride, j * stride
            cls = int(class_at(y0 + tile_px / 2, x0 + tile_px / 2))
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), _TILE_CODE, i, j]))
            tile = render_tile(rng, cls, tile_px=tile_px)
            th, tw = min(tile_px, h - y0), min(tile_px, w - x0)
            acc[y0:y0 + th, x0:x0 + tw] += win[:th, :tw, None] * tile[:th, :tw]
            wsum[y0:y0 + th, x0:x0 + tw] += win[:th, :tw, None]
    return acc / wsum


def _on_glass(tissue: np.ndarray, *, layout, class_at, rows: int, cols: int, tile_px: int,
              background_fraction: float) -> tuple[np.ndarray, dict]:
    """The tissue cut to an irregular blob on near-white glass, and the diagnostics."""
    h, w = rows * tile_px, cols * tile_px
    # tissue blob: smooth noise minus a radial fall-off, soft-thresholded at the background quantile
    n = max(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((yy + 0.5) / h * 2 - 1) ** 2 + ((xx + 0.5) / w * 2 - 1) ** 2
    field = _smooth_noise(layout, 1, n, 3)[0, :h, :w] + 0.6 * _smooth_noise(layout, 1, n, 7)[0, :h, :w] - 0.8 * r2
    if background_fraction > 0:
        gy, gx = np.gradient(field)
        edge = 3.0 * float(np.median(np.hypot(gy, gx)))  # ~3 px soft edge
        alpha = np.clip((field - np.quantile(field, background_fraction)) / edge + 0.5, 0.0, 1.0)
    else:
        alpha = np.ones((h, w), np.float32)
    glass = layout.uniform(238.0, 248.0) + layout.uniform(-2.0, 2.0, 3).astype(np.float32)
    glass = glass + layout.normal(0.0, 1.2, (h, w, 3)).astype(np.float32)
    a = alpha[..., None].astype(np.float32)
    rgb = np.clip(np.rint(a * tissue + (1 - a) * glass), 0, 255).astype(np.uint8)
    centre = (np.arange(rows)[:, None] + 0.5) * tile_px, (np.arange(cols)[None, :] + 0.5) * tile_px
    info = {"tissue_fraction": alpha.reshape(rows, tile_px, cols, tile_px).mean((1, 3)),
            "tile_labels": class_at(*np.broadcast_arrays(*centre)).astype(np.int64)}
    return rgb, info


def _class_layout(layout: np.random.Generator, *, label: int | None, h: int, w: int):
    """``class_at(y, x)`` for level-0 px: the slide's label, or for an unlabelled slide Voronoi regions
    of random classes (each class at least once). Draws from ``layout`` first, so the layout is
    reproducible from the seed alone (``true_classes``)."""
    if label is not None:
        return lambda y, x: np.full(np.broadcast(y, x).shape, int(label))
    k = int(layout.integers(3, 6))
    centres = layout.random((k, 2)) * (h, w)
    region_class = layout.permutation(np.resize(np.arange(len(CLASS_NAMES)), k))

    def class_at(y, x):
        d = (np.asarray(y)[..., None] - centres[:, 0]) ** 2 + (np.asarray(x)[..., None] - centres[:, 1]) ** 2
        return region_class[np.argmin(d, axis=-1)]
    return class_at


def true_classes(*, label: int | None, seed: int, tile_grid: tuple[int, int], tile_px: int,
                 x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The tissue class at level-0 points (x, y) of the slide ``render_slide`` draws with these
    arguments: ground truth for tiles of unlabelled (mixed) slides."""
    h, w = int(tile_grid[0]) * tile_px, int(tile_grid[1]) * tile_px
    layout = np.random.default_rng(np.random.SeedSequence([int(seed), _LAYOUT_CODE]))
    return _class_layout(layout, label=label, h=h, w=w)(np.asarray(y, np.float64), np.asarray(x, np.float64))


def _check_levels(levels: Sequence[int], h: int, w: int) -> list[int]:
    lv = [int(f) for f in levels]
    if not lv or lv[0] != 1 or any(b <= a for a, b in zip(lv, lv[1:])):
        raise ValueError(f"levels must start at 1 and increase strictly, got {tuple(levels)}")
    bad = [f for f in lv if h % f or w % f]
    if bad:
        raise ValueError(f"level-0 size {w}x{h} is not divisible by downsample(s) {bad}")
    return lv


def write_pyramid_tiff(path: str | os.PathLike, level0: np.ndarray, *, mpp: float = 1.0,
                       levels: Sequence[int] = (1, 4, 16), jpeg_quality: int = 90,
                       description: str | None = None) -> list[int]:
    """Write uint8 RGB ``level0`` as a pyramidal JPEG-tiled TIFF that OpenSlide opens (one page per
    level, reduced levels ``subfiletype=1``, resolution tags giving ``mpp``); returns the levels.
    Written to a temporary name and renamed, so a crash never leaves a half slide."""
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be positive, got {mpp}")
    path = Path(path)
    h, w = level0.shape[:2]
    lv = _check_levels(levels, h, w)
    with atomic.atomic_open(path, "wb") as handle, tifffile.TiffWriter(handle, bigtiff=h * w * 3 > 2**31) as tif:
        for k, f in enumerate(lv):
            img = area_downsample(level0, f)
            res = 1e4 / (mpp * f)  # pixels per centimetre
            tif.write(img, photometric="rgb", tile=(_TIFF_TILE, _TIFF_TILE), compression="jpeg",
                      compressionargs={"level": int(jpeg_quality), "outcolorspace": "RGB"},
                      subsampling=(1, 1), subfiletype=1 if k else 0, resolution=(res, res),
                      resolutionunit="CENTIMETER", metadata=None, description=description if k == 0 else None)
    return lv


def write_slide(path: str | os.PathLike, *, label: int | None, seed: int, tile_grid: tuple[int, int] = (8, 8),
                tile_px: int = 64, mpp: float = 1.0, levels: Sequence[int] = (1, 4, 16),
                background_fraction: float = 0.4, jpeg_quality: int = 90, generator: str = "chromatin",
                evidence: float = 1.0) -> dict:
    """Write one pyramidal JPEG-tiled TIFF slide and return what was written."""
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be positive, got {mpp}")
    h, w = int(tile_grid[0]) * tile_px, int(tile_grid[1]) * tile_px
    _check_levels(levels, h, w)
    level0, info = render_slide(label=label, seed=seed, tile_grid=tile_grid, tile_px=tile_px,
                                background_fraction=background_fraction, generator=generator, evidence=evidence,
                                mpp=mpp)
    lv = write_pyramid_tiff(path, level0, mpp=mpp, levels=levels, jpeg_quality=jpeg_quality,
                            description=json.dumps({"generator": "histokd_jax.synthetic_slides",
                                                    "version": GENERATOR_VERSION, "seed": int(seed)}))
    return {"path": str(path), "label": None if label is None else int(label),
            "label_name": "" if label is None else class_names(generator)[int(label)], "seed": int(seed), "mpp": float(mpp),
            "levels": lv, "level_dimensions": [(w // f, h // f) for f in lv],  # (width, height) as OpenSlide
            "tile_px": int(tile_px), "tile_grid": (h // tile_px, w // tile_px), **info}


def class_names(generator: str) -> tuple[str, ...]:
    """The classes a generator draws (label index order)."""
    if generator == "multiscale":
        return multiscale.CLASS_NAMES
    return CLASS_NAMES


def _split_counts(n: int, splits: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder apportionment of n slides; every positive split gets one if n allows."""
    names = [s for s in ("train", "val", "test") if splits.get(s, 0) > 0]
    raw = np.array([splits[s] for s in names], float) / sum(splits[s] for s in names) * n
    cnt = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - cnt), kind="stable")[: n - cnt.sum()]:
        cnt[i] += 1
    for i in range(len(names)):
        if cnt[i] == 0 and n >= len(names):
            cnt[int(np.argmax(cnt))] -= 1
            cnt[i] += 1
    return dict(zip(names, (int(c) for c in cnt)))


def _check_existing(root: Path, params: dict) -> Path | None:
    meta = stored_meta(root, params, meta_name="synthetic_slides.json", what="synthetic slide set",
                       required=("manifest.csv",))
    return None if meta is None else root / "manifest.csv"


def _write_job(job: tuple[int, tuple[int | None, str, int]], *, root: Path, **settings) -> dict:
    k, (label, _split, seed) = job
    return write_slide(root / f"slides/slide_{k:04d}.tiff", label=label, seed=seed, **settings)


def write_slide_set(root: str | os.PathLike, *, seed: int, n_per_class: int | Mapping[str, int] = 4,
                    n_unlabeled: int = 2, splits: Mapping[str, float] = DEFAULT_SPLITS,
                    tile_grid: tuple[int, int] = (8, 8), tile_px: int = 64, mpp: float = 1.0,
                    levels: Sequence[int] = (1, 4, 16), background_fraction: float = 0.4,
                    generator: str = "chromatin", evidence: float = 1.0, n_test_per_class: int = 0,
                    show_progress: bool = False, workers: int | None = None) -> Path:
    """Write ``root/slides/*.tiff``, ``root/manifest.csv`` (slide,label,split,mpp) and
    ``root/synthetic_slides.json``; return the manifest path.

    ``n_per_class``: slides per class (int) or {class name: count}; ``splits``:
    fractions for train/val/test, apportioned per class (each split with a
    positive fraction gets a slide of every class that has enough slides).
    ``n_test_per_class`` adds that many test slides per class beyond the apportioned ones (the
    paper's regime: few labelled slides, a test set large enough for narrow intervals).
    Unlabelled slides are mixed-class and go to ``train`` with an empty label.
    ``workers`` processes draw the slides (default: one per core for sets of 16 slides or more); each
    slide depends only on its seed, so the set is the same for any number.
    Idempotent: same parameters reuse the set, different ones raise ValueError;
    the set is built in a temporary sibling directory and renamed into place."""
    root = Path(root)
    names = class_names(generator)
    counts = dict.fromkeys(names, int(n_per_class)) if isinstance(n_per_class, int) else (
        {c: int(n_per_class.get(c, 0)) for c in names})
    if not isinstance(n_per_class, int) and set(n_per_class) - set(names):
        raise ValueError(f"unknown class names in n_per_class: {sorted(set(n_per_class) - set(names))}")
    if set(splits) - {"train", "val", "test"} or min(splits.values(), default=-1) < 0 or sum(splits.values()) <= 0:
        raise ValueError(f"splits must map train/val/test to non-negative fractions, got {dict(splits)}")
    if min(counts.values()) < 0 or n_unlabeled < 0 or int(seed) < 0 or n_test_per_class < 0:
        raise ValueError("seed, n_per_class and n_unlabeled must be non-negative")
    params = {"generator_version": GENERATOR_VERSION, "class_names": list(names), "seed": int(seed),
              "n_per_class": counts, "n_unlabeled": int(n_unlabeled),
              "splits": {k: float(v) for k, v in sorted(splits.items())}, "tile_grid": [int(v) for v in tile_grid],
              "tile_px": int(tile_px), "mpp": float(mpp), "levels": [int(f) for f in levels],
              "background_fraction": float(background_fraction)}
    if generator != "chromatin":  # the chromatin sets written before these knobs existed stay valid
        params.update(generator=generator, evidence=float(evidence))
    if n_test_per_class:
        params["n_test_per_class"] = int(n_test_per_class)
    existing = _check_existing(root, params)
    if existing is not None:
        return existing

    def slide_seed(c: int, i: int) -> int:
        return int(np.random.SeedSequence([int(seed), _SET_CODE, c, i]).generate_state(1)[0])

    jobs = []  # (class index or None, split, per-slide seed); unlabelled slides use stream len(CLASS_NAMES)
    for c, name in enumerate(names):
        order = [s for s, m in _split_counts(counts[name], params["splits"]).items() for _ in range(m)]
        order += ["test"] * int(n_test_per_class)
        jobs += [(c, split, slide_seed(c, i)) for i, split in enumerate(order)]
    jobs += [(None, "train", slide_seed(len(names), i)) for i in range(int(n_unlabeled))]
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        (tmp / "slides").mkdir()
        write = functools.partial(_write_job, root=tmp, tile_grid=tuple(params["tile_grid"]),
                                  tile_px=params["tile_px"], mpp=params["mpp"], levels=params["levels"],
                                  background_fraction=params["background_fraction"], generator=generator,
                                  evidence=float(evidence))
        written = process_pool.map_in_order(write, list(enumerate(jobs)), workers=workers)
        if show_progress:
            from tqdm.auto import tqdm
            written = tqdm(written, total=len(jobs), desc=f"synthetic slides -> {root.name}", unit="slide")
        rows, slides = [], []
        for (k, (c, split, s)), out in zip(enumerate(jobs), written):
            rel = f"slides/slide_{k:04d}.tiff"
            rows.append((rel, out["label_name"], split, repr(params["mpp"])))
            present = out["tile_labels"][out["tissue_fraction"] > 0.5]  # diagnostics: true classes in tissue
            slides.append({"slide": rel, "label": out["label_name"], "split": split, "seed": int(s),
                           "tissue_fraction": round(float(out["tissue_fraction"].mean()), 4),
                           "classes_present": sorted({names[i] for i in present})})
        with open(tmp / "manifest.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("slide", "label", "split", "mpp"))
            writer.writerows(rows)
        meta = {"format": "histokd_jax.synthetic_slides", "params": params, "slides": slides}
        (tmp / "synthetic_slides.json").write_text(json.dumps(meta, indent=1))
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # an empty placeholder directory may be replaced
        try:
            os.rename(tmp, root)
        except OSError:  # another writer finished first: accept it only if identical
            if _check_existing(root, params) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / "manifest.csv"
