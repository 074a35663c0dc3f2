"""Training state: a plain pytree of (step, params, opt_state), nothing callable inside.

Keeping functions (apply_fn, tx) out of the state makes it trivially
checkpointable and shardable; the step functions receive them as arguments.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    opt_state: Any


def init_params(model: nn.Module, *, rng: jax.Array, input_px: int) -> Any:
    """Initialise ``model`` for square RGB inputs of side ``input_px``.

    Jitted: run eagerly, every initialiser would compile on its own (~17 s on CPU).
    """
    dummy = jnp.zeros((1, input_px, input_px, 3), jnp.float32)
    return jax.jit(model.init)(rng, dummy)["params"]


def abstract_params(model: nn.Module, *, input_px: int) -> Any:
    """Shapes and dtypes of the parameters, without computing them (for strict restores)."""
    dummy = jax.ShapeDtypeStruct((1, input_px, input_px, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]


def create_train_state(params: Any, *, tx: optax.GradientTransformation) -> TrainState:
    opt_state = jax.jit(tx.init)(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def count_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
