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


def downsample_between(teacher: str | float, student: str | float) -> int:
    """Integer factor between two magnifications, e.g. ('10x', '1.25x') -> 8."""
    ratio = magnification_to_mpp(student) / magnification_to_mpp(teacher)
    factor = round(ratio)
    if factor < 1 or not math.isclose(ratio, factor, rel_tol=1e-3):
        raise ValueError(f"student {student} is not an integer downsample of teacher {teacher} (ratio {ratio:.4g})")
    return factor
