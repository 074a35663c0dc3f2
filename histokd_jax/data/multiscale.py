"""Synthetic H&E-like tissue whose class evidence lives at three scales, like real histology.

The chromatin-only generator (``synthetic.py``) puts all of its class evidence in
1-3 µm nuclear texture, which a 4x area average erases: the hardest setting, where a
low-magnification student has nothing to learn. Real tissue is not like that. This
module draws three classes modelled on lung adenocarcinoma growth patterns, each with
evidence at three stated real-world sizes:

* **architecture (50-300 µm)**: what a pathologist reads at 1.25x-5x.
  ``lepidic``: alveolar septa thickened by the tumour cells lining them (14-22 µm
  walls) around 70-130 µm air spaces; ``acinar``: glands 55-90 µm across, an epithelial ring
  around a lumen, in fibrous stroma; ``solid``: sheets of tumour cells crossed by
  a few thin fibrous septa, no lumens.
* **cell arrangement (10-30 µm)**: nuclear size and crowding, the cytological
  grade that goes with the pattern (lepidic tumours are low grade, solid ones high
  grade): small nuclei (6-7 µm) closely packed, medium (9 µm), or large
  pleomorphic nuclei (12-13 µm) far apart. Nuclear area per epithelial area is the
  same for all three, so a block mean over ~8 µm does not show which.
* **chromatin (1-3 µm)**: the texture inside each nucleus: uniform (``solid``
  chromatin), coarse granules (``speckled``) or a pale centre with a dark rim and a
  nucleolus (``vesicular``, as in high-grade nuclei); equal mean haematoxylin, so
  only high magnification shows it.

Tiles mix patterns, as tumours do: the tissue is cut into patches (~90 µm for
architecture, ~45 µm for cells and chromatin) and each patch shows, per scale, the
pattern of its region's class with probability ``purity`` and another class's
otherwise. ``evidence`` (0-1) is the one knob for how much class evidence lives at
the coarse scales: it moves the architecture and cell purities from chance (1/3, no
evidence) to their maxima, while chromatin keeps its purity. ``evidence=0`` leaves
chromatin alone, like the old generator; ``evidence=1`` is the default.

Nuisances: stain strength and hue per canvas with a smooth spatial drift; tissue
tears (white gaps) and folds (a band of doubled thickness) on some canvases;
lymphocytes scattered at a random density (small dark nuclei that imitate the
crowded-cell cue); stromal fibroblasts; focus blur (0.3-0.9 µm); sensor noise;
JPEG compression (the slides' tiles; ``write_tile_folder`` round-trips tiles too).

The generator does not know which model will read it: every scale is drawn at
level 0 (``mpp`` µm/px) and lower magnifications are block means of it, so the
distilled student, the label-only baseline and the true-label control all see the
same evidence and differ only in the labels they get.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from histokd_jax.data.render_ops import blur as _blur, gauss as _gauss, smooth_noise as _smooth_noise

__all__ = ["CLASS_NAMES", "PURITY", "purities", "render_tissue", "render_tile", "jpeg_roundtrip"]

CLASS_NAMES: tuple[str, ...] = ("lepidic", "acinar", "solid")
GENERATOR_VERSION = 1
SCALES: tuple[str, ...] = ("architecture", "cells", "chromatin")
# Highest probability that a patch shows its region's class at each scale (evidence=1).
PURITY: dict[str, float] = {"architecture": 0.9, "cells": 0.75, "chromatin": 0.75}
ARCH_PATCH_UM, FINE_PATCH_UM = 90.0, 45.0
NUCLEUS_RADIUS_UM = (3.3, 4.6, 6.3)  # per cell pattern; count per area goes as 1 / radius^2
NUCLEAR_AREA_FRACTION = 0.32  # of epithelium, the same for every cell pattern

_H_OD = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
_E_OD = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])
_K = len(CLASS_NAMES)


def purities(evidence: float) -> dict[str, float]:
    """Per-scale purity for ``evidence`` in [0, 1]: coarse scales move from chance to ``PURITY``."""
    if not 0.0 <= float(evidence) <= 1.0:
        raise ValueError(f"evidence must be in [0, 1], got {evidence}")
    chance = 1.0 / _K
    return {s: (q if s == "chromatin" else chance + float(evidence) * (q - chance)) for s, q in PURITY.items()}


def _seeds(rng: np.random.Generator, shape_um: tuple[float, float], spacing: float) -> np.ndarray:
    """Jittered-grid seed points (µm) covering the canvas with a one-cell margin: (rows, cols, 2)."""
    rows, cols = (int(math.ceil(s / spacing)) + 2 for s in shape_um)
    grid = np.stack(np.mgrid[-1:rows - 1, -1:cols - 1], -1).astype(np.float32)
    return (grid + rng.uniform(0.1, 0.9, grid.shape).astype(np.float32)) * spacing


def _nearest_two(yy: np.ndarray, xx: np.ndarray, seeds: np.ndarray, spacing: float):
    """Distances (µm) to the nearest and second-nearest seed, and the nearest seed's flat index.
    Each seed stays inside the middle 80% of its grid cell, so the 3x3 neighbourhood of a point's
    cell holds both but in rare corners (where the Voronoi edge then shifts by a few µm)."""
    rows, cols = seeds.shape[:2]
    ci, cj = (yy / spacing).astype(int) + 1, (xx / spacing).astype(int) + 1
    d1 = np.full(yy.shape, np.inf, np.float32)
    d2, idx = d1.copy(), np.zeros(yy.shape, np.int64)
    for di in range(-1, 2):
        for dj in range(-1, 2):
            i, j = np.clip(ci + di, 0, rows - 1), np.clip(cj + dj, 0, cols - 1)
            d = np.hypot(yy - seeds[i, j, 0], xx - seeds[i, j, 1])
            closer = d < d1
            d2 = np.where(closer, d1, np.minimum(d2, d))
            idx = np.where(closer, i * cols + j, idx)
            d1 = np.where(closer, d, d1)
    return d1, d2, idx


def _patterns(rng: np.random.Generator, region: np.ndarray, purity: float) -> np.ndarray:
    """Per patch: its region's class with probability ``purity``, else one of the other classes."""
    other = (region + rng.integers(1, _K, region.shape)) % _K
    return np.where(rng.random(region.shape) < purity, region, other)


