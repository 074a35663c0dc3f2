"""Data parallelism over a 1-D ``('data',)`` mesh: batch split, state replicated.

``jax.jit`` with ``NamedSharding`` replaces ``pmap`` (in maintenance mode): the same
code runs on one CPU, on simulated CPU devices, on a GPU or on a TPU slice.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A mesh over all (global) devices with one ``'data'`` axis of Auto type."""
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, *, mesh: Mesh, what: str = "batch_size") -> int:
    """Return the per-process batch size, or fail with the fix when the split is uneven."""
    n_dev = mesh.size
    if batch_size <= 0 or batch_size % n_dev:
        raise ValueError(
            f"{what}={batch_size} does not divide evenly over {n_dev} device(s); use a multiple of {n_dev}"
        )
    return batch_size // jax.process_count()


def put_replicated(tree: Any, *, mesh: Mesh) -> Any:
    """Place a host pytree (e.g. a fresh or restored state) on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def put_batch(batch: dict[str, np.ndarray], *, mesh: Mesh) -> dict[str, jax.Array]:
    """Turn this process's slice of the global batch into global arrays split on ``'data'``."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
