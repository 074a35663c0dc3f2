"""Host metrics against hand-worked confusion matrices; magnification units; batch/mesh guard."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from histokd_jax import metrics, parallel, units


def probs_for(predictions, num_classes, seed=0):
    """Random probability rows whose argmax is the given prediction."""
    rng = np.random.default_rng(seed)
    rows = rng.uniform(0.0, 0.4, size=(len(predictions), num_classes))
    rows[np.arange(len(predictions)), predictions] = 0.9
    return rows / rows.sum(-1, keepdims=True)


# ---------------------------------------------------------------- classification metrics


def test_three_class_confusion_by_hand():
    # true 0 (3 samples) -> predicted 0, 0, 1
    # true 1 (2 samples) -> predicted 1, 2
    # true 2 (5 samples) -> predicted 2, 2, 2, 0, 1
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    preds = [0, 0, 1, 1, 2, 2, 2, 2, 0, 1]
    # confusion (rows true, cols predicted):
    #   [[2, 1, 0],
    #    [0, 1, 1],
    #    [1, 1, 3]]
    # tp = (2, 1, 3); support = (3, 2, 5); predicted = (3, 3, 4)
    accuracy = (2 + 1 + 3) / 10  # 0.6
    balanced = (2 / 3 + 1 / 2 + 3 / 5) / 3  # = 53/90
    # F1 = 2 tp / (support + predicted): 4/6, 2/5, 6/9
    macro_f1 = (4 / 6 + 2 / 5 + 6 / 9) / 3  # = 26/45
    np.testing.assert_array_equal(
        metrics.confusion_matrix(np.asarray(labels), np.asarray(preds), 3), [[2, 1, 0], [0, 1, 1], [1, 1, 3]]
    )
    got = metrics.classification_metrics(np.asarray(labels), probs_for(preds, 3))
    assert got["accuracy"] == pytest.approx(accuracy)
    assert got["balanced_accuracy"] == pytest.approx(53 / 90)
    assert got["balanced_accuracy"] == pytest.approx(balanced)
    assert got["macro_f1"] == pytest.approx(26 / 45)
    assert got["macro_f1"] == pytest.approx(macro_f1)


def test_f1_equals_precision_recall_harmonic_mean():
    # the 2tp/(support+predicted) form used above is the usual 2PR/(P+R); check one class by hand
    tp, support, predicted = 3, 5, 4
    precision, recall = tp / predicted, tp / support
    assert 2 * precision * recall / (precision + recall) == pytest.approx(2 * tp / (support + predicted))


def test_absent_and_never_predicted_classes():
    # 3 classes; class 2 never occurs but is predicted once
    labels = [0, 0, 1, 1]
    preds = [0, 2, 1, 1]
    # confusion [[1, 0, 1], [0, 2, 0], [0, 0, 0]]
    # accuracy 3/4; balanced over present classes 0, 1: (1/2 + 2/2) / 2 = 3/4
    # F1: class 0: 2*1/(2+1) = 2/3; class 1: 2*2/(2+2) = 1; class 2: 0/(0+1) = 0 -> mean 5/9
    got = metrics.classification_metrics(np.asarray(labels), probs_for(preds, 3, seed=1))
    assert got["accuracy"] == pytest.approx(0.75)
    assert got["balanced_accuracy"] == pytest.approx(0.75)
    assert got["macro_f1"] == pytest.approx(5 / 9)


def test_class_never_present_nor_predicted_is_left_out():
    # 4 classes, class 3 absent everywhere: same numbers as the 3-class case above
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    preds = [0, 0, 1, 1, 2, 2, 2, 2, 0, 1]
    got = metrics.classification_metrics(np.asarray(labels), probs_for(preds, 4, seed=2))
    assert got["balanced_accuracy"] == pytest.approx(53 / 90)
    assert got["macro_f1"] == pytest.approx(26 / 45)


def test_perfect_and_imbalanced_predictions():
    labels = np.asarray([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    perfect = metrics.classification_metrics(labels, probs_for(labels, 2))
    assert perfect == {"accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0}
    # always predicting the majority: accuracy 0.8, balanced (1 + 0)/2 = 0.5,
    # F1: class 0 2*8/(8+10) = 8/9, class 1 0/(2+0) = 0 -> 4/9
    majority = metrics.classification_metrics(labels, probs_for(np.zeros(10, int), 2))
    assert majority["accuracy"] == pytest.approx(0.8)
    assert majority["balanced_accuracy"] == pytest.approx(0.5)
    assert majority["macro_f1"] == pytest.approx(4 / 9)


# ---------------------------------------------------------------- units


@pytest.mark.parametrize(
    "value,mpp",
    [("10x", 1.0), ("1.25x", 8.0), ("40X", 0.25), (" 20x ", 0.5), ("2.5", 4.0), (5, 2.0), (1.25, 8.0)],
)
def test_magnification_to_mpp(value, mpp):
    assert units.magnification_to_mpp(value) == pytest.approx(mpp)


@pytest.mark.parametrize("value", ["", "x", "ten x", "10xx", "0x", "-5x", "nan", "10 um"])
def test_magnification_to_mpp_rejects_bad_values(value):
    with pytest.raises(ValueError):
        units.magnification_to_mpp(value)


@pytest.mark.parametrize(
    "teacher,student,factor",
    [("10x", "1.25x", 8), ("10x", "5x", 2), ("40x", "10x", 4), ("20x", "20x", 1), ("20x", "1.25x", 16),
     # bare numbers are µm/px, as for slide targets: 1 -> 4 µm/px is a 4x downsample; mixed units work too
     ("1.0", "4.0", 4), (0.25, 2, 8), ("10x", "8", 8)],
)
def test_downsample_between(teacher, student, factor):
    got = units.downsample_between(teacher, student)
    assert got == factor and isinstance(got, int)


@pytest.mark.parametrize("teacher,student", [("10x", "3x"), ("10x", "20x"), ("10x", "4x"), ("10x", "bad"),
                                             ("4", "1")])  # 4 -> 1 µm/px would be an upsampling
def test_downsample_between_rejects_non_integer_or_upsampling(teacher, student):
    with pytest.raises(ValueError):
        units.downsample_between(teacher, student)


# ---------------------------------------------------------------- parallel


def test_check_batch_size_on_this_mesh():
    mesh = parallel.make_mesh()
    n = mesh.size
    assert parallel.check_batch_size(4 * n, mesh=mesh) == 4 * n  # a single process gets the whole batch
    for bad in (0, -n):
        with pytest.raises(ValueError):
            parallel.check_batch_size(bad, mesh=mesh)
    if n > 1:
        with pytest.raises(ValueError):
            parallel.check_batch_size(n + 1, mesh=mesh)


def test_check_batch_size_rejects_uneven_split_over_two_devices():
    # two simulated CPU devices need a fresh interpreter (the device count is fixed at backend start)
    code = textwrap.dedent(
        """
        import pytest
        from histokd_jax import parallel
        mesh = parallel.make_mesh()
        assert mesh.size == 2, mesh.size
        assert parallel.check_batch_size(6, mesh=mesh) == 6
        with pytest.raises(ValueError, match="divide"):
            parallel.check_batch_size(5, mesh=mesh)
        with pytest.raises(ValueError):
            parallel.check_batch_size(1, mesh=mesh)
        print("OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


def test_paired_accuracy_difference_is_the_accuracy_gap_with_a_paired_interval():
    from sklearn.metrics import accuracy_score

    from histokd_jax.metrics import paired_accuracy_difference

    rng = np.random.default_rng(0)
    slides = np.repeat(np.arange(40), 25)
    labels = rng.integers(0, 3, slides.size)
    hard = rng.random(40)[slides] < 0.5  # half the slides are hard for both models
    def model(p_right_easy, p_right_hard):
        right = rng.random(slides.size) < np.where(hard, p_right_hard, p_right_easy)
        guess = np.where(right, labels, (labels + 1) % 3)
        return np.eye(3)[guess]
    a, b = model(0.95, 0.6), model(0.9, 0.5)
    diff, lo, hi = paired_accuracy_difference(labels, a, b, groups=slides, n_boot=500)
    expected = accuracy_score(labels, a.argmax(1)) - accuracy_score(labels, b.argmax(1))
    assert diff == pytest.approx(expected) and lo < diff < hi
    # pairing cancels the shared slide effect: narrower than the two models' own intervals side by side
    ci_a = metrics.bootstrap_ci(labels, a, n_boot=500, groups=slides)["accuracy"]
    ci_b = metrics.bootstrap_ci(labels, b, n_boot=500, groups=slides)["accuracy"]
    assert hi - lo < 0.7 * ((ci_a[1] - ci_a[0]) + (ci_b[1] - ci_b[0])) / 2
    assert paired_accuracy_difference(labels, a, a, groups=slides, n_boot=50) == (0.0, 0.0, 0.0)
    right, wrong = np.eye(3)[labels], np.eye(3)[(labels + 1) % 3]
    assert paired_accuracy_difference(labels, right, wrong, n_boot=50) == (1.0, 1.0, 1.0)