def _patch_map(rng, yy, xx, *, spacing, class_at_um, purity) -> np.ndarray:
    """Per-pixel pattern of a Voronoi patch partition at ``spacing`` µm (found on a grid of about
    1/16 of the spacing and spread to its pixels: patch edges are not class evidence)."""
    seeds = _seeds(rng, (float(yy.max()) + 1, float(xx.max()) + 1), spacing)
    region = class_at_um(seeds[..., 0], seeds[..., 1]).ravel()
    pattern = _patterns(rng, region, purity)
    step = max(1, int(spacing / 16 / max(float(yy[1, 0] - yy[0, 0]) if yy.shape[0] > 1 else 1.0, 1e-6)))
    coarse = pattern[_nearest_two(yy[::step, ::step], xx[::step, ::step], seeds, spacing)[2]]
    return np.repeat(np.repeat(coarse, step, 0), step, 1)[:yy.shape[0], :yy.shape[1]]


def _soft(x: np.ndarray, edge: float) -> np.ndarray:
    """0 -> 1 ramp of width ``edge`` centred on 0."""
    return np.clip(x / edge + 0.5, 0.0, 1.0)


def _architecture(rng, yy, xx, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """(epithelium, air) masks in [0, 1] of each class's architecture, stacked on axis 0."""
    edge = max(1.0, mpp)
    shape_um = (float(yy.max()) + 1, float(xx.max()) + 1)
    # lepidic: septa along the Voronoi edges of 100-200 µm air spaces, cells lining them
    s = _seeds(rng, shape_um, 110.0)
    d1, d2, _ = _nearest_two(yy, xx, s, 110.0)
    wall = _soft(rng.uniform(7.0, 11.0) - (d2 - d1) / 2, edge)
    lep_epi, lep_air = wall, 1.0 - wall
    # acinar: glands at ~100 µm spacing, an epithelial ring (outer radius 28-45 µm) round a lumen
    s = _seeds(rng, shape_um, 100.0)
    radius = rng.uniform(28.0, 45.0, s.shape[:2]).astype(np.float32).ravel()
    d1, _, idx = _nearest_two(yy, xx, s, 100.0)
    r = radius[idx]
    lumen_r = r * rng.uniform(0.4, 0.55)
    aci_epi = _soft(r - d1, edge) * _soft(d1 - lumen_r, edge)
    aci_air = _soft(lumen_r - d1, edge)
    # solid: a sheet of cells crossed by 3-5 µm fibrous septa ~180 µm apart
    s = _seeds(rng, shape_um, 180.0)
    d1, d2, _ = _nearest_two(yy, xx, s, 180.0)
    sol_epi = 1.0 - _soft(rng.uniform(1.5, 2.5) - (d2 - d1) / 2, edge)
    epi = np.stack([lep_epi, aci_epi, sol_epi]).astype(np.float32)
    air = np.stack([lep_air, aci_air, np.zeros_like(sol_epi)]).astype(np.float32)
    return epi, air


def _stamp_nuclei(rng, shape, *, cy, cx, radius, elong, chromatin, mpp) -> np.ndarray:
    """Haematoxylin OD of nuclei (centres and radii in px) with their chromatin pattern (0 uniform,
    1 speckled, 2 vesicular); every pattern has the same mean OD over the nucleus."""
    h, w = shape
    out = np.zeros(h * w, np.float64)
    n = len(cy)
    if n == 0:
        return out.reshape(h, w).astype(np.float32)
    f32 = np.float32
    s = 1.0 / mpp  # px per µm
    a, b = (radius * elong).astype(f32), (radius / elong).astype(f32)
    ang = rng.uniform(0.0, np.pi, n).astype(f32)
    iy, ix = np.floor(cy).astype(int), np.floor(cx).astype(int)
    od = rng.uniform(0.6, 0.9, n).astype(f32)
    for lo, hi in ((0.0, 3.0), (3.0, 6.0), (6.0, np.inf)):  # size classes keep the stamp windows small
        sel = np.flatnonzero((a >= lo * s) & (a < hi * s)) if np.isfinite(hi) else np.flatnonzero(a >= lo * s)
        if sel.size == 0:
            continue
        half = int(np.ceil(a[sel].max() + 1.5))
        d = np.arange(-half, half + 1)
        dy = d.astype(f32)[None, :, None] - (cy[sel] - iy[sel]).astype(f32)[:, None, None]
        dx = d.astype(f32)[None, None, :] - (cx[sel] - ix[sel]).astype(f32)[:, None, None]
        c, sn = np.cos(ang[sel])[:, None, None], np.sin(ang[sel])[:, None, None]
        u, v = dx * c + dy * sn, -dx * sn + dy * c
        rho = np.sqrt((u / a[sel, None, None]) ** 2 + (v / b[sel, None, None]) ** 2)
        mask = np.clip((1.0 - rho) * radius[sel, None, None] + 0.5, 0.0, 1.0)
        tex = mask.copy()
        pat = chromatin[sel]
        grain = 0.6 * s  # ~1.2 µm granules
        sp = pat == 1
        if sp.any():
            m = int(sp.sum())
            gr, gphi = np.sqrt(rng.random((m, 10), f32)), rng.uniform(0, 2 * np.pi, (m, 10)).astype(f32)
            gu, gv = gr * np.cos(gphi) * a[sel][sp, None], gr * np.sin(gphi) * b[sel][sp, None]
            c1, s1 = c[sp, :, 0], sn[sp, :, 0]
            gy, gx = (gu * s1 + gv * c1)[:, :, None], (gu * c1 - gv * s1)[:, :, None]
            ey = _gauss((dy[sp, None, :, 0] - gy) ** 2 / (2 * grain ** 2))
            ex = _gauss((dx[sp, None, 0, :] - gx) ** 2 / (2 * grain ** 2))
            tex[sp] *= 0.2 + np.einsum("nkq,nkr->nqr", ey, ex)
        ve = pat == 2
        if ve.any():
            nr = 0.3 * rng.random(int(ve.sum()), f32) * radius[sel][ve]
            nphi = rng.uniform(0, 2 * np.pi, int(ve.sum())).astype(f32)
            nu, nv = (nr * np.cos(nphi))[:, None, None], (nr * np.sin(nphi))[:, None, None]
            nucleolus = _gauss(((u[ve] - nu) ** 2 + (v[ve] - nv) ** 2) / (2 * (0.8 * s) ** 2))
            tex[ve] *= 0.12 + _gauss(((rho[ve] - 0.8) / 0.14) ** 2) + 1.8 * nucleolus
        tex *= (od[sel] * mask.sum((1, 2)) / np.maximum(tex.sum((1, 2)), 1e-9))[:, None, None]
        yy_, xx_ = iy[sel, None, None] + d[None, :, None], ix[sel, None, None] + d[None, None, :]
        inside = (yy_ >= 0) & (yy_ < h) & (xx_ >= 0) & (xx_ < w)
        flat = np.where(inside, yy_ * w + xx_, 0)
        out += np.bincount(flat.ravel(), weights=(tex * inside).ravel(), minlength=h * w)
    return out.reshape(h, w).astype(np.float32)


def _place(rng, prob: np.ndarray, density_per_um2: float, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Poisson points (px) at ``density_per_um2 * prob`` (prob: a per-pixel map in [0, 1])."""
    h, w = prob.shape
    n = rng.poisson(density_per_um2 * h * w * mpp * mpp)
    cy, cx = rng.uniform(0, h, n), rng.uniform(0, w, n)
    keep = rng.random(n) < prob[cy.astype(int), cx.astype(int)]
    return cy[keep], cx[keep]


def _tissue_layout(rng, yy, xx, *, class_at_um, q: dict, mpp: float) -> tuple[dict, np.ndarray, np.ndarray]:
    """The per-scale pattern maps and the (epithelium, air) masks their architecture gives, with tears."""
    maps = {"architecture": _patch_map(rng, yy, xx, spacing=ARCH_PATCH_UM, class_at_um=class_at_um,
                                       purity=q["architecture"]),
            "cells": _patch_map(rng, yy, xx, spacing=FINE_PATCH_UM, class_at_um=class_at_um, purity=q["cells"]),
            "chromatin": _patch_map(rng, yy, xx, spacing=FINE_PATCH_UM, class_at_um=class_at_um,
                                    purity=q["chromatin"])}
    epi_k, air_k = _architecture(rng, yy, xx, mpp)
    arch = maps["architecture"][None]
    epi, air = np.take_along_axis(epi_k, arch, 0)[0], np.take_along_axis(air_k, arch, 0)[0]
    h, w = yy.shape
    if rng.random() < 0.5:  # nuisance: tears (white gaps) on some canvases
        noise = _smooth_noise(rng, 1, max(h, w), max(2, int(max(h, w) * mpp / 60)))[0, :h, :w]
        tear = _soft(noise - rng.uniform(0.85, 0.95), 0.03)
        epi, air = epi * (1 - tear), np.maximum(air, tear)
    return maps, epi, air


def _haematoxylin(rng, maps: dict, *, epi: np.ndarray, stroma: np.ndarray, mpp: float) -> np.ndarray:
    """Nuclear OD: epithelial nuclei (size and crowding from the cell pattern, texture from the chromatin
    pattern), lymphocytes (7 µm, dark, at a random density: a nuisance that mimics crowding) and
    stromal fibroblasts."""
    shape = epi.shape
    radius_um = np.array(NUCLEUS_RADIUS_UM, np.float32)
    density = NUCLEAR_AREA_FRACTION / (np.pi * radius_um ** 2)  # per µm² of epithelium
    cells = maps["cells"]
    cy, cx = _place(rng, epi * density[cells] / density.max(), float(density.max()), mpp)
    pat = cells[cy.astype(int), cx.astype(int)]
    pleo = np.array([0.08, 0.12, 0.22], np.float32)[pat]  # high grade: more variable sizes
    r_px = radius_um[pat] * np.exp(rng.normal(0.0, 1.0, len(cy)).astype(np.float32) * pleo) / mpp
    chrom = maps["chromatin"][cy.astype(int), cx.astype(int)]
    chrom = np.where(rng.random(len(cy)) < 0.85, chrom, rng.integers(0, _K, len(cy)))
    h_od = _stamp_nuclei(rng, shape, cy=cy, cx=cx, radius=r_px, elong=np.sqrt(rng.uniform(1.0, 1.4, len(cy))),
                         chromatin=chrom, mpp=mpp)
    ly, lx = _place(rng, np.clip(stroma + 0.5 * epi, 0, 1), rng.uniform(0.0, 6e-4), mpp)
    h_od += 1.3 * _stamp_nuclei(rng, shape, cy=ly, cx=lx, radius=np.full(len(ly), 3.5 / mpp, np.float32),
                                elong=np.ones(len(ly)), chromatin=np.zeros(len(ly), int), mpp=mpp)
    fy, fx = _place(rng, stroma, 4e-4, mpp)
    h_od += _stamp_nuclei(rng, shape, cy=fy, cx=fx, radius=np.full(len(fy), 3.0 / mpp, np.float32),
                          elong=np.full(len(fy), 2.2), chromatin=np.zeros(len(fy), int), mpp=mpp)
    return h_od


def _eosin(rng, yy, xx, *, epi: np.ndarray, stroma: np.ndarray, mpp: float) -> np.ndarray:
    """Eosin OD: cytoplasm, fibrous stroma with wavy fibres (~6 µm period), nearly nothing in air spaces."""
    h, w = yy.shape
    n = max(h, w)
    warp, fib_mod = _smooth_noise(rng, 2, n, max(2, int(n * mpp / 40)))[:, :h, :w]
    theta = rng.uniform(0.0, np.pi)
    phase = (xx * math.cos(theta) + yy * math.sin(theta)) * (2 * np.pi / rng.uniform(5.0, 8.0))
    fibre = (0.5 + 0.5 * np.sin(phase + 8.0 * warp)) ** 2 * (0.5 + fib_mod)
    return epi * rng.uniform(0.16, 0.26) + stroma * rng.uniform(0.2, 0.32) * (0.5 + 0.6 * fibre) + 0.02


def _to_rgb(rng, od: np.ndarray, yy, xx, *, mpp: float) -> np.ndarray:
    """Folds, focus blur, stain strength and hue (per canvas, with a smooth drift), Beer-Lambert, noise."""
    h, w = yy.shape
    if rng.random() < 0.3:  # a fold: a band of doubled tissue thickness
        t = rng.uniform(0.0, np.pi)
        dist = np.abs((xx - rng.uniform(0, w * mpp)) * math.cos(t) + (yy - rng.uniform(0, h * mpp)) * math.sin(t))
        od *= 1.0 + 0.9 * _soft(rng.uniform(10.0, 30.0) - dist, 4.0)
    od = _blur(od, rng.uniform(0.3, 0.9) / mpp)
    hv, ev = (np.abs(v + rng.normal(0.0, 0.05, 3)) for v in (_H_OD, _E_OD))
    hv, ev = (hv / np.linalg.norm(hv)).astype(np.float32), (ev / np.linalg.norm(ev)).astype(np.float32)
    drift = 0.85 + 0.3 * _smooth_noise(rng, 1, max(h, w), 2)[0, :h, :w]
    od_rgb = drift[..., None] * (rng.uniform(0.75, 1.25) * od[0][..., None] * hv
                                 + rng.uniform(0.75, 1.25) * od[1][..., None] * ev)
    rgb = rng.uniform(232.0, 250.0) * np.exp(-math.log(10.0) * od_rgb)
    rgb += rng.uniform(2.0, 8.0) * (rng.random(rgb.shape, np.float32) - 0.5)
    return np.clip(rgb, 0.0, 255.0).astype(np.float32)


def render_tissue(rng: np.random.Generator, *, shape: tuple[int, int], class_at: Callable, mpp: float = 1.0,
                  evidence: float = 1.0) -> tuple[np.ndarray, dict]:
    """Float32 RGB (h, w, 3) in [0, 255] of tissue at ``mpp`` µm/px, before JPEG.

    ``class_at(y, x)`` gives the region's class at pixel coordinates (arrays). Returns the
    image and the per-pixel pattern maps ``{"architecture", "cells", "chromatin"}`` (diagnostics).
    """
    h, w = (int(v) for v in shape)
    yy, xx = (g.astype(np.float32) * np.float32(mpp) for g in np.mgrid[0:h, 0:w])
    at_um = lambda y, x: np.asarray(class_at(np.clip(y / mpp, 0, h - 1), np.clip(x / mpp, 0, w - 1)))  # noqa: E731
    maps, epi, air = _tissue_layout(rng, yy, xx, class_at_um=at_um, q=purities(evidence), mpp=mpp)
    stroma = np.clip(1.0 - epi - air, 0.0, 1.0)
    h_od = _haematoxylin(rng, maps, epi=epi, stroma=stroma, mpp=mpp)
    e_od = _eosin(rng, yy, xx, epi=epi, stroma=stroma, mpp=mpp)
    od = np.stack([h_od * (1.0 - 0.9 * air) + 0.04 * stroma, e_od]).astype(np.float32)
    return _to_rgb(rng, od, yy, xx, mpp=mpp), maps


def jpeg_roundtrip(image: np.ndarray, *, quality: int) -> np.ndarray:
    """The image after JPEG compression at ``quality`` (what a scanner's tiles go through)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality), subsampling=0)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def render_tile(rng: np.random.Generator, label: int, *, tile_px: int = 128, mpp: float = 1.0,
                evidence: float = 1.0) -> np.ndarray:
    """One uint8 (tile_px, tile_px, 3) tile of class ``label`` at ``mpp`` µm/px, JPEG round-tripped."""
    if not 0 <= int(label) < _K:
        raise ValueError(f"label must be in [0, {_K}), got {label}")
    rgb, _ = render_tissue(rng, shape=(tile_px, tile_px), class_at=lambda y, x: np.full(np.shape(y), int(label)),
                           mpp=mpp, evidence=evidence)
    return jpeg_roundtrip(np.rint(rgb).astype(np.uint8), quality=int(rng.integers(75, 96)))
