"""Loaders: a shuffled, sharded, checkpointable grain training loader and ordered eval batches."""

from __future__ import annotations

from collections.abc import Iterator

import grain
import jax
import numpy as np

from histokd_jax.data.views import TrainViews, ViewSpec, finish_train_views, make_views
from histokd_jax.messages import first_line


class BatchIterator:
    """Stacks consecutive elements of a grain iterator into batches, in the main process, and
    finishes their views there (``views.finish_train_views``: flips, turns, block means, batch-wide).

    grain's own ``Batch`` runs inside each worker (worker k batches stream
    positions k, k+W, ...), which would make batch membership depend on the
    worker count. Batching here keeps batches identical for any ``workers``
    while decoding and the per-record draws still run in the workers. The iterator state
    is grain's: checkpoints are taken between batches.
    """

    def __init__(self, elements, batch_size: int, *, spec: ViewSpec):
        self._elements = elements
        self.batch_size = batch_size
        self._spec = spec

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        items = [next(self._elements) for _ in range(self.batch_size)]
        batch = {key: np.stack([item[key] for item in items]) for key in items[0]}
        return finish_train_views(batch, spec=self._spec)

    def get_state(self) -> bytes:
        return self._elements.get_state()

    def set_state(self, state: bytes) -> None:
        self._elements.set_state(state)

    def start_prefetch(self) -> None:  # called by grain's orbax handler after a restore
        if hasattr(self._elements, "start_prefetch"):
            self._elements.start_prefetch()


class TrainLoader:
    """Iterable of training batches; ``iter()`` gives a checkpointable ``BatchIterator``."""

    def __init__(self, loader: grain.DataLoader, batch_size: int, *, spec: ViewSpec):
        self.loader = loader
        self.batch_size = batch_size
        self.spec = spec

    def __iter__(self) -> BatchIterator:
        return BatchIterator(iter(self.loader), self.batch_size, spec=self.spec)


class GlobalBatchSampler:
    """This process's share of ONE global shuffled stream: rows ``[p*b, (p+1)*b)`` of every global batch.

    Every process walks the same seeded order of records (grain's ``IndexSampler``)
    and reads only its own rows of each global batch of ``b * P`` records, so no
    record is read twice per epoch, each record keeps its position-seeded
    augmentation, and the global batches are the ones a single process with all
    the devices would form: losses do not depend on how many processes there are.
    """

    def __init__(self, *, num_records: int, seed: int, per_process_batch: int, process_index: int,
                 process_count: int):
        self._inner = grain.samplers.IndexSampler(num_records=num_records, shuffle=True, num_epochs=None, seed=seed)
        self._b, self._p, self._n = per_process_batch, process_index, process_count
        self._shard_options = grain.sharding.NoSharding()  # the sharding is done here, not by grain

    def __len__(self) -> int:
        return len(self._inner)

    def global_position(self, index: int) -> int:
        batch, row = divmod(index, self._b)
        return batch * self._b * self._n + self._p * self._b + row

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        meta = self._inner[self.global_position(index)]
        return grain.RecordMetadata(index=index, record_key=meta.record_key, rng=meta.rng)

    def __repr__(self) -> str:  # grain records the sampler's repr in checkpoints of the iterator
        return f"GlobalBatchSampler({self._inner!r}, per_process_batch={self._b}, process={self._p}/{self._n})"


def read_options(*, batch_size: int) -> grain.ReadOptions:
    """grain's reader threads for one process: two, two batches ahead (at least 32 records).

    grain's default (16 threads, 500 records ahead) checks every pending read for each record it
    hands out; on 2 cores that bookkeeping cost more than the reads and the views together
    (benchmarks/pipeline.py, BENCHMARKS.md). Slide reads release the GIL, so two threads overlap them
    with the main process's work. 32 records ahead measured the same within this machine's noise,
    for the loader alone and for the demo (BENCHMARKS.md).
    """
    return grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(32, 2 * batch_size))


