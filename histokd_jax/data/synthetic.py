"""Deterministic synthetic H&E-like tiles for the embedded demo and the tests.

No pathology dataset can be downloaded here, so the demo trains on generated
tiles whose class evidence is, by construction, *fine detail*: a teacher that
sees 64 px tiles can learn it, a student that sees the same tile area-
downsampled 4x (16 px) mostly cannot, which is what resolution-based knowledge
distillation is meant to help with.

Design
------
* Stain model: Beer-Lambert.  Per-pixel haematoxylin (H) and eosin (E) optical
  densities are mixed with H ~ (0.65, 0.70, 0.29) and E ~ (0.07, 0.99, 0.11)
  (unit vectors) and turned into RGB as ``I0 * 10**-OD``: pink fibrous stroma,
  purple-blue nuclei, white gaps.
* Classes (``CLASS_NAMES``) are nuclear chromatin patterns: ``solid`` (uniform),
  ``speckled`` (fine ~1 px granules on a pale base), ``vesicular`` (pale centre,
  dark rim, one nucleolus).  Every nucleus is rescaled to the same mean H OD
  over its area, so total haematoxylin does not depend on the class, and the
  granule spread / nucleolus weight are chosen so that all patterns have about
  the same radial second moment of H (~R**2 / 2): a 4x area average then
  erases most of the pattern.
* Coarse structure carries only weak, overlapping evidence: class-dependent
  nuclear size and count are traded off so nuclear area (hence H per tile) is
  class-independent, and both get a large per-tile jitter.
* Nuisances: per-tile stain strength and stain-vector hue, stroma texture,
  white gaps, nuclear density, pattern purity (a fraction of nuclei drawn with
  another class's pattern), Gaussian blur and sensor noise.
* Scale: a tile always covers the same tissue; lengths are defined for 64 px
  and scaled by ``tile_px / 64`` (the nucleus count does not change).
* Determinism: every tile's generator is seeded by ``(seed, split, index)``
  through ``np.random.SeedSequence``, so a tile never changes when the size of
  another split changes.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from histokd_jax.data import multiscale
from histokd_jax.data.render_ops import blur as _blur, gauss as _gauss, smooth_noise as _smooth_noise
from histokd_jax.data.views import area_downsample

__all__ = ["CLASS_NAMES", "render_tile", "write_tile_folder", "contact_sheet"]

CLASS_NAMES: tuple[str, ...] = ("solid", "speckled", "vesicular")
GENERATOR_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "test", "unlabeled")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2, "unlabeled": 3}
_UNLABELED_PERM_CODE = 4

_H_OD = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
_E_OD = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])
# (relative nuclear radius, relative nuclear count) per class; r**2 * count ~ 1
# keeps nuclear area (so H per tile) equal while leaving a weak coarse cue.
_COARSE = ((0.93, 1.16), (1.0, 1.0), (1.07, 0.87))
_BASE_RADIUS = 4.0  # px at 64 px
_BASE_COUNT = 18.0  # nuclei per tile (the tile covers the same tissue at any tile_px)


@functools.lru_cache(maxsize=8)
def _grid(tile_px: int) -> np.ndarray:
    """Read-only pixel coordinates in 64-px units (cached: every tile needs them)."""
    g = np.mgrid[0:tile_px, 0:tile_px].astype(np.float32) * np.float32(64.0 / tile_px)
    g.flags.writeable = False
    return g


def _nuclei_h(rng: np.random.Generator, label: int, tile_px: int, s: float) -> np.ndarray:
    """Haematoxylin OD map of all nuclei of one tile (stamped with wrap-around)."""
    n_cls = len(CLASS_NAMES)
    r_rel, c_rel = _COARSE[label]
    radius = _BASE_RADIUS * s * r_rel * np.exp(rng.normal(0.0, 0.12))
    n = max(1, rng.poisson(_BASE_COUNT * c_rel * np.exp(rng.normal(0.0, 0.25))))
    purity = rng.uniform(0.55, 0.95)
    od_nuc = rng.uniform(0.55, 0.85)

    f32 = np.float32  # float32 halves the cost of the transcendental ops
    r_n = (radius * np.exp(rng.normal(0.0, 0.08, n))).astype(f32)
    elong = np.sqrt(rng.uniform(1.0, 1.5, n)).astype(f32)
    a, b = r_n * elong, r_n / elong
    ang = rng.uniform(0.0, np.pi, n).astype(f32)
    cy, cx = rng.uniform(0.0, tile_px, (2, n))
    iy, ix = np.floor(cy).astype(int), np.floor(cx).astype(int)
    half = int(np.ceil(a.max() + 1.5 * s + 1))
    d = np.arange(-half, half + 1)
    dy = d.astype(f32)[None, :, None] - (cy - iy).astype(f32)[:, None, None]
    dx = d.astype(f32)[None, None, :] - (cx - ix).astype(f32)[:, None, None]
    c, sn = np.cos(ang)[:, None, None], np.sin(ang)[:, None, None]
    u, v = dx * c + dy * sn, -dx * sn + dy * c
    rho = np.sqrt((u / a[:, None, None]) ** 2 + (v / b[:, None, None]) ** 2)
    mask = np.clip((1.0 - rho) * r_n[:, None, None] / (0.8 * s) + 0.5, 0.0, 1.0)

    pattern = np.where(rng.random(n) < purity, label, (label + rng.integers(1, n_cls, n)) % n_cls)
    # granule radius 1.05 and nucleolus weight 1.8 match the radial 2nd moment of a solid disk
    tex = mask.copy()  # solid: uniform chromatin
    sp = pattern == 1  # speckled: ~1 px granules scattered inside the nucleus
    gr, gphi = 1.05 * np.sqrt(rng.random((n, 10), f32)), rng.uniform(0, 2 * np.pi, (n, 10)).astype(f32)
    gu, gv = gr * np.cos(gphi) * a[:, None], gr * np.sin(gphi) * b[:, None]
    c1, s1 = c[:, :, 0], sn[:, :, 0]  # isotropic granules: separable in unrotated (y, x)
    gy, gx = (gu * s1 + gv * c1)[sp, :, None], (gu * c1 - gv * s1)[sp, :, None]
    ey = _gauss((dy[sp, None, :, 0] - gy) ** 2 / (2 * (0.6 * s) ** 2))
    ex = _gauss((dx[sp, None, 0, :] - gx) ** 2 / (2 * (0.6 * s) ** 2))
    tex[sp] *= 0.2 + np.einsum("nkq,nkr->nqr", ey, ex)
    ve = pattern == 2  # vesicular: thin dark rim, pale centre, one nucleolus
    nr, nphi = 0.3 * rng.random(n, f32) * r_n, rng.uniform(0, 2 * np.pi, n).astype(f32)
    nu, nv = (nr * np.cos(nphi))[ve, None, None], (nr * np.sin(nphi))[ve, None, None]
    nucleolus = _gauss(((u[ve] - nu) ** 2 + (v[ve] - nv) ** 2) / (2 * (0.8 * s) ** 2))
    tex[ve] *= 0.12 + _gauss(((rho[ve] - 0.8) / 0.14) ** 2) + 1.8 * nucleolus
    # equal mean H OD over the nuclear area for every pattern
    tex *= (od_nuc * mask.sum((1, 2)) / np.maximum(tex.sum((1, 2)), 1e-9))[:, None, None]

    flat = ((iy[:, None, None] + d[None, :, None]) % tile_px) * tile_px
    flat = flat + (ix[:, None, None] + d[None, None, :]) % tile_px
    h = np.bincount(flat.ravel(), weights=tex.ravel(), minlength=tile_px * tile_px)
    return h.reshape(tile_px, tile_px).astype(np.float32)


def render_tile(rng: np.random.Generator, label: int, *, tile_px: int = 64) -> np.ndarray:
    """Render one H&E-like tile of class ``label`` as uint8 (tile_px, tile_px, 3)."""
    if not 0 <= int(label) < len(CLASS_NAMES):
        raise ValueError(f"label must be in [0, {len(CLASS_NAMES)}), got {label}")
    if tile_px < 16:
        raise ValueError(f"tile_px must be >= 16, got {tile_px}")
    s = tile_px / 64.0
    # stroma: wavy eosinophilic fibres over a smooth background, with white gaps
    yy, xx = _grid(tile_px)
    warp, fib_mod, bg, gap = _smooth_noise(rng, 4, tile_px, 4)
    theta = rng.uniform(0.0, np.pi)  # python float: keeps arrays float32
    phase = (xx * math.cos(theta) + yy * math.sin(theta)) * 2 * np.pi / rng.uniform(4.0, 8.0)
    fibre = (0.5 + 0.5 * np.sin(phase + rng.uniform(4.0, 10.0) * warp)) ** 2 * fib_mod
    e = rng.uniform(0.25, 0.45) * (0.55 + 0.6 * fibre) * (0.7 + 0.6 * bg)
    gap = np.clip((gap - rng.uniform(0.6, 0.95)) * 8.0, 0.0, 1.0)
    h = _nuclei_h(rng, int(label), tile_px, s)
    od = np.stack([h * (1.0 - 0.7 * gap), e * (1.0 - 0.9 * gap)])
    od = _blur(od, rng.uniform(0.35, 0.75) * s)
    # per-tile stain strength and hue variation
    hv, ev = (np.abs(v + rng.normal(0.0, 0.04, 3)) for v in (_H_OD, _E_OD))
    hv, ev = (hv / np.linalg.norm(hv)).astype(np.float32), (ev / np.linalg.norm(ev)).astype(np.float32)
    od_rgb = rng.uniform(0.8, 1.2) * od[0][..., None] * hv + rng.uniform(0.8, 1.2) * od[1][..., None] * ev
    rgb = rng.uniform(235.0, 252.0) * np.exp(-math.log(10.0) * od_rgb)
    rgb += rng.uniform(3.5, 14.0) * (rng.random(rgb.shape, np.float32) - 0.5)  # sensor noise, sd 1-4
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _tile_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], index]))


def _unlabeled_label(seed: int, index: int) -> int:
    """Balanced labels for unlabeled tiles: each block of len(CLASS_NAMES)
    consecutive indices is a seeded permutation of the classes, so the label is
    not recoverable from the index and does not depend on n_unlabeled."""
    n_cls = len(CLASS_NAMES)
    block = np.random.default_rng(np.random.SeedSequence([seed, _UNLABELED_PERM_CODE, index // n_cls]))
    return int(block.permutation(n_cls)[index % n_cls])


def write_tile_folder(
    root: str | os.PathLike, *, seed: int, tile_px: int = 64, n_train: int, n_unlabeled: int,
    n_val: int, n_test: int, generator: str = "chromatin", evidence: float = 1.0, show_progress: bool = False,
) -> dict:
    """Write the demo dataset as PNG folders (``<split>/<class>/<i:05d>.png``,
    ``unlabeled/<i:05d>.png``) plus ``synthetic.json``; return the metadata.

    Idempotent: an existing folder with identical parameters is reused, one
    with different parameters raises ValueError.  Generation happens in a
    temporary sibling directory that is renamed into place at the end, so an
    interrupted run never leaves a folder that looks complete.
    """
    root = Path(root)
    if generator not in ("chromatin", "multiscale"):
        raise ValueError(f"generator must be 'chromatin' or 'multiscale', got {generator!r}")
    names = multiscale.CLASS_NAMES if generator == "multiscale" else CLASS_NAMES
    params = {"generator_version": GENERATOR_VERSION, "class_names": list(names),
              "seed": int(seed), "tile_px": int(tile_px), "n_train": int(n_train),
              "n_unlabeled": int(n_unlabeled), "n_val": int(n_val), "n_test": int(n_test)}
    if generator != "chromatin":  # tile sets written before these knobs existed stay valid
        params.update(generator=generator, evidence=float(evidence))
    if params["seed"] < 0 or min(params[f"n_{s}"] for s in SPLITS) < 0:
        raise ValueError(f"seed and split sizes must be non-negative: {params}")
    existing = _check_existing(root, params)
    if existing is not None:
        return existing

    jobs = [(split, i) for split in SPLITS for i in range(params[f"n_{split}"])]
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        for sub in [f"{sp}/{c}" for sp in SPLITS[:3] for c in names] + ["unlabeled"]:
            (tmp / sub).mkdir(parents=True)
        counts = {split: dict.fromkeys(names, 0) for split in SPLITS}
        unlabeled_labels = []
        if show_progress:
            from tqdm.auto import tqdm
            jobs = tqdm(jobs, desc=f"synthetic tiles -> {root.name}", unit="tile")
        for split, i in jobs:
            if split == "unlabeled":
                label = _unlabeled_label(params["seed"], i)
                unlabeled_labels.append(label)
                path = tmp / split / f"{i:05d}.png"
            else:
                label = i % len(names)
                path = tmp / split / names[label] / f"{i:05d}.png"
            rng = _tile_rng(params["seed"], split, i)
            tile = multiscale.render_tile(rng, label, tile_px=params["tile_px"], evidence=evidence) \
                if generator == "multiscale" else render_tile(rng, label, tile_px=params["tile_px"])
            Image.fromarray(tile).save(path, compress_level=1)
            counts[split][names[label]] += 1
        meta = {"format": "histokd_jax.synthetic", "params": params, "counts": counts,
                # diagnostics only: true classes of unlabeled/<i:05d>.png, by index
                "unlabeled_labels": unlabeled_labels}
        with open(tmp / "synthetic.json", "w") as f:
            json.dump(meta, f, indent=1)
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # an empty placeholder directory may be replaced
        try:
            os.rename(tmp, root)
        except OSError:  # someone else finished first: accept it only if identical
            existing = _check_existing(root, params)
            if existing is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return existing
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def stored_meta(root: Path, params: dict, *, meta_name: str, what: str, required: tuple[str, ...] = ()) -> dict | None:
    """The stored metadata if ``root`` holds a generated ``what`` made with ``params``.

    None when ``root`` is absent or empty (generate it). A folder that is not such a
    set, or one made with other parameters, is an error: never overwrite or mix.
    """
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return None
    meta_path = root / meta_name
    if not meta_path.is_file() or not all((root / name).is_file() for name in required):
        raise FileExistsError(f"{root} exists, is not empty and holds no {what} ({meta_name}); refusing to overwrite")
    meta = json.loads(meta_path.read_text())
    old = meta.get("params", {})
    differing = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
    if differing:
        detail = ", ".join(f"{k}: stored {old.get(k)!r} != requested {params.get(k)!r}" for k in differing)
        raise ValueError(f"{root} holds a {what} with different parameters ({detail}); use another root or delete it")
    return meta


def _check_existing(root: Path, params: dict) -> dict | None:
    return stored_meta(root, params, meta_name="synthetic.json", what="synthetic dataset")


def contact_sheet(root: str | os.PathLike, *, downsample: int = 4, per_class: int = 6) -> Image.Image:
    """Grid of train tiles, one row per class: full resolution on the left and
    the same tiles area-downsampled by ``downsample`` (shown upscaled with
    nearest) on the right, so one can see that the class evidence is fine detail."""
    root = Path(root)
    rows = []
    meta = root / "synthetic.json"
    names = json.loads(meta.read_text())["params"]["class_names"] if meta.is_file() else CLASS_NAMES
    for name in names:
        files = sorted((root / "train" / name).glob("*.png"))[:per_class]
        if not files:
            raise FileNotFoundError(f"no train tiles for class {name!r} under {root}")
        rows.append([np.asarray(Image.open(p).convert("RGB")) for p in files])
    tile_px = rows[0][0].shape[0]
    zoom = max(1, 128 // tile_px)
    cell, pad, label_w, head_h = tile_px * zoom, 4, 90, 18
    gap = 3 * pad
    width = label_w + 2 * per_class * (cell + pad) + gap
    sheet = Image.new("RGB", (width, head_h + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    lr_x0 = label_w + per_class * (cell + pad) + gap
    draw.text((label_w, 3), f"high resolution ({tile_px} px)", fill="black")
    draw.text((lr_x0, 3), f"area-downsampled x{downsample} ({tile_px // downsample} px)", fill="black")
    for r, (name, tiles) in enumerate(zip(names, rows)):
        y = head_h + r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), name, fill="black")
        for c, tile in enumerate(tiles):
            hr = Image.fromarray(tile).resize((cell, cell), Image.NEAREST)
            h, w = (tile.shape[0] // downsample) * downsample, (tile.shape[1] // downsample) * downsample
            lr = Image.fromarray(area_downsample(tile[:h, :w], downsample)).resize((cell, cell), Image.NEAREST)
            sheet.paste(hr, (label_w + c * (cell + pad), y))
            sheet.paste(lr, (lr_x0 + c * (cell + pad), y))
    return sheet
