"""Pure, unjitted step functions; the trainer jits them over the device mesh.

Every dependency (models, optimiser, loss settings) is a keyword-only argument so
callers bind them with ``functools.partial`` and the remaining signature is
``(state, [teacher_params,] batch) -> (state, metrics)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from histokd_jax import losses
from histokd_jax.models import apply_in_microbatches, last_stage, normalize_images, teacher_outputs
from histokd_jax.state import TrainState
from histokd_jax.symmetry import DIHEDRAL, dihedral


@dataclasses.dataclass(frozen=True)
class DistillLoss:
    """Weights and settings of the student objective (defaults: the paper's self-supervised setting)."""

    w_kl: float = 1.0
    w_feat: float = 1.0
    w_ce: float = 0.0
    temperature: float = 1.0
    feature_kind: str = "l2"
    feature_resize: str = "maxpool"


def _apply_update(state: TrainState, grads: Any, *, tx: optax.GradientTransformation) -> tuple[TrainState, jnp.ndarray]:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, optax.tree.norm(grads)


def _accuracy(logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    mask = mask.astype(jnp.float32)
    hits = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(hits * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def supervised_step(
    state: TrainState, batch: dict[str, jnp.ndarray], *, model: nn.Module, tx: optax.GradientTransformation, image_key: str
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
    """One cross-entropy update on the labelled samples of ``batch[image_key]``.

    Used for the high-resolution teacher (``image_key="teacher_image"``) and for the
    low-resolution label-only baseline (``"student_image"``).
    """
    images = normalize_images(batch[image_key])

    def loss_fn(params):
        logits, _ = model.apply({"params": params}, images)
        return losses.cross_entropy(logits, batch["label"], batch["has_label"]), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, grad_norm = _apply_update(state, grads, tx=tx)
    metrics = {
        "loss": loss,
        "accuracy": _accuracy(logits, batch["label"], batch["has_label"]),
        "grad_norm": grad_norm,
    }
    return new_state, metrics


def expand_views(batch: dict[str, jnp.ndarray], t_logits: jnp.ndarray, t_map: jnp.ndarray, *,
                 views_per_crop: int) -> tuple[jnp.ndarray, ...]:
    """K dihedral transforms of every crop's student image, each paired with the teacher map turned alike.

    Returns ``(student_images, teacher_logits, teacher_maps, labels, has_label)`` of
    ``K * B`` rows, crop-major: row ``i*K + k`` is transform ``k`` of crop ``i``, so the
    views of a crop stay on the device that holds the crop (no data moves between devices).
    """
    if not 1 <= views_per_crop <= len(DIHEDRAL):
        raise ValueError(f"distill.views_per_crop must be in 1..{len(DIHEDRAL)}, got {views_per_crop}")

    def interleave(x):  # (B, ...) per view -> (B*K, ...), crop-major
        views = jnp.stack([dihedral(x, k) for k in range(views_per_crop)], axis=1)
        return views.reshape(-1, *views.shape[2:])

    repeat = lambda x: jnp.repeat(x, views_per_crop, axis=0)  # noqa: E731
    return (interleave(batch["student_image"]), repeat(t_logits), interleave(t_map), repeat(batch["label"]),
            repeat(batch["has_label"]))


def distill_step(
    state: TrainState,
    teacher_params: Any,
    batch: dict[str, jnp.ndarray],
    *,
    student: nn.Module,
    teacher: nn.Module,
    tx: optax.GradientTransformation,
    loss: DistillLoss = DistillLoss(),
    views_per_crop: int = 1,
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
    """One student update against the frozen teacher, run live on the same crop.

    The teacher sees ``teacher_image`` (high resolution) and the student sees
    ``student_image`` (the same augmented crop, downsampled). Teacher outputs pass
    through ``stop_gradient`` and its parameters are an argument, not part of the
    state: they are never differentiated, updated or donated.

    Cheaper teacher targets (``teacher_targets``, ``expand_views``): a batch that carries
    ``teacher_logits``/``teacher_map`` (a target cache) skips the teacher, and
    ``views_per_crop=K`` trains the student on K dihedral views of each crop against
    one teacher pass (the batch then holds B/K crops for B student views).
    """
    if "teacher_map" in batch:
        t_logits, t_map = batch["teacher_logits"], batch["teacher_map"]
    else:
        t_logits, t_map = teacher_outputs(teacher, teacher_params, batch["teacher_image"])
    t_logits = jax.lax.stop_gradient(t_logits.astype(jnp.float32))
    t_map = jax.lax.stop_gradient(t_map.astype(jnp.float32))
    s_images, labels, has_label = batch["student_image"], batch["label"], batch["has_label"]
    if views_per_crop > 1:
        s_images, t_logits, t_map, labels, has_label = expand_views(batch, t_logits, t_map,
                                                                    views_per_crop=views_per_crop)
    s_images = normalize_images(s_images)

    def loss_fn(params):
        s_logits, s_features = student.apply({"params": params}, s_images)
        kl = losses.soft_kl(s_logits, t_logits, loss.temperature)
        feat = (
            losses.feature_loss(last_stage(s_features), t_map, kind=loss.feature_kind, resize=loss.feature_resize)
            if loss.w_feat
            else jnp.zeros(())
        )
        ce = losses.cross_entropy(s_logits, labels, has_label) if loss.w_ce else jnp.zeros(())
        total = loss.w_kl * kl + loss.w_feat * feat + loss.w_ce * ce
        return total, (s_logits, kl, feat, ce)

    (total, (s_logits, kl, feat, ce)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, grad_norm = _apply_update(state, grads, tx=tx)
    metrics = {
        "loss": total,
        "kl": kl,
        "feature": feat,
        "ce": ce,
        "agreement": jnp.mean((jnp.argmax(s_logits, -1) == jnp.argmax(t_logits, -1)).astype(jnp.float32)),
        "grad_norm": grad_norm,
    }
    return new_state, metrics


def eval_step(params: Any, batch: dict[str, jnp.ndarray], *, model: nn.Module, image_key: str) -> jnp.ndarray:
    """Class probabilities for ``batch[image_key]``; metrics are computed on the host."""
    logits, _ = apply_in_microbatches(model, {"params": params}, normalize_images(batch[image_key]))
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