def make_train_loader(
    source, *, spec: ViewSpec, batch_size: int, seed: int, workers: int = 0, worker_buffer_size: int = 64
) -> TrainLoader:
    """An endless, shuffled loader of paired-view batches for THIS process.

    ``batch_size`` is the per-process batch. Records are shuffled from ``seed``
    and each process reads its rows of every global batch (``GlobalBatchSampler``);
    each record's augmentation is seeded by grain from (seed, global position), and
    batches are formed in the main process, so the batches depend neither on
    ``workers`` nor on the number of processes. ``iter(loader)`` has
    ``get_state``/``set_state`` for resuming.
    """
    if len(source) < batch_size * jax.process_count():
        raise ValueError(f"the source has {len(source)} records, fewer than one global batch")
    sampler = GlobalBatchSampler(num_records=len(source), seed=seed, per_process_batch=batch_size,
                                 process_index=jax.process_index(), process_count=jax.process_count())
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[TrainViews(spec)],
        worker_count=workers,
        worker_buffer_size=worker_buffer_size,
        shard_options=grain.sharding.NoSharding(),
        read_options=read_options(batch_size=batch_size),
    )
    return TrainLoader(loader, batch_size, spec=spec)


def eval_batches(source, *, spec: ViewSpec, global_batch_size: int,
                 failed: dict[int, str] | None = None) -> Iterator[tuple[dict, np.ndarray]]:
    """Un-augmented batches in record order: ``(this process's slice, valid-mask of the global batch)``.

    Every global batch has the same shape (the last is padded with copies of record
    0 and masked out) so the eval step compiles once. Process ``p`` supplies rows
    ``[p*B/P, (p+1)*B/P)`` of each global batch, so gathered outputs come back in
    record order on every process.

    With ``failed`` (a dict), a record whose read raises OSError does not end the
    pass: it is recorded there (index -> reason) and a blank placeholder takes its
    row, still marked valid (the other processes cannot know); the caller drops it
    (``scored_mask``). Without it, the error propagates.
    """
    n = len(source)
    per_process = global_batch_size // jax.process_count()
    lo = jax.process_index() * per_process
    for start in range(0, n, global_batch_size):
        indices = np.arange(start, start + global_batch_size)
        valid = indices < n
        mine = np.where(valid, indices, 0)[lo : lo + per_process]
        views = [_eval_views(source, int(i), spec=spec, failed=failed) for i in mine]
        batch = {k: np.stack([v[k] for v in views]) for k in views[0]}
        yield batch, valid


def _eval_views(source, index: int, *, spec: ViewSpec, failed: dict[int, str] | None) -> dict:
    if failed is None:
        return make_views(source[index], spec=spec, rng=None)
    if index not in failed:
        try:
            return make_views(source[index], spec=spec, rng=None)
        except OSError as err:
            failed[index] = first_line(err)
    blank = {"image": np.full((spec.teacher_px, spec.teacher_px, 3), 255, np.uint8), "label": 0, "has_label": False}
    return make_views(blank, spec=spec, rng=None)


def eval_units(source) -> tuple[np.ndarray, list[str]]:
    """(unit of each record, name of each unit): the records that stand or fall together in an evaluation.

    A slide's tiles are one unit (a slide that fails is dropped whole: scoring the
    tiles read before it failed would bias its slide-level prediction); any other
    record is a unit of its own, named by its file where the source has one.
    """
    if hasattr(source, "slide_of"):
        return np.asarray(source.slide_of), list(source.paths)
    records = getattr(source, "records", None)
    names = [r.path for r in records] if records is not None else [f"record {i}" for i in range(len(source))]
    return np.arange(len(source)), names


def scored_mask(units: np.ndarray, failed: np.ndarray) -> np.ndarray:
    """Records to score: those of units none of whose records failed (``failed``: bool per record)."""
    return ~np.isin(units, units[failed])
