"""Distillation losses: pure functions of arrays, no model or optimiser inside."""

from __future__ import annotations

import jax
import jax.numpy as jnp

FEATURE_KINDS = ("l2", "l1")
FEATURE_RESIZES = ("maxpool", "bicubic", "maxpool+bicubic")


def soft_kl(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray, temperature: float = 1.0) -> jnp.ndarray:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` summed over classes, averaged over the batch.

    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures
    (Hinton et al.); the batch mean matches PyTorch's ``KLDivLoss(reduction="batchmean")``.
    """
    t = teacher_logits.astype(jnp.float32) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    log_p_t = jax.nn.log_softmax(t, axis=-1)
    log_p_s = jax.nn.log_softmax(s, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return temperature**2 * jnp.mean(kl)


def adaptive_max_pool(x: jnp.ndarray, out_hw: tuple[int, int]) -> jnp.ndarray:
    """Max-pool an NHWC map to ``out_hw`` (windows as in PyTorch's AdaptiveMaxPool2d)."""
    _, h, w, c = x.shape
    oh, ow = out_hw
    if h % oh == 0 and w % ow == 0:  # the common case: one reshape, no gather
        return x.reshape(x.shape[0], oh, h // oh, ow, w // ow, c).max(axis=(2, 4))
    rows = []
    for i in range(oh):
        r0, r1 = (i * h) // oh, -(-((i + 1) * h) // oh)
        cols = [x[:, r0:r1, (j * w) // ow : -(-((j + 1) * w) // ow), :].max(axis=(1, 2)) for j in range(ow)]
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)


def bicubic_resize(x: jnp.ndarray, out_hw: tuple[int, int]) -> jnp.ndarray:
    """Antialiased bicubic resize of an NHWC map (the kernel widens when shrinking)."""
    n, _, _, c = x.shape
    return jax.image.resize(x, (n, *out_hw, c), method="cubic", antialias=True)


def _distance(a: jnp.ndarray, b: jnp.ndarray, kind: str) -> jnp.ndarray:
    if kind == "l2":
        return jnp.mean(jnp.square(a - b))
    if kind == "l1":
        return jnp.mean(jnp.abs(a - b))
    raise ValueError(f"feature loss kind must be one of {FEATURE_KINDS}, got {kind!r}")


def feature_loss(
    student_map: jnp.ndarray, teacher_map: jnp.ndarray, *, kind: str = "l2", resize: str = "maxpool"
) -> jnp.ndarray:
    """Distance between the student map and the teacher map resized to the student's size.

    ``resize="maxpool+bicubic"`` is the mean of the two losses (the paper's intent;
    its public code computed only half of the max-pool term).
    """
    if student_map.shape[-1] != teacher_map.shape[-1]:
        raise ValueError(
            f"feature maps differ in channels (student {student_map.shape[-1]}, teacher {teacher_map.shape[-1]}); "
            "give the student the teacher's last width"
        )
    out_hw = student_map.shape[1:3]
    if teacher_map.shape[1] < out_hw[0] or teacher_map.shape[2] < out_hw[1]:
        raise ValueError(f"teacher map {teacher_map.shape[1:3]} is smaller than the student map {out_hw}")
    s = student_map.astype(jnp.float32)
    t = teacher_map.astype(jnp.float32)
    if resize == "maxpool":
        return _distance(s, adaptive_max_pool(t, out_hw), kind)
    if resize == "bicubic":
        return _distance(s, bicubic_resize(t, out_hw), kind)
    if resize == "maxpool+bicubic":
        pooled = _distance(s, adaptive_max_pool(t, out_hw), kind)
        cubic = _distance(s, bicubic_resize(t, out_hw), kind)
        return 0.5 * (pooled + cubic)
    raise ValueError(f"feature resize must be one of {FEATURE_RESIZES}, got {resize!r}")


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Mean softmax cross-entropy over the samples where ``mask`` is true.

    Unlabelled samples (mask false) contribute nothing; a batch with no labels gives 0
    rather than NaN, so partly labelled batches can be mixed freely.
    """
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    labels = jnp.clip(labels.astype(jnp.int32), 0, logits.shape[-1] - 1)  # unlabelled rows carry -1
    nll = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
    if mask is None:
        return jnp.mean(nll)
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
