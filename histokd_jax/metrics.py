"""Classification metrics on the host (numpy): accuracy, balanced accuracy, macro F1."""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of samples of true class ``i`` predicted as ``j``."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return cm


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean per-class recall) and macro F1 from class probabilities.

    Classes absent from ``labels`` are left out of the balanced accuracy; a class
    never predicted and never present is left out of the macro F1.
    """
    labels = np.asarray(labels)
    num_classes = probs.shape[-1]
    cm = confusion_matrix(labels, np.argmax(probs, -1), num_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1)
    predicted = cm.sum(0)
    present = support > 0
    recall = tp[present] / support[present]
    f1_defined = (support + predicted) > 0
    f1 = 2 * tp[f1_defined] / (support + predicted)[f1_defined]
    return {
        "accuracy": float(tp.sum() / max(len(labels), 1)),
        "balanced_accuracy": float(recall.mean()) if recall.size else 0.0,
        "macro_f1": float(f1.mean()) if f1.size else 0.0,
    }
