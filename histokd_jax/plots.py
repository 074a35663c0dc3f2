"""Figures people would rather look at than read: ROC curves, confusion matrices, accuracy vs cost.

matplotlib with the Agg backend (files only, no display needed).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from histokd_jax import metrics  # noqa: E402


def roc_plot(path: str | pathlib.Path, *, labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
             title: str) -> None:
    """One-vs-rest ROC curve per class, with its AUC in the legend."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    for c, name in enumerate(class_names):
        positive = np.asarray(labels) == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr = metrics.roc_curve(positive, probs[:, c])
        ax.plot(fpr, tpr, label=f"{name} (AUC {metrics.binary_auc(positive, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def confusion_plot(path: str | pathlib.Path, *, cm: np.ndarray, class_names: Sequence[str], title: str) -> None:
    """Counts, shaded by the share of each true class (rows sum to 1)."""
    cm = np.asarray(cm)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = 1.2 + 0.7 * len(class_names)
    fig, ax = plt.subplots(figsize=(side + 1, side), dpi=120)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def accuracy_vs_gflops(path: str | pathlib.Path, rows: Sequence[dict], *, title: str = "accuracy vs cost") -> None:
    """One point per model (accuracy with its 95% CI against GFLOPs per image, log scale).

    ``rows``: dicts with ``name``, ``gflops``, ``accuracy``, ``ci95`` and optional ``group`` (points
    of one group are joined, e.g. the distilled students of a sweep).
    """
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row.get("group", row["name"]), []).append(row)
    for group, members in groups.items():
        members = sorted(members, key=lambda r: r["gflops"])
        x = [r["gflops"] for r in members]
        y = [r["accuracy"] for r in members]
        err = np.abs(np.asarray([r["ci95"] for r in members]).T - np.asarray(y))
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, linestyle="-" if len(members) > 1 else "none",
                    label=group)
        if len(members) == 1:
            ax.annotate(members[0]["name"], (x[0], y[0]), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="GFLOPs per image (log)", ylabel="test accuracy", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def accuracy_vs_pool(path: str | pathlib.Path, series: dict[str, Sequence[tuple[float, float, Sequence[float]]]], *,
                     references: dict[str, float] | None = None, title: str = "accuracy vs unlabelled pool") -> None:
    """Accuracy (with its 95% CI) against the share of the unlabelled pool used, one line per series;
    ``references`` are drawn as horizontal lines (e.g. the label-only baseline and the true-label control)."""
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for name, points in series.items():
        points = sorted(points)
        x = [100 * p for p, _, _ in points]
        y = [a for _, a, _ in points]
        err = np.abs(np.asarray([ci for _, _, ci in points], float).T - np.asarray(y))
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"distilled, {name}")
    for i, (name, value) in enumerate((references or {}).items()):
        if np.isfinite(value):
            ax.axhline(value, linestyle="--" if "baseline" in name else ":", linewidth=1, color=f"C{i + 2}", label=name)
    ax.set(xlabel="unlabelled pool used (%)", ylabel="test accuracy", title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def cascade_curve(path: str | pathlib.Path, curves: dict[str, Sequence[tuple[float, float, float]]], *,
                  teacher_accuracy: float, target_cost: float | None = None, title: str = "cascade") -> None:
    """Accuracy against whole-slide time relative to the teacher alone, one line per student, each point
    a share sent to the teacher (labelled); ``curves[name]`` holds (share, relative time, accuracy)."""
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for name, points in curves.items():
        share, cost, acc = (np.asarray(v, float) for v in zip(*points))
        ax.plot(cost, acc, marker="o", label=name)
        for s, c, a in zip(share, cost, acc):
            ax.annotate(f"{s:.0%}", (c, a), textcoords="offset points", xytext=(3, -10), fontsize=7)
    ax.axhline(teacher_accuracy, color="k", linewidth=1, label=f"teacher alone ({teacher_accuracy:.3f})")
    ax.axhline(teacher_accuracy - 0.01, color="k", linewidth=1, linestyle=":", label="teacher - 1 point")
    if target_cost is not None:
        ax.axvline(target_cost, color="tab:red", linewidth=1, linestyle="--", label=f"{target_cost:.0%} of its time")
    ax.set(xlabel="whole-slide time / teacher's (labels: share of tiles sent to the teacher)",
           ylabel="tile accuracy", title=title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
