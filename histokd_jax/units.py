"""Resolution units: µm/px is canonical; magnification strings are converted with a heuristic."""

from __future__ import annotations

import math

# Heuristic used across digital pathology: a 10x objective images ~1 µm/px (40x ~0.25).
# Real scanners differ by up to ~10%; prefer the slide's own µm/px where it is known.
MPP_AT_1X = 10.0


def magnification_to_mpp(value: str | float) -> float:
    """``"10x"`` / ``"1.25X"`` / ``10`` -> µm/px via mpp = 10 / power (a heuristic)."""
    text = str(value).strip().lower().removesuffix("x").strip()
    try:
        power = float(text)
    except ValueError:
        raise ValueError(f"cannot read a magnification from {value!r}; write e.g. '10x' or '1.25x'") from None
    if not (power > 0 and math.isfinite(power)):
        raise ValueError(f"magnification must be positive, got {value!r}")
    return MPP_AT_1X / power


def resolution_to_mpp(value: str | float) -> float:
    """A resolution as configs write it: ``"10x"`` -> 1.0 (a magnification, heuristic); ``0.5`` or ``"0.5"`` ->
    0.5 µm/px (a bare number is µm/px, never a magnification)."""
    text = str(value).strip().lower()
    try:
        mpp = magnification_to_mpp(text) if text.endswith("x") else float(text)
    except ValueError:
        raise ValueError(f"cannot read a resolution from {value!r}; write a magnification like '10x' or µm/px "
                         "like '1.0'") from None
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"target resolution must be positive, got {value!r}")
    return mpp


def downsample_between(teacher: str | float, student: str | float) -> int:
    """Integer factor between two resolutions, e.g. ('10x', '1.25x') -> 8 or ('0.5', '2.0') µm/px -> 4."""
    ratio = resolution_to_mpp(student) / resolution_to_mpp(teacher)
    factor = round(ratio)
    if factor < 1 or not math.isclose(ratio, factor, rel_tol=1e-3):
        raise ValueError(f"student {student} is not an integer downsample of teacher {teacher} (ratio {ratio:.4g})")
    return factor
