"""Which tiles a student-then-teacher cascade sends to the teacher.

The student reads every tissue tile at its low magnification; the teacher reads
again, at its own, only the tiles the student is unsure of. Unsure is measured by
a confidence in [0, 1] computed from the student's probabilities, and a tile goes
to the teacher when its confidence is below ``threshold``, or when it is among
the ``budget`` share of least confident tiles, or both (below the threshold,
at most that share).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SCORES = ("margin", "entropy")


def margin(probs: np.ndarray) -> np.ndarray:
    """Top probability minus the runner-up: 0 on a tie between two classes, 1 when one class has it all."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def entropy_confidence(probs: np.ndarray) -> np.ndarray:
    """1 - entropy / log K: 0 for the uniform distribution, 1 for a one-hot one."""
    k = probs.shape[1]
    p = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    return 1.0 + (p * np.log(p)).sum(1) / math.log(k)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Route to the teacher the tiles whose ``score`` is under ``threshold`` and/or in the ``budget`` share."""

    score: str = "margin"  # one of SCORES
    threshold: float | None = None
    budget: float | None = None  # a share of the slide's tiles, 0-1

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"cascade score must be one of {SCORES}, got {self.score!r}")
        if self.threshold is None and self.budget is None:
            raise ValueError("a cascade needs a confidence threshold, a teacher budget, or both")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"cascade threshold must be in [0, 1] (a confidence), got {self.threshold}")
        if self.budget is not None and not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"cascade budget must be a share in [0, 1], got {self.budget}")

    def confidence(self, probs: np.ndarray) -> np.ndarray:
        return margin(probs) if self.score == "margin" else entropy_confidence(probs)

    def to_teacher(self, confidence: np.ndarray) -> np.ndarray:
        """A boolean per tile, from the student's ``confidence``: True where the teacher decides."""
        return route(confidence, threshold=self.threshold, budget=self.budget)

    def describe(self) -> dict:
        return {"score": self.score, "threshold": self.threshold, "budget": self.budget}


def route(confidence: np.ndarray, *, threshold: float | None = None, budget: float | None = None) -> np.ndarray:
    """True for the tiles the teacher sees: confidence strictly below ``threshold`` (all tiles without
    one), of which at most ``budget * n`` (rounded half up) least confident ones (ties: the earlier tile
    first)."""
    chosen = confidence < threshold if threshold is not None else np.ones(len(confidence), bool)
    if budget is not None:
        keep = int(math.floor(budget * len(confidence) + 0.5))
        candidates = np.flatnonzero(chosen)
        order = candidates[np.argsort(confidence[candidates], kind="stable")]
        chosen = np.zeros(len(confidence), bool)
        chosen[order[:keep]] = True
    return chosen
