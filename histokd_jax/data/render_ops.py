"""Small numpy building blocks shared by the synthetic tissue generators."""
from __future__ import annotations

import math

import numpy as np


def smooth_noise(rng: np.random.Generator, k: int, n: int, cells: int) -> np.ndarray:
    """``k`` bilinearly upsampled uniform noise fields in [0, 1]: cheap low-frequency texture."""
    grid = rng.random((k, cells + 1, cells + 1), dtype=np.float32)
    t = np.linspace(0.0, cells, n, endpoint=False)
    i = t.astype(int)
    f = (t - i).astype(np.float32)
    rows = grid[:, i] * (1 - f)[:, None] + grid[:, i + 1] * f[:, None]
    return rows[:, :, i] * (1 - f) + rows[:, :, i + 1] * f


def gauss(q: np.ndarray) -> np.ndarray:
    """exp(-q) flushed to 0 for q > 30: float32 denormals make numpy ~10x slower."""
    return np.where(q < 30.0, np.exp(-np.minimum(q, 30.0)), 0.0).astype(q.dtype)


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with wrap-around over the last two axes (plain
    numpy: BLAS/FFT threading on tiny arrays is slower and less predictable)."""
    r = max(1, math.ceil(2.5 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(x.dtype)
    for _ in range(2):  # last axis, then (after swapping) the other one
        n = x.shape[-1]
        p = np.concatenate([x[..., n - r:], x, x[..., :r]], axis=-1)
        x = np.ascontiguousarray(sum(w * p[..., j:j + n] for j, w in enumerate(k)).swapaxes(-1, -2))
    return x
