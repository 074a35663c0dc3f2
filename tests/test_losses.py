"""Losses against numpy references written here and hand-computed values."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from histokd_jax import losses as _losses


class losses:  # jitted wrappers: one compile per call instead of one per eager op (keeps the file fast)
    soft_kl = staticmethod(jax.jit(_losses.soft_kl))
    feature_loss = staticmethod(jax.jit(_losses.feature_loss, static_argnames=("kind", "resize")))
    cross_entropy = staticmethod(jax.jit(_losses.cross_entropy))
    adaptive_max_pool = staticmethod(jax.jit(_losses.adaptive_max_pool, static_argnums=1))


# ---------------------------------------------------------------- numpy references


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_soft_kl(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """T^2 * mean_rows sum_c p_t (log p_t - log p_s), with p = softmax(logits / T)."""
    log_pt = np_log_softmax(np.asarray(teacher, np.float64) / temperature)
    log_ps = np_log_softmax(np.asarray(student, np.float64) / temperature)
    per_row = np.sum(np.exp(log_pt) * (log_pt - log_ps), axis=-1)
    return temperature**2 * per_row.mean()


def np_adaptive_max_pool(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """PyTorch AdaptiveMaxPool2d windows on NHWC: rows floor(i*H/o) .. ceil((i+1)*H/o)."""
    n, h, w, c = x.shape
    oh, ow = out_hw
    out = np.empty((n, oh, ow, c), x.dtype)
    for i in range(oh):
        r0, r1 = math.floor(i * h / oh), math.ceil((i + 1) * h / oh)
        for j in range(ow):
            c0, c1 = math.floor(j * w / ow), math.ceil((j + 1) * w / ow)
            out[:, i, j, :] = x[:, r0:r1, c0:c1, :].max(axis=(1, 2))
    return out


def np_cross_entropy(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
    log_p = np_log_softmax(logits)
    total, count = 0.0, 0
    for row, (label, keep) in enumerate(zip(labels, mask)):
        if keep:
            total += -log_p[row, label]
            count += 1
    return total / count


# ---------------------------------------------------------------- soft_kl


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_kl_matches_numpy(temperature):
    rng = np.random.default_rng(0)
    s = rng.normal(scale=3.0, size=(6, 5)).astype(np.float32)
    t = rng.normal(scale=3.0, size=(6, 5)).astype(np.float32)
    got = float(losses.soft_kl(jnp.asarray(s), jnp.asarray(t), temperature))
    np.testing.assert_allclose(got, np_soft_kl(s, t, temperature), rtol=1e-5, atol=1e-6)


def test_soft_kl_hand_computed_and_direction():
    # teacher p = (1/2, 1/2); student q = softmax(log 3, 0) = (3/4, 1/4)
    # KL(p||q) = 1/2 log((1/2)/(3/4)) + 1/2 log((1/2)/(1/4)) = 1/2 log(4/3)
    s = jnp.asarray([[math.log(3.0), 0.0]])
    t = jnp.asarray([[0.0, 0.0]])
    np.testing.assert_allclose(float(losses.soft_kl(s, t, 1.0)), 0.5 * math.log(4.0 / 3.0), rtol=1e-6)
    # the reverse direction KL(q||p) = 3/4 log(3/2) + 1/4 log(1/2) is a different number
    reverse = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert abs(float(losses.soft_kl(s, t, 1.0)) - reverse) > 1e-3


def test_soft_kl_temperature_scaling_of_hand_case():
    # T = 2: logits halve; teacher still uniform, student softmax(log(3)/2, 0) = (sqrt3, 1)/(sqrt3 + 1)
    q0 = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)
    q1 = 1.0 - q0
    expected = 4.0 * (0.5 * math.log(0.5 / q0) + 0.5 * math.log(0.5 / q1))
    got = float(losses.soft_kl(jnp.asarray([[math.log(3.0), 0.0]]), jnp.zeros((1, 2)), 2.0))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_kl_zero_for_equal_logits(temperature):
    x = np.random.default_rng(1).normal(scale=5.0, size=(4, 7)).astype(np.float32)
    assert abs(float(losses.soft_kl(jnp.asarray(x), jnp.asarray(x), temperature))) < 1e-6


def test_soft_kl_invariant_to_per_row_constants():
    rng = np.random.default_rng(2)
    s = rng.normal(size=(5, 4)).astype(np.float32)
    t = rng.normal(size=(5, 4)).astype(np.float32)
    base = float(losses.soft_kl(jnp.asarray(s), jnp.asarray(t), 2.0))
    shifted = float(
        losses.soft_kl(
            jnp.asarray(s + rng.normal(scale=10.0, size=(5, 1)).astype(np.float32)),
            jnp.asarray(t + rng.normal(scale=10.0, size=(5, 1)).astype(np.float32)),
            2.0,
        )
    )
    np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-6)


def test_soft_kl_non_negative_on_random_inputs():
    rng = np.random.default_rng(3)
    for _ in range(20):
        s = rng.normal(scale=rng.uniform(0.1, 10.0), size=(3, 6)).astype(np.float32)
        t = rng.normal(scale=rng.uniform(0.1, 10.0), size=(3, 6)).astype(np.float32)
        temperature = float(rng.choice([1.0, 2.0, 4.0]))
        assert float(losses.soft_kl(jnp.asarray(s), jnp.asarray(t), temperature)) >= -1e-6


def test_soft_kl_is_batch_mean_not_sum():
    rng = np.random.default_rng(4)
    s = rng.normal(size=(1, 3)).astype(np.float32)
    t = rng.normal(size=(1, 3)).astype(np.float32)
    one = float(losses.soft_kl(jnp.asarray(s), jnp.asarray(t)))
    repeated = float(losses.soft_kl(jnp.asarray(np.repeat(s, 8, 0)), jnp.asarray(np.repeat(t, 8, 0))))
    np.testing.assert_allclose(repeated, one, rtol=1e-5)


# ---------------------------------------------------------------- feature_loss: max-pool


def test_feature_loss_maxpool_4x4_to_2x2_l2():
    rng = np.random.default_rng(5)
    teacher = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    student = rng.normal(size=(2, 2, 2, 3)).astype(np.float32)
    pooled = teacher.reshape(2, 2, 2, 2, 2, 3).max(axis=(2, 4))  # blocks of 2x2
    expected = np.mean((student - pooled) ** 2)
    got = float(losses.feature_loss(jnp.asarray(student), jnp.asarray(teacher), kind="l2", resize="maxpool"))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_feature_loss_maxpool_2x2_to_1x1_l1():
    rng = np.random.default_rng(6)
    teacher = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
    student = rng.normal(size=(3, 1, 1, 4)).astype(np.float32)
    pooled = teacher.max(axis=(1, 2), keepdims=True)
    expected = np.mean(np.abs(student - pooled))
    got = float(losses.feature_loss(jnp.asarray(student), jnp.asarray(teacher), kind="l1", resize="maxpool"))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_feature_loss_hand_example():
    # one channel; teacher 2x2 = [[1, 5], [2, 3]] -> max 5; student 1x1 = 2 -> l2 = 9, l1 = 3
    teacher = jnp.asarray([[1.0, 5.0], [2.0, 3.0]]).reshape(1, 2, 2, 1)
    student = jnp.full((1, 1, 1, 1), 2.0)
    assert float(losses.feature_loss(student, teacher, kind="l2", resize="maxpool")) == pytest.approx(9.0)
    assert float(losses.feature_loss(student, teacher, kind="l1", resize="maxpool")) == pytest.approx(3.0)


@pytest.mark.parametrize(
    "teacher_hw,student_hw",
    [((5, 5), (2, 2)), ((5, 5), (3, 3)), ((7, 3), (3, 2)), ((6, 4), (3, 3)), ((6, 5), (3, 2)), ((5, 5), (5, 5))],
)
def test_feature_loss_maxpool_non_divisible_matches_pytorch_windows(teacher_hw, student_hw):
    rng = np.random.default_rng(7)
    teacher = rng.normal(size=(2, *teacher_hw, 3)).astype(np.float32)
    student = rng.normal(size=(2, *student_hw, 3)).astype(np.float32)
    expected = np.mean((student - np_adaptive_max_pool(teacher, student_hw)) ** 2)
    np.testing.assert_allclose(
        np.asarray(losses.adaptive_max_pool(jnp.asarray(teacher), student_hw)),
        np_adaptive_max_pool(teacher, student_hw),
    )
    if teacher_hw in ((5, 5), (6, 4)):  # through the public loss too (each call compiles; keep it to two)
        got = float(losses.feature_loss(jnp.asarray(student), jnp.asarray(teacher), kind="l2", resize="maxpool"))
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_numpy_reference_windows_overlap_as_in_pytorch():
    # 5 -> 2: windows [0, 3) and [2, 5) share row 2 (sanity check of the reference itself)
    x = np.arange(5, dtype=np.float32).reshape(1, 5, 1, 1)
    np.testing.assert_array_equal(np_adaptive_max_pool(x, (2, 1)).ravel(), [2.0, 4.0])


# ---------------------------------------------------------------- feature_loss: bicubic


@pytest.mark.parametrize("teacher_hw,student_hw", [((8, 8), (2, 2)), ((7, 4), (3, 3))])
def test_bicubic_keeps_a_constant_map_constant(teacher_hw, student_hw):
    values = np.asarray([0.5, -2.0, 3.25], np.float32)  # one constant per channel
    teacher = np.broadcast_to(values, (2, *teacher_hw, 3)).copy()
    same = np.broadcast_to(values, (2, *student_hw, 3)).copy()
    resized = np.asarray(_losses.bicubic_resize(jnp.asarray(teacher), student_hw))
    np.testing.assert_allclose(resized, same, atol=1e-6)
    loss = float(losses.feature_loss(jnp.asarray(same), jnp.asarray(teacher), kind="l2", resize="bicubic"))
    assert abs(loss) < 1e-6
    # against a different constant student the distance is exactly the per-channel offset
    other = same + np.asarray([1.0, -2.0, 0.5], np.float32)
    l2 = float(losses.feature_loss(jnp.asarray(other), jnp.asarray(teacher), kind="l2", resize="bicubic"))
    np.testing.assert_allclose(l2, np.mean(np.square([1.0, -2.0, 0.5])), rtol=1e-5)


def test_bicubic_2x2_to_1x1_is_the_mean():
    # two input samples at equal distance from the output centre: any symmetric
    # normalised kernel weights them equally, so the result is the window mean
    rng = np.random.default_rng(8)
    teacher = rng.normal(size=(2, 2, 2, 3)).astype(np.float32)
    student = rng.normal(size=(2, 1, 1, 3)).astype(np.float32)
    expected = np.mean((student - teacher.mean(axis=(1, 2), keepdims=True)) ** 2)
    got = float(losses.feature_loss(jnp.asarray(student), jnp.asarray(teacher), kind="l2", resize="bicubic"))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


# ---------------------------------------------------------------- feature_loss: maxpool+bicubic


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_maxpool_plus_bicubic_is_mean_of_both_terms(kind):
    # 2x2 -> 1x1: max-pool gives the max, bicubic gives the mean (see above)
    rng = np.random.default_rng(9)
    teacher = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
    student = rng.normal(size=(3, 1, 1, 4)).astype(np.float32)
    dist = (lambda d: np.mean(np.abs(d))) if kind == "l1" else (lambda d: np.mean(d**2))
    pooled_term = dist(student - teacher.max(axis=(1, 2), keepdims=True))
    cubic_term = dist(student - teacher.mean(axis=(1, 2), keepdims=True))
    assert abs(pooled_term - cubic_term) > 1e-2  # the two terms differ, so the mix is informative
    got = float(losses.feature_loss(jnp.asarray(student), jnp.asarray(teacher), kind=kind, resize="maxpool+bicubic"))
    np.testing.assert_allclose(got, 0.5 * (pooled_term + cubic_term), rtol=1e-5)


def test_maxpool_plus_bicubic_with_constant_teacher_on_non_divisible_sizes():
    # constant teacher: both resized maps equal the constant, so the mix equals each term
    teacher = np.full((2, 5, 5, 2), 1.5, np.float32)
    student = np.random.default_rng(10).normal(size=(2, 2, 2, 2)).astype(np.float32)
    expected = np.mean((student - 1.5) ** 2)
    got = float(losses.feature_loss(jnp.asarray(student), jnp.asarray(teacher), kind="l2", resize="maxpool+bicubic"))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


# ---------------------------------------------------------------- feature_loss: errors


def test_feature_loss_rejects_bad_arguments():
    s = jnp.zeros((1, 2, 2, 4))
    t = jnp.zeros((1, 4, 4, 4))
    with pytest.raises(ValueError):
        losses.feature_loss(s, t, kind="l3")
    with pytest.raises(ValueError):
        losses.feature_loss(s, t, resize="nearest")
    with pytest.raises(ValueError):
        losses.feature_loss(s, jnp.zeros((1, 4, 4, 8)))  # channel mismatch
    with pytest.raises(ValueError):
        losses.feature_loss(jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 2, 2, 4)))  # teacher smaller than student


# ---------------------------------------------------------------- cross_entropy


def test_cross_entropy_with_mask_matches_numpy():
    rng = np.random.default_rng(11)
    logits = rng.normal(scale=2.0, size=(6, 4)).astype(np.float32)
    labels = np.asarray([0, 3, -1, 2, -1, 1], np.int32)
    mask = labels >= 0
    got = float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask)))
    np.testing.assert_allclose(got, np_cross_entropy(logits, labels, mask), rtol=1e-5)


def test_cross_entropy_without_mask_is_plain_mean():
    rng = np.random.default_rng(12)
    logits = rng.normal(size=(5, 3)).astype(np.float32)
    labels = np.asarray([0, 1, 2, 1, 0], np.int32)
    got = float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_allclose(got, np_cross_entropy(logits, labels, np.ones(5, bool)), rtol=1e-5)


def test_cross_entropy_hand_value():
    # uniform logits over 4 classes: -log(1/4) = log 4 for every labelled row
    got = float(losses.cross_entropy(jnp.zeros((3, 4)), jnp.asarray([0, 1, -1]), jnp.asarray([True, True, False])))
    np.testing.assert_allclose(got, math.log(4.0), rtol=1e-6)


def test_cross_entropy_all_masked_is_zero_not_nan():
    logits = jnp.asarray(np.random.default_rng(13).normal(size=(4, 3)).astype(np.float32))
    labels = jnp.full((4,), -1, jnp.int32)
    mask = jnp.zeros((4,), bool)
    value = float(losses.cross_entropy(logits, labels, mask))
    assert value == 0.0
    grad = jax.grad(lambda x: losses.cross_entropy(x, labels, mask))(logits)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad) == 0.0)


def test_cross_entropy_masked_rows_with_label_minus_one_do_not_contribute():
    rng = np.random.default_rng(14)
    logits = rng.normal(size=(4, 3)).astype(np.float32)
    labels = jnp.asarray([2, -1, 0, -1])
    mask = jnp.asarray([True, False, True, False])
    base = float(losses.cross_entropy(jnp.asarray(logits), labels, mask))
    assert np.isfinite(base)
    changed = logits.copy()
    changed[[1, 3]] = rng.normal(scale=50.0, size=(2, 3))  # masked rows: anything
    np.testing.assert_allclose(float(losses.cross_entropy(jnp.asarray(changed), labels, mask)), base, rtol=1e-6)
    grad = np.asarray(jax.grad(lambda x: losses.cross_entropy(x, labels, mask))(jnp.asarray(logits)))
    assert np.all(grad[[1, 3]] == 0.0)
    assert np.any(grad[[0, 2]] != 0.0)
