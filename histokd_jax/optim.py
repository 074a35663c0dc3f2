"""The optimiser chain built from a config: AdamW, warmup + cosine, clipping, accumulation."""

from __future__ import annotations

import ml_collections
import optax


def make_schedule(*, learning_rate: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warmup then cosine decay to zero over ``total_steps`` optimiser updates."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=0.0,
    )


def make_optimizer(optim: ml_collections.ConfigDict, *, total_steps: int) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay, global-norm clipping and optional gradient accumulation.

    ``optim.accumulate_steps > 1`` wraps the chain in ``optax.MultiSteps``: the
    parameters change once every that many calls, and ``total_steps`` counts calls.
    """
    accumulate = int(optim.get("accumulate_steps", 1))
    schedule = make_schedule(
        learning_rate=optim.learning_rate,
        total_steps=max(total_steps // accumulate, 1),
        warmup_steps=optim.warmup_steps // accumulate,
    )
    parts = []
    if optim.clip_norm:
        parts.append(optax.clip_by_global_norm(optim.clip_norm))
    parts.append(optax.adamw(schedule, weight_decay=optim.weight_decay))
    tx = optax.chain(*parts)
    if accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
    return tx
