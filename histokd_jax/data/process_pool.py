"""Ordered maps over fresh worker processes, for per-slide work that is pure numpy and files
(drawing synthetic slides, indexing slides): the same results in the same order for any worker count."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterator, Sequence

# a spawned worker's start (~1 s of imports) costs about one slide: below this, stay in-process
MIN_JOBS_FOR_WORKERS = 16


def default_workers(n_jobs: int) -> int:
    return len(os.sched_getaffinity(0)) if n_jobs >= MIN_JOBS_FOR_WORKERS else 1


def map_in_order(fn: Callable, jobs: Sequence, *, workers: int | None = None) -> Iterator:
    """``map(fn, jobs)``, on ``workers`` processes (default: one per core for 16 jobs or more). Spawned,
    not forked: the caller may hold JAX's threads, which a fork would copy mid-flight. ``fn`` must be
    picklable (a module-level function, or a functools.partial of one)."""
    workers = default_workers(len(jobs)) if workers is None else int(workers)
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        yield from map(fn, jobs)
        return
    done = 0
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for result in pool.map(fn, jobs):
                yield result
                done += 1
    except concurrent.futures.process.BrokenProcessPool:
        # A spawned worker re-imports the caller's script; one without a main guard starts this pool again
        # inside it and the worker dies. The results do not depend on the worker count: finish here.
        warnings.warn("worker processes failed to start (a script that runs training at import needs "
                      "`if __name__ == \"__main__\":`); continuing in this process", RuntimeWarning, stacklevel=2)
        yield from map(fn, jobs[done:])
