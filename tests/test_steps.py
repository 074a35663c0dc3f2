"""Step functions: frozen teacher, trained student, loss composition, supervised and eval steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from histokd_jax import losses, models, steps
from histokd_jax.optim import make_optimizer
from histokd_jax.state import create_train_state
from tests.helpers import numpy_params

CLASSES = 3
# Two-stage ResNet-GNs keep compilation short; the steps do not depend on the depth.
# Teacher 16 px -> stages 4x4, 2x2; student 8 px -> 2x2, 1x1: the distilled maps are 2x2 and 1x1.
TEACHER_PX, STUDENT_PX = 16, 8
# different early widths than the student: the two parameter trees have different shapes
TEACHER = models.ResNetGN(num_classes=CLASSES, widths=(16, 16), blocks_per_stage=(1, 1), num_groups=4)
STUDENT = models.ResNetGN(num_classes=CLASSES, widths=(8, 16), blocks_per_stage=(1, 1), num_groups=4)
# every weight non-default so each term is checked: T=2, l1, both resizes, CE on
LOSS = steps.DistillLoss(w_kl=0.7, w_feat=0.3, w_ce=0.5, temperature=2.0, feature_kind="l1", feature_resize="maxpool+bicubic")
LR, WD = 3e-3, 0.1


def host_copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def make_batch(seed=0, n=4, labels=(0, 1, 2, -1)):
    rng = np.random.default_rng(seed)
    teacher = rng.integers(0, 256, size=(n, TEACHER_PX, TEACHER_PX, 3), dtype=np.uint8)
    f = TEACHER_PX // STUDENT_PX
    blocks = teacher.reshape(n, STUDENT_PX, f, STUDENT_PX, f, 3).astype(np.float64).mean(axis=(2, 4))
    labels = np.asarray(labels, np.int32)
    return {
        "teacher_image": teacher,
        "student_image": np.rint(blocks).astype(np.uint8),
        "label": labels,
        "has_label": labels >= 0,
    }


def constant_lr_optimizer(learning_rate, weight_decay=0.0, clip_norm=0.0):
    config = ml_collections.ConfigDict(
        dict(learning_rate=learning_rate, warmup_steps=0, weight_decay=weight_decay, clip_norm=clip_norm)
    )
    # a horizon far beyond the steps taken: the cosine stays at the peak (within 1e-5 relative)
    return make_optimizer(config, total_steps=1_000_000)


@pytest.fixture(scope="module")
def teacher_params():
    return numpy_params(TEACHER, TEACHER_PX, seed=1)


@pytest.fixture(scope="module")
def student_params():
    return numpy_params(STUDENT, STUDENT_PX, seed=2)


@pytest.fixture(scope="module")
def batch():
    return {k: jnp.asarray(v) for k, v in make_batch().items()}


@pytest.fixture(scope="module")
def tx():
    # AdamW at a constant rate (warmup 0, far horizon), with weight decay and clipping
    return constant_lr_optimizer(LR, weight_decay=WD, clip_norm=1.0)


@pytest.fixture(scope="module")
def distill(tx):
    """The step bound as the module docstring says, jitted once for the whole file."""
    return jax.jit(functools.partial(steps.distill_step, student=STUDENT, teacher=TEACHER, tx=tx, loss=LOSS))


@pytest.fixture(scope="module")
def supervised(tx):
    return jax.jit(functools.partial(steps.supervised_step, model=STUDENT, tx=tx, image_key="student_image"))


@pytest.fixture(scope="module")
def forward():
    """model -> jitted ``(params, uint8 images) -> (logits, features)``."""
    fns = {
        m: jax.jit(lambda p, x, m=m: m.apply({"params": p}, models.normalize_images(x))) for m in (TEACHER, STUDENT)
    }
    return lambda model, params, images: fns[model](params, images)


# ---------------------------------------------------------------- distillation


def test_default_loss_is_the_self_supervised_setting():
    default = steps.DistillLoss()
    assert (default.w_kl, default.w_feat, default.w_ce) == (1.0, 1.0, 0.0)


@pytest.mark.slow
def test_distill_trains_student_and_leaves_teacher_untouched(tx, teacher_params, student_params, batch):
    # Jitted as the trainer does: the student state is donated, the teacher's parameters are not.
    distill = jax.jit(
        functools.partial(steps.distill_step, student=STUDENT, teacher=TEACHER, tx=tx, loss=LOSS), donate_argnums=(0,)
    )
    state = create_train_state(jax.tree.map(jnp.copy, student_params), tx=tx)
    teacher_before = host_copy(teacher_params)
    student_before = host_copy(student_params)

    losses_seen = []
    for _ in range(20):
        state, metrics = distill(state, teacher_params, batch)
        losses_seen.append(float(metrics["loss"]))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(teacher_params))

    assert int(state.step) == 20
    assert all(np.isfinite(losses_seen))
    # teacher: bit-identical, every leaf
    for before, after in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(teacher_params), strict=True):
        assert np.array_equal(before, np.asarray(after))
    # student: every leaf moved
    assert jax.tree.structure(state.params) == jax.tree.structure(student_before)
    for before, after in zip(jax.tree.leaves(student_before), jax.tree.leaves(state.params), strict=True):
        assert not np.array_equal(before, np.asarray(after))
    # the objective goes down on a fixed batch
    assert np.mean(losses_seen[-3:]) < np.mean(losses_seen[:3])

    # the optimiser state holds moments for the student only (Adam: mu and nu, one each per parameter)
    student_size = sum(x.size for x in jax.tree.leaves(student_before))
    teacher_size = sum(x.size for x in jax.tree.leaves(teacher_before))
    assert student_size != teacher_size
    moment_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert moment_size == 2 * student_size
    student_shapes = sorted(x.shape for x in jax.tree.leaves(student_before))
    for subtree in _param_like_subtrees(state.opt_state):
        assert jax.tree.structure(subtree) == jax.tree.structure(student_before)
        assert sorted(x.shape for x in jax.tree.leaves(subtree)) == student_shapes


def _param_like_subtrees(tree):
    """Dict subtrees of an optimiser state (the per-parameter moments)."""
    found = []

    def visit(node):
        if isinstance(node, dict):
            found.append(node)
        elif isinstance(node, (tuple, list)):  # chain tuples and NamedTuple states
            for child in node:
                visit(child)

    visit(tree)
    assert found, "no per-parameter moments found in the optimiser state"
    return found


@pytest.mark.slow
def test_no_gradient_reaches_the_teacher(tx, teacher_params, student_params, batch):
    state = create_train_state(student_params, tx=tx)
    step = functools.partial(steps.distill_step, student=STUDENT, teacher=TEACHER, tx=tx, loss=LOSS)

    def through_step(tp):
        return step(state, tp, batch)[1]["loss"]

    # the same objective without stop_gradient: it depends on the teacher, so the check can fail
    def leaky(tp):
        t_logits, t_features = TEACHER.apply({"params": tp}, models.normalize_images(batch["teacher_image"]))
        s_logits, s_features = STUDENT.apply({"params": state.params}, models.normalize_images(batch["student_image"]))
        return losses.soft_kl(s_logits, t_logits, 2.0) + losses.feature_loss(
            models.last_stage(s_features), models.last_stage(t_features), kind="l1", resize="maxpool+bicubic"
        )

    grads, leaky_grads = jax.jit(lambda tp: (jax.grad(through_step)(tp), jax.grad(leaky)(tp)))(teacher_params)
    assert all(np.all(np.asarray(g) == 0.0) for g in jax.tree.leaves(grads))
    assert any(np.any(np.asarray(g) != 0.0) for g in jax.tree.leaves(leaky_grads))


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.slow
def test_distill_loss_is_the_weighted_sum_of_its_terms(tx, distill, forward, teacher_params, student_params, batch):
    _, metrics = distill(create_train_state(student_params, tx=tx), teacher_params, batch)

    # model outputs, then every loss term recomputed in numpy
    t_logits, t_feats = forward(TEACHER, teacher_params, batch["teacher_image"])
    s_logits, s_feats = forward(STUDENT, student_params, batch["student_image"])
    t_logits, s_logits = np.asarray(t_logits, np.float64), np.asarray(s_logits, np.float64)
    t_map, s_map = np.asarray(t_feats["stage2"], np.float64), np.asarray(s_feats["stage2"], np.float64)
    assert t_map.shape[1:3] == (2, 2) and s_map.shape[1:3] == (1, 1)

    temp = LOSS.temperature
    log_pt, log_ps = _np_log_softmax(t_logits / temp), _np_log_softmax(s_logits / temp)
    kl = temp**2 * np.mean(np.sum(np.exp(log_pt) * (log_pt - log_ps), -1))
    # 2x2 -> 1x1: max-pool is the max; the symmetric bicubic kernel gives the mean
    pooled = np.mean(np.abs(s_map - t_map.max(axis=(1, 2), keepdims=True)))
    cubic = np.mean(np.abs(s_map - t_map.mean(axis=(1, 2), keepdims=True)))
    feat = 0.5 * (pooled + cubic)
    labels, mask = np.asarray(batch["label"]), np.asarray(batch["has_label"])
    log_p = _np_log_softmax(s_logits)
    ce = -np.mean([log_p[i, labels[i]] for i in range(len(labels)) if mask[i]])

    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["feature"]), feat, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(metrics["ce"]), ce, rtol=1e-4, atol=1e-6)
    expected = LOSS.w_kl * kl + LOSS.w_feat * feat + LOSS.w_ce * ce
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4, atol=1e-6)
    agreement = np.mean(np.argmax(s_logits, -1) == np.argmax(t_logits, -1))
    assert float(metrics["agreement"]) == pytest.approx(agreement)


# ---------------------------------------------------------------- supervised


@pytest.mark.slow
def test_supervised_step(tx, supervised, student_params):
    # no labels at all: CE is 0, its gradient is 0, and AdamW only applies decoupled weight decay
    unlabelled = {k: jnp.asarray(v) for k, v in make_batch(seed=3, labels=(-1, -1, -1, -1)).items()}
    new_state, metrics = supervised(create_train_state(student_params, tx=tx), unlabelled)
    assert float(metrics["loss"]) == 0.0
    assert float(metrics["grad_norm"]) == 0.0
    for before, after in zip(jax.tree.leaves(student_params), jax.tree.leaves(new_state.params), strict=True):
        before = np.asarray(before, np.float64)
        np.testing.assert_allclose(np.asarray(after), before * (1.0 - LR * WD), rtol=1e-5, atol=1e-8)

    # all labelled: the loss goes down on a fixed batch
    labelled = {k: jnp.asarray(v) for k, v in make_batch(seed=4, labels=(0, 1, 2, 1)).items()}
    state = create_train_state(student_params, tx=tx)
    seen = []
    for _ in range(15):
        state, metrics = supervised(state, labelled)
        seen.append(float(metrics["loss"]))
    assert np.mean(seen[-3:]) < np.mean(seen[:3])


@pytest.mark.slow
def test_supervised_accuracy_counts_labelled_rows_only(tx, supervised, forward, student_params):
    b = make_batch(seed=5, labels=(0, 0, 0, -1))
    logits, _ = forward(STUDENT, student_params, jnp.asarray(b["student_image"]))
    pred = np.argmax(np.asarray(logits), -1)
    b["label"] = np.asarray([pred[0], (pred[1] + 1) % CLASSES, pred[2], -1], np.int32)  # 2 of 3 labelled right
    _, metrics = supervised(create_train_state(student_params, tx=tx), {k: jnp.asarray(v) for k, v in b.items()})
    assert float(metrics["accuracy"]) == pytest.approx(2.0 / 3.0)


# ---------------------------------------------------------------- eval


def test_eval_step_returns_probabilities(student_params, batch):
    probs = jax.jit(functools.partial(steps.eval_step, model=STUDENT, image_key="student_image"))(student_params, batch)
    probs = np.asarray(probs)
    assert probs.shape == (4, CLASSES)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_mixed_precision_computes_in_bfloat16_and_keeps_float32_parameters_and_finite_losses(
        teacher_params, student_params, batch, tx):
    """bfloat16 compute (model.compute_dtype) on CPU: same parameter tree, float32 parameters,
    logits within bfloat16 rounding of the float32 model, and a distillation step with finite losses."""
    import dataclasses

    teacher16 = dataclasses.replace(TEACHER, dtype=jnp.bfloat16)
    student16 = dataclasses.replace(STUDENT, dtype=jnp.bfloat16)
    images = models.normalize_images(batch["teacher_image"])
    logits32, feats32 = TEACHER.apply({"params": teacher_params}, images)
    logits16, feats16 = teacher16.apply({"params": teacher_params}, images)
    assert feats16["stage2"].dtype == jnp.bfloat16 and logits16.dtype == jnp.float32
    # bfloat16 keeps 8 bits of mantissa: relative error ~1e-2 through two residual stages
    scale = float(jnp.max(jnp.abs(logits32)))
    assert float(jnp.max(jnp.abs(logits16 - logits32))) < 0.1 * scale
    state16 = create_train_state(student_params, tx=tx)
    step = jax.jit(functools.partial(steps.distill_step, student=student16, teacher=teacher16, tx=tx, loss=LOSS))
    for _ in range(3):
        state16, metrics = step(state16, teacher_params, batch)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    leaves = jax.tree.leaves(state16.params)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    assert jax.tree.structure(state16.params) == jax.tree.structure(student_params)


def test_compute_dtype_config_is_checked():
    from histokd_jax import model_config

    assert model_config.compute_dtype("bfloat16") == jnp.bfloat16
    with pytest.raises(ValueError, match="compute_dtype"):
        model_config.compute_dtype("float16")
