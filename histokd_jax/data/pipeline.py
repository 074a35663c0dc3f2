"""Loaders: a shuffled, sharded, checkpointable grain training loader and ordered eval batches."""

from __future__ import annotations

from collections.abc import Iterator

import grain
import jax
import numpy as np

from histokd_jax.data.views import TrainViews, ViewSpec, make_views


class BatchIterator:
    """Stacks consecutive elements of a grain iterator into batches, in the main process.

    grain's own ``Batch`` runs inside each worker (worker k batches stream
    positions k, k+W, ...), which would make batch membership depend on the
    worker count. Batching here keeps batches identical for any ``workers``
    while decoding and augmentation still run in the workers. The iterator state
    is grain's: checkpoints are taken between batches.
    """

    def __init__(self, elements, batch_size: int):
        self._elements = elements
        self.batch_size = batch_size

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        items = [next(self._elements) for _ in range(self.batch_size)]
        return {key: np.stack([item[key] for item in items]) for key in items[0]}

    def get_state(self) -> bytes:
        return self._elements.get_state()

    def set_state(self, state: bytes) -> None:
        self._elements.set_state(state)

    def start_prefetch(self) -> None:  # called by grain's orbax handler after a restore
        if hasattr(self._elements, "start_prefetch"):
            self._elements.start_prefetch()


class TrainLoader:
    """Iterable of training batches; ``iter()`` gives a checkpointable ``BatchIterator``."""

    def __init__(self, loader: grain.DataLoader, batch_size: int):
        self.loader = loader
        self.batch_size = batch_size

    def __iter__(self) -> BatchIterator:
        return BatchIterator(iter(self.loader), self.batch_size)


def make_train_loader(
    source, *, spec: ViewSpec, batch_size: int, seed: int, workers: int = 0, worker_buffer_size: int = 64
) -> TrainLoader:
    """An endless, shuffled loader of paired-view batches for THIS process.

    ``batch_size`` is the per-process batch. Records are sharded by JAX process
    index and shuffled per epoch from ``seed``; each record's augmentation is
    seeded by grain from (seed, position), and batches are formed in the main
    process, so the batches do not depend on ``workers``. ``iter(loader)`` has
    ``get_state``/``set_state`` for resuming.
    """
    if len(source) < batch_size * jax.process_count():
        raise ValueError(f"the source has {len(source)} records, fewer than one global batch")
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
        shuffle=True,
        num_epochs=None,
        seed=seed,
    )
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[TrainViews(spec)],
        worker_count=workers,
        worker_buffer_size=worker_buffer_size,
    )
    return TrainLoader(loader, batch_size)


def eval_batches(source, *, spec: ViewSpec, global_batch_size: int) -> Iterator[tuple[dict, np.ndarray]]:
    """Un-augmented batches in record order: ``(this process's slice, valid-mask of the global batch)``.

    Every global batch has the same shape (the last is padded with copies of record
    0 and masked out) so the eval step compiles once. Process ``p`` supplies rows
    ``[p*B/P, (p+1)*B/P)`` of each global batch, so gathered outputs come back in
    record order on every process.
    """
    n = len(source)
    per_process = global_batch_size // jax.process_count()
    lo = jax.process_index() * per_process
    for start in range(0, n, global_batch_size):
        indices = np.arange(start, start + global_batch_size)
        valid = indices < n
        mine = np.where(valid, indices, 0)[lo : lo + per_process]
        views = [make_views(source[int(i)], spec=spec, rng=None) for i in mine]
        batch = {k: np.stack([v[k] for v in views]) for k in views[0]}
        yield batch, valid
