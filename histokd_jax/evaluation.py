"""Scoring a model over a whole split, without ever scoring a tile under another tile's label.

A val/test slide that fails to read after indexing is dropped whole from the
evaluation (its tiles scored before the failure too), logged and listed in the
run's ``skipped_slides.csv``; the result says how many tiles and slides were
scored. Training sources may replace an unreadable slide's tiles by others
(one bad slide must not end an epoch); evaluation sources never do.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from histokd_jax import parallel, steps
from histokd_jax.data.pipeline import eval_batches, eval_units, scored_mask
from histokd_jax.messages import listed

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What an evaluation scored: the records of the units (slides, or tiles) that read without error."""

    labels: np.ndarray
    probs: np.ndarray
    records: np.ndarray  # indices into the source of the scored records, in record order
    slides: np.ndarray | None  # the slide of each scored record (slide sources), else None
    dropped: tuple[tuple[str, str], ...] = ()  # (slide, or tile file, reason) left out

    def counts(self) -> dict:
        """For the result row: how much of the split was scored, and how much was dropped."""
        if self.slides is None:
            return {"tiles_scored": int(len(self.labels)), "tiles_dropped": len(self.dropped)}
        return {"tiles_scored": int(len(self.labels)), "slides_scored": int(len(np.unique(self.slides))),
                "slides_dropped": len(self.dropped)}


def evaluate(
    params: Any,
    source,
    *,
    model: nn.Module,
    image_key: str,
    spec,
    mesh,
    batch_size: int,
    eval_fn: Callable | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, class probabilities) over a whole split, in record order, of the slides that read (``evaluate_split``)."""
    scored = evaluate_split(params, source, model=model, image_key=image_key, spec=spec, mesh=mesh,
                            batch_size=batch_size, eval_fn=eval_fn)
    return scored.labels, scored.probs


def evaluate_split(params: Any, source, *, model: nn.Module, image_key: str, spec, mesh, batch_size: int,
                   eval_fn: Callable | None = None) -> Evaluation:
    """The split's scores, without the slides that failed to read: a slide that fails during evaluation
    is dropped whole (also its tiles scored before), logged and listed (``source.note_dropped``), never
    replaced by another slide's tiles under its own labels. Nothing left to score is an error naming them."""
    if eval_fn is None:
        eval_fn = make_eval_fn(model=model, image_key=image_key, mesh=mesh)
    failed: dict[int, str] = {}
    probs = []
    for batch, valid in eval_batches(source, spec=spec, global_batch_size=batch_size, failed=failed):
        out = parallel.to_host(eval_fn(params, parallel.put_batch(batch, mesh=mesh)))
        probs.append(out[valid])
    units, names = eval_units(source)
    failed_mask = np.zeros(len(source), bool)
    failed_mask[list(failed)] = True
    failed_mask = parallel.any_process_each(failed_mask)  # every process drops what any could not read
    keep = scored_mask(units, failed_mask)
    reasons = {int(units[i]): reason for i, reason in sorted(failed.items(), reverse=True)}  # this process's first
    for i in np.flatnonzero(failed_mask):  # what only another process could not read: see its log
        reasons.setdefault(int(units[i]), "unreadable on another process (see its log)")
    dropped = tuple((names[u], r) for u, r in sorted(reasons.items()))
    for name, reason in dropped:
        log.warning("evaluation: dropped %s (all its tiles): %s", name, reason)
    if reasons and jax.process_index() == 0 and hasattr(source, "note_dropped"):
        source.note_dropped(reasons)
    if not keep.any():
        names_and_reasons = listed([f"{n}: {r}" for n, r in dropped])
        where = f" (listed in {source.skipped_csv})" if getattr(source, "skipped_csv", None) else ""
        raise ValueError(f"nothing left to evaluate: the split has {len(source)} records and every one failed "
                         f"to read{where}: {names_and_reasons or 'no records'}")
    slides = np.asarray(names)[units[keep]] if hasattr(source, "slide_of") else None
    return Evaluation(labels=np.asarray(source.labels())[keep], probs=np.concatenate(probs)[keep],
                      records=np.flatnonzero(keep), slides=slides, dropped=dropped)


def make_eval_fn(*, model: nn.Module, image_key: str, mesh) -> Callable:
    return jax.jit(
        functools.partial(steps.eval_step, model=model, image_key=image_key),
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
        out_shardings=parallel.replicated(mesh),
    )
