"""Helpers shared by the unit tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def numpy_params(model, px, seed):
    """Parameters drawn with numpy (He-normal kernels, unit GN scales, small random biases).

    jax.random compiles slowly on small CPUs; the shapes still come from the model.
    """
    x = jax.ShapeDtypeStruct((1, px, px, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32))
        if name == "scale":
            return jnp.ones(leaf.shape, jnp.float32)
        return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape).astype(np.float32))

    return jax.tree_util.tree_map_with_path(draw, shapes)
