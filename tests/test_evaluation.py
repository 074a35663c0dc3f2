"""Evaluation metrics against scikit-learn and hand counts; bootstrap CIs; slide aggregation; reports."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from histokd_jax import metrics, report

REPO = pathlib.Path(__file__).resolve().parents[1]


def random_predictions(n=300, k=4, seed=0, skill=1.5):
    """Labels and probabilities that are informative but imperfect (with some exact ties)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += skill
    logits = np.round(logits, 1)  # rounding makes ties, which AUC must count as one half
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return labels, probs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_scikit_learn(seed):
    labels, probs = random_predictions(seed=seed)
    predicted = probs.argmax(-1)
    got = metrics.scores(labels, probs)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, predicted))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(labels, predicted, average="macro"))
    assert got["macro_auc"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    p, r, f, support = skm.precision_recall_fscore_support(labels, predicted, labels=range(4), zero_division=0)
    for c in range(4):
        assert got[f"precision/{c}"] == pytest.approx(p[c])
        assert got[f"recall/{c}"] == pytest.approx(r[c])
        assert got[f"f1/{c}"] == pytest.approx(f[c])
        assert got[f"auc/{c}"] == pytest.approx(skm.roc_auc_score(labels == c, probs[:, c]))
    np.testing.assert_array_equal(metrics.confusion_matrix(labels, predicted, 4), skm.confusion_matrix(labels, predicted))


def test_per_class_figures_by_hand():
    # rows true, columns predicted
    cm = np.array([[2, 1, 0],
                   [0, 1, 1],
                   [1, 1, 3]])
    got = metrics.per_class_scores(cm)
    np.testing.assert_allclose(got["precision"], [2 / 3, 1 / 3, 3 / 4])
    np.testing.assert_allclose(got["recall"], [2 / 3, 1 / 2, 3 / 5])
    np.testing.assert_allclose(got["f1"], [2 * 2 / 6, 2 * 1 / 5, 2 * 3 / 9])
    np.testing.assert_array_equal(got["support"], [3, 2, 5])


def test_auc_by_hand_with_a_tie():
    # positives score 0.9, 0.5; negatives 0.5, 0.1. Pairs (pos, neg): (0.9,0.5)=1, (0.9,0.1)=1, (0.5,0.5)=1/2,
    # (0.5,0.1)=1 -> AUC = 3.5 / 4
    assert metrics.binary_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.5, 0.5, 0.1])) == pytest.approx(3.5 / 4)
    assert np.isnan(metrics.binary_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_roc_curve_matches_scikit_learn_and_integrates_to_the_auc():
    labels, probs = random_predictions(seed=4)
    positive = labels == 1
    fpr, tpr = metrics.roc_curve(positive, probs[:, 1])
    sk_fpr, sk_tpr, _ = skm.roc_curve(positive, probs[:, 1], drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.binary_auc(positive, probs[:, 1]))


def test_bootstrap_intervals_contain_the_point_estimate_and_repeat_by_seed():
    labels, probs = random_predictions(n=200, k=3, seed=5)
    point = metrics.scores(labels, probs)
    a = metrics.bootstrap_ci(labels, probs, n_boot=300, seed=7)
    b = metrics.bootstrap_ci(labels, probs, n_boot=300, seed=7)
    c = metrics.bootstrap_ci(labels, probs, n_boot=300, seed=8)
    assert a == b and a != c
    for key in metrics.SUMMARY_KEYS:
        lo, hi = a[key]
        assert lo <= point[key] <= hi and hi - lo > 0
    # the accuracy of n Bernoulli trials: the interval is about +-1.96 sqrt(p(1-p)/n) wide
    p = point["accuracy"]
    half = 1.96 * np.sqrt(p * (1 - p) / len(labels))
    assert (a["accuracy"][1] - a["accuracy"][0]) / 2 == pytest.approx(half, rel=0.25)


def test_slide_bootstrap_resamples_whole_slides_and_widens_for_correlated_tiles():
    """20 slides of 30 tiles; each slide's tiles are all right or all wrong (perfectly correlated).
    Resampling tiles treats 600 tiles as independent; resampling slides sees 20 units, so its
    interval is wider by about sqrt(30)."""
    rng = np.random.default_rng(0)
    slides = np.repeat(np.arange(20), 30)
    labels = rng.integers(0, 2, 600)
    right = np.repeat(rng.random(20) < 0.7, 30)
    predicted = np.where(right, labels, 1 - labels)
    probs = np.eye(2)[predicted] * 0.8 + 0.1
    tiles = metrics.bootstrap_ci(labels, probs, n_boot=400, seed=0)["accuracy"]
    by_slide = metrics.bootstrap_ci(labels, probs, n_boot=400, seed=0, groups=slides)["accuracy"]
    point = metrics.scores(labels, probs)["accuracy"]
    assert by_slide[0] <= point <= by_slide[1] and tiles[0] <= point <= tiles[1]
    ratio = (by_slide[1] - by_slide[0]) / (tiles[1] - tiles[0])
    assert 3.5 < ratio < 8, ratio  # sqrt(30) = 5.5


def test_agreement_by_hand():
    t = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    s = np.array([[0.25, 0.75], [0.6, 0.4], [0.3, 0.7]])
    got = metrics.agreement(t, s)
    # argmax: teacher (0, 0, 1), student (1, 0, 1): 2 of 3 agree (np.argmax takes the first of a tie)
    assert got["top1_agreement"] == pytest.approx(2 / 3)
    kl = np.sum(t * np.log(t / s), axis=-1).mean()
    assert got["mean_kl"] == pytest.approx(kl, rel=1e-5)
    assert metrics.agreement(t, t)["mean_kl"] == pytest.approx(0.0, abs=1e-9)


def test_slide_aggregation_mean_and_vote():
    slides = np.array(["b", "a", "a", "b", "a"])
    labels = np.array([1, 0, 0, 1, 0])
    probs = np.array([[0.4, 0.6], [0.9, 0.1], [0.3, 0.7], [0.45, 0.55], [0.2, 0.8]])
    ids, y, p = metrics.aggregate_slides(slides, labels, probs, method="mean")
    assert ids == ["a", "b"] and y.tolist() == [0, 1]
    np.testing.assert_allclose(p, [[(0.9 + 0.3 + 0.2) / 3, (0.1 + 0.7 + 0.8) / 3], [0.425, 0.575]])
    _, _, votes = metrics.aggregate_slides(slides, labels, probs, method="vote")
    np.testing.assert_allclose(votes, [[1 / 3, 2 / 3], [0, 1]])
    with pytest.raises(ValueError, match="different labels"):
        metrics.aggregate_slides(np.array(["a", "a"]), np.array([0, 1]), probs[:2])


def fake_workdir(root: pathlib.Path, *, slides: bool) -> pathlib.Path:
    """A workdir with three finished models' predictions: a good teacher, a weaker student, a baseline."""
    labels, teacher = random_predictions(n=240, k=3, seed=10, skill=3.0)
    _, student = random_predictions(n=240, k=3, seed=10, skill=1.0)
    _, baseline = random_predictions(n=240, k=3, seed=11, skill=0.5)
    slide_ids = np.asarray([f"slide_{y}_{i % 4}" for i, y in enumerate(labels)]) if slides else None
    for role, probs, gflops, px in (("teacher", teacher, 0.034, 64), ("distill", student, 0.0016, 16),
                                    ("baseline", baseline, 0.0016, 16)):
        report.save_predictions(root / role, labels=labels, probs=probs, class_names=("a", "b", "c"), slides=slide_ids)
        (root / role / "result.json").write_text(json.dumps({"role": role, "input_px": px, "gflops_per_image": gflops}))
    return root


def test_evaluate_writes_report_tables_and_figures(tmp_path):
    workdir = fake_workdir(tmp_path / "run", slides=True)
    done = subprocess.run([sys.executable, str(REPO / "launch/evaluate.py"), f"--workdir={workdir}",
                           "--bootstrap=200"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rep = json.loads((workdir / "report.json").read_text())
    assert set(rep) == {"teacher", "distill", "baseline"}
    teacher = report.load_predictions(workdir / "teacher")
    student = report.load_predictions(workdir / "distill")
    tiles = rep["distill"]["tiles"]
    assert tiles["accuracy"]["value"] == pytest.approx(np.mean(student["probs"].argmax(-1) == student["labels"]))
    assert tiles["accuracy"]["ci95"][0] <= tiles["accuracy"]["value"] <= tiles["accuracy"]["ci95"][1]
    assert sum(tiles["per_class"][c]["support"] for c in "abc") == 240
    agree = rep["distill"]["agreement_with_teacher"]
    assert agree["top1_agreement"] == pytest.approx(np.mean(teacher["probs"].argmax(-1) == student["probs"].argmax(-1)))
    assert "agreement_with_teacher" not in rep["teacher"]
    # slide level: 12 slides (3 classes x 4), mean of tile probabilities
    assert rep["teacher"]["slides"]["n"] == 12 and rep["teacher"]["slides"]["accuracy"]["value"] == 1.0
    md = (workdir / "report.md").read_text()
    assert "| distill |" in md and "## Slide level" in md
    for name in ("roc_teacher", "confusion_distill", "roc_baseline", "accuracy_vs_gflops"):
        png = workdir / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_without_models_says_so(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "launch/evaluate.py"), f"--workdir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no finished model" in done.stderr
