"""Hand-written pieces against the maintained library that does the same, on their hot paths.

    python benchmarks/library_vs_handwritten.py [--repeats 30]

For each pair: the same inputs, the same result (checked here before timing), best-of-``repeats``
time of each, in one process (ratios, not absolute figures, are what these noisy machines give).
- ``views.area_downsample`` (uint8 block means, the loader's batch half and the whole-slide reads)
  against ``skimage.measure.block_reduce(..., np.mean)`` rounded to uint8 the same way;
- ``metrics.scores`` (accuracy, balanced accuracy, macro-F1, per-class precision / recall / F1, AUCs:
  what ``bootstrap_ci`` computes once per resample, 1000 times per model) against the same figures
  from ``sklearn.metrics``;
- the tissue mask's thresholds are skimage's already (``slides.glass_threshold``), and its small-object
  removal is ``scipy.ndimage.label``: nothing hand-written left to compare there.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def downsample_rows(repeats: int) -> list[tuple[str, float, float]]:
    from skimage.measure import block_reduce

    from histokd_jax.data.views import area_downsample

    rng = np.random.default_rng(0)
    cases = [("batch of 64 crops 128 px, f=4", rng.integers(0, 256, (64, 128, 128, 3), dtype=np.uint8), 4),
             ("one 256 px tile, f=8", rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), 8),
             ("6144 px thumbnail, f=64", rng.integers(0, 256, (6144, 6144, 3), dtype=np.uint8), 64)]
    rows = []
    for name, image, f in cases:
        block = (1,) * (image.ndim - 3) + (f, f, 1)

        def library(image=image, block=block):
            return np.rint(block_reduce(image, block, np.mean).astype(np.float32)).astype(np.uint8)

        ours, theirs = area_downsample(image, f), library()
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1, name  # float64 vs float32 mean at .5
        rows.append((f"area_downsample: {name}", best_of(lambda: area_downsample(image, f), repeats),
                     best_of(library, max(3, repeats // 10 if f == 64 else repeats))))
    return rows


def metrics_rows(repeats: int) -> list[tuple[str, float, float]]:
    from sklearn import metrics as skm

    from histokd_jax import metrics

    rng = np.random.default_rng(1)
    n, k = 1130, 3  # the benchmark's test split
    labels = rng.integers(0, k, n)
    probs = rng.dirichlet(np.ones(k), n)
    probs[np.arange(n), labels] += 0.5
    probs /= probs.sum(1, keepdims=True)

    def library():
        pred = probs.argmax(1)
        p, r, f, _ = skm.precision_recall_fscore_support(labels, pred, labels=range(k), zero_division=0)
        aucs = [skm.roc_auc_score(labels == c, probs[:, c]) for c in range(k)]
        return {"accuracy": skm.accuracy_score(labels, pred),
                "balanced_accuracy": skm.balanced_accuracy_score(labels, pred),
                "macro_f1": skm.f1_score(labels, pred, average="macro", zero_division=0),
                "macro_auc": float(np.mean(aucs)), "f": f, "p": p, "r": r}

    ours, theirs = metrics.scores(labels, probs), library()
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"):
        assert abs(ours[key] - theirs[key]) < 1e-12, key
    return [("metrics.scores: one bootstrap resample (1130 tiles, 3 classes)",
             best_of(lambda: metrics.scores(labels, probs), repeats), best_of(library, repeats))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"{'what':<70}{'ours ms':>10}{'library ms':>12}{'library/ours':>14}")
    for name, ours, theirs in downsample_rows(args.repeats) + metrics_rows(args.repeats):
        print(f"{name:<70}{ours * 1e3:>10.3f}{theirs * 1e3:>12.3f}{theirs / ours:>13.1f}x", flush=True)


if __name__ == "__main__":
    main()
