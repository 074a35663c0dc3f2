"""Classification metrics on the host (numpy): point figures, ROC AUC, bootstrap CIs, agreement.

Everything is derived from ``labels`` (N,) and class probabilities ``probs``
(N, K): per-class precision / recall / F1 come from the confusion matrix, AUCs
from ranks (ties count one half, as in the Mann-Whitney U statistic).

Kept here rather than taken from scikit-learn (the tests' reference for every figure): a bootstrap
recomputes them 1000 times per model, and sklearn.metrics' input checks made one resample ~19x
slower (``benchmarks/library_vs_handwritten.py``), ~26 s per model instead of ~1.4 s; it would
also be a runtime dependency for 180 lines.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

# The headline figures; ``scores`` also returns per-class ones named "<figure>/<class index>".
SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of samples of true class ``i`` predicted as ``j``."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return cm


def per_class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class; 0 where a ratio is 0/0 (as scikit-learn reports)."""
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    safe = lambda num, den: np.divide(num, den, out=np.zeros_like(num), where=den > 0)  # noqa: E731
    precision, recall = safe(tp, predicted), safe(tp, support)
    return {"precision": precision, "recall": recall, "f1": safe(2 * tp, support + predicted), "support": support}


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive``; nan if one side is empty."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    positive = np.asarray(positive, bool)
    order = np.argsort(-np.asarray(scores), kind="stable")
    s, p = np.asarray(scores)[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps, fps = np.cumsum(p)[last_of_tie], np.cumsum(~p)[last_of_tie]
    tpr = np.r_[0.0, tps / max(int(p.sum()), 1)]
    fpr = np.r_[0.0, fps / max(int((~p).sum()), 1)]
    return fpr, tpr


def scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Every figure of one set of predictions, flat: the summary keys plus
    ``precision/k``, ``recall/k``, ``f1/k`` and ``auc/k`` for each class index k.

    Balanced accuracy averages recall over the classes present in ``labels``;
    macro F1 over the classes present or predicted; macro AUC over the classes
    with both positives and negatives (one-vs-rest). Undefined figures are nan.
    """
    labels, probs = np.asarray(labels), np.asarray(probs)
    k = probs.shape[-1]
    cm = confusion_matrix(labels, np.argmax(probs, -1), k)
    pc = per_class_scores(cm)
    present, seen = pc["support"] > 0, (pc["support"] + cm.sum(0)) > 0
    aucs = np.asarray([binary_auc(labels == c, probs[:, c]) for c in range(k)])
    out = {
        "accuracy": float(np.trace(cm) / max(len(labels), 1)),
        "balanced_accuracy": float(pc["recall"][present].mean()) if present.any() else 0.0,
        "macro_f1": float(pc["f1"][seen].mean()) if seen.any() else 0.0,
        "macro_auc": float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan"),
    }
    for c in range(k):
        out[f"precision/{c}"] = float(pc["precision"][c]) if cm[:, c].sum() else float("nan")
        out[f"recall/{c}"] = float(pc["recall"][c]) if present[c] else float("nan")
        out[f"f1/{c}"] = float(pc["f1"][c]) if seen[c] else float("nan")
        out[f"auc/{c}"] = float(aucs[c])
    return out


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro F1: what validation selects on and results.json reports."""
    s = scores(labels, probs)
    return {key: s[key] for key in ("accuracy", "balanced_accuracy", "macro_f1")}


def _members(groups: np.ndarray | None) -> list[np.ndarray] | None:
    """The tile indices of each group (None: tiles are resampled one by one)."""
    if groups is None:
        return None
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    return [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]


def _resample_indices(rng: np.random.Generator, n: int, members: list[np.ndarray] | None) -> np.ndarray:
    if members is None:
        return rng.integers(0, n, n)
    return np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95, groups: np.ndarray | None = None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every figure of ``scores``.

    Resamples tiles with replacement or, with ``groups`` (e.g. each tile's slide),
    whole groups: tiles of one slide are not independent, and resampling them as
    if they were gives intervals that are too narrow. Seeded, so a report is
    reproducible; resamples where a figure is undefined (a class drawn zero
    times) are left out of that figure's interval.
    """
    labels, probs = np.asarray(labels), np.asarray(probs)
    rng = np.random.default_rng(seed)
    members = _members(groups)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = _resample_indices(rng, len(labels), members)
        for key, value in scores(labels[idx], probs[idx]).items():
            draws.setdefault(key, []).append(value)
    tail = 100 * (1 - level) / 2
    out = {}
    for key, values in draws.items():
        v = np.asarray(values)
        v = v[np.isfinite(v)]
        out[key] = (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) if v.size else (
            float("nan"), float("nan"))
    return out


def paired_accuracy_difference(labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, *, n_boot: int = 1000,
                               seed: int = 0, level: float = 0.95,
                               groups: np.ndarray | None = None) -> tuple[float, float, float]:
    """(accuracy of a - accuracy of b, and its percentile bootstrap interval) for two models scored on
    the same tiles: each resample draws the same tiles (or whole ``groups``) for both, so what the two
    share (easy and hard slides) cancels, and the interval is narrower than either model's own."""
    labels = np.asarray(labels)
    diff = (np.argmax(probs_a, -1) == labels).astype(float) - (np.argmax(probs_b, -1) == labels)
    rng = np.random.default_rng(seed)
    members = _members(groups)
    draws = [diff[_resample_indices(rng, len(labels), members)].mean() for _ in range(n_boot)]
    tail = 100 * (1 - level) / 2
    return float(diff.mean()), float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


def agreement(teacher_probs: np.ndarray, student_probs: np.ndarray, *, eps: float = 1e-7) -> dict[str, float]:
    """How closely a student follows its teacher on the same tiles: top-1 agreement and
    mean KL(teacher || student) in nats."""
    t = np.clip(np.asarray(teacher_probs, np.float64), eps, 1.0)
    s = np.clip(np.asarray(student_probs, np.float64), eps, 1.0)
    return {
        "top1_agreement": float(np.mean(t.argmax(-1) == s.argmax(-1))),
        "mean_kl": float(np.mean(np.sum(t * (np.log(t) - np.log(s)), axis=-1))),
    }


def aggregate_slides(slide_ids: Sequence, labels: np.ndarray, probs: np.ndarray, *,
                     method: str = "mean") -> tuple[list, np.ndarray, np.ndarray]:
    """Tile predictions to slide predictions: (slide ids, slide labels, slide probabilities).

    ``method="mean"`` averages the tile probabilities; ``"vote"`` gives each
    class the share of tiles that predict it (its argmax is the majority vote).
    A slide's label is its tiles' label (tiles inherit the slide label).
    """
    if method not in ("mean", "vote"):
        raise ValueError(f"method must be 'mean' or 'vote', got {method!r}")
    slide_ids, labels, probs = np.asarray(slide_ids), np.asarray(labels), np.asarray(probs)
    keys, inverse = np.unique(slide_ids, return_inverse=True)
    per_tile = probs if method == "mean" else np.eye(probs.shape[-1])[probs.argmax(-1)]
    sums = np.zeros((len(keys), probs.shape[-1]))
    np.add.at(sums, inverse, per_tile)
    counts = np.bincount(inverse, minlength=len(keys))[:, None]
    slide_labels = np.zeros(len(keys), np.int64)
    for i in range(len(keys)):
        tile_labels = np.unique(labels[inverse == i])
        if len(tile_labels) != 1:
            raise ValueError(f"slide {keys[i]} has tiles with different labels {tile_labels.tolist()}")
        slide_labels[i] = tile_labels[0]
    return keys.tolist(), slide_labels, sums / counts
