"""Data parallelism over a 1-D ``('data',)`` mesh: batch split, state replicated.

``jax.jit`` with ``NamedSharding`` replaces ``pmap`` (in maintenance mode): the same
code runs on one CPU, on simulated CPU devices, on a GPU or on a TPU slice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A mesh over all (global) devices with one ``'data'`` axis of Auto type."""
    devices = list(devices) if devices is not None else jax.devices()
    # process p's devices at mesh positions [p*L, (p+1)*L): the rows each process feeds (put_batch, the
    # loaders) then land in global batch order, which keeps predictions matched with their labels
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
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


def to_host(tree: Any) -> Any:
    """Numpy copies of replicated arrays, also when the mesh spans other processes' devices.

    ``jax.device_get`` refuses arrays that are not fully addressable (multi-host);
    a replicated array has a complete copy on each local device, so read that.
    """

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.sharding.is_fully_replicated:
                raise ValueError("to_host reads replicated arrays only; this one is split over processes")
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any: a stop request must end all processes
    at the same step, or the others wait forever in the next collective."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def from_process_0(value: int | bool) -> int | bool:
    """Process 0's ``value`` on every process: a decision read from the filesystem (is the stage finished,
    is the cache valid, which step to resume) is taken once. A shared filesystem can show hosts different
    states for a moment; hosts that decided apart would then wait forever in different collectives."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    out = multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)).item()
    return bool(out) if isinstance(value, bool) else int(out)


def any_process_each(mask: np.ndarray) -> np.ndarray:
    """Element-wise ``any_process``: True where any process has True (each process knows only the records
    it read, e.g. which ones failed in an evaluation; all must drop the same ones)."""
    mask = np.asarray(mask, bool)
    if jax.process_count() == 1:
        return mask
    from jax.experimental import multihost_utils

    return np.any(multihost_utils.process_allgather(mask.astype(np.int32)), axis=0)


def _run_where_and_agree(fn: Callable[[], Any], *, runs_here: bool, failed_elsewhere: str) -> Any:
    """``fn()`` where ``runs_here`` (None elsewhere); an exception on any process is raised on every one
    (its own, or ``failed_elsewhere``), so no process goes on into a collective that another has left."""
    if jax.process_count() == 1:
        return fn()
    out, error = None, None
    if runs_here:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others have heard of it
            error = e
    if any_process(error is not None):  # also a barrier
        if error is not None:
            raise error
        raise RuntimeError(failed_elsewhere)
    return out


def on_process_0(fn: Callable[[], Any], *, what: str = "its work") -> Any:
    """``fn()`` on process 0 alone (None elsewhere); its exception is raised on every process. A change
    of the filesystem is then made once; the others wait here for process 0."""
    return _run_where_and_agree(fn, runs_here=jax.process_index() == 0,
                                failed_elsewhere=f"process 0 failed in {what}; its log says why")


def on_every_process(fn: Callable[[], Any], *, what: str = "a check") -> Any:
    """``fn()`` on every process; if it raises on any, it raises on all (its own error, or one naming
    another process). For checks that every process must make because they read checkpoints through
    orbax, whose restores wait for all processes, and that must not let some processes go on alone."""
    return _run_where_and_agree(fn, runs_here=True,
                                failed_elsewhere=f"another process failed in {what}; its log says why")


def process_0_first(fn: Callable[[], Any]) -> Any:
    """``fn()`` on process 0, then, after a barrier, on the others: what process 0 writes (generated demo
    data, slide-index caches on a shared filesystem) is then found by the others instead of raced for."""
    out = on_process_0(fn, what="preparing the data")
    return out if jax.process_index() == 0 else fn()
