"""Cheaper teacher targets: reuse one teacher pass for several student views, or cache it.

The frozen teacher's high-resolution forward pass is most of a distillation step
(65-90% on CPU). Two ways to spend less on it while keeping the views consistent
(the student's view and the teacher's target always show the same tissue the same
way up):

- ``distill.views_per_crop = K``: the teacher runs once per crop and the student
  trains on K dihedral transforms (flips, quarter turns) of that crop; the teacher's
  feature map is turned the same way, its logits are reused as they are.
- ``distill.target_cache = True``: the teacher runs once over the whole pool
  (central, un-jittered crops) before training; training then draws dihedral
  transforms of each crop and of its cached map, with no colour jitter (the cache
  holds the un-jittered crop's targets).

Both are exact only for a teacher that is itself flip/rotation equivariant; the
demo measures what they cost in accuracy (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from histokd_jax import parallel
from histokd_jax.data.pipeline import eval_batches
from histokd_jax.models import last_stage, normalize_images


def compute_targets(
    teacher_params: Any, source, *, teacher, spec, mesh, batch_size: int, show_progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's (logits, last feature map) for every record's central un-augmented crop, in record order."""

    def forward(params, batch):
        logits, features = teacher.apply({"params": params}, normalize_images(batch["teacher_image"]))
        return logits.astype(jnp.float32), last_stage(features).astype(jnp.float32)

    fn = jax.jit(forward, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))
    logits, maps = [], []
    batches = eval_batches(source, spec=spec, global_batch_size=batch_size)
    total = -(-len(source) // batch_size)
    for batch, valid in tqdm(batches, total=total, desc="teacher targets", unit="batch",
                             disable=not show_progress or jax.process_index() != 0, leave=False):
        batch = {k: v for k, v in batch.items() if k == "teacher_image"}
        out_logits, out_maps = fn(teacher_params, parallel.put_batch(batch, mesh=mesh))
        logits.append(parallel.to_host(out_logits)[valid])
        maps.append(parallel.to_host(out_maps)[valid])
    return np.concatenate(logits), np.concatenate(maps)


def fingerprint(params: Any) -> list[float]:
    """A cheap signature of the teacher's parameters: a saved cache is reused only for the same teacher."""
    leaves = jax.tree.leaves(parallel.to_host(params))
    return [float(len(leaves)), float(sum(np.sum(np.asarray(x, np.float64)) for x in leaves)),
            float(sum(np.sum(np.abs(np.asarray(x, np.float64))) for x in leaves))]


def save_targets(folder: pathlib.Path, *, logits: np.ndarray, maps: np.ndarray, teacher: list[float]) -> None:
    """``logits.npy``, ``maps.npy`` and ``meta.json`` (written last: its presence marks a complete cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)
    for name, array in (("logits", logits), ("maps", maps)):
        partial = folder / f"{name}.partial.npy"
        np.save(partial, array)
        partial.replace(folder / f"{name}.npy")
    (folder / "meta.json").write_text(json.dumps({"records": len(logits), "teacher": teacher}))


def saved_targets_match(folder: pathlib.Path, *, records: int, teacher: list[float]) -> bool:
    meta = folder / "meta.json"
    if not meta.exists():
        return False
    saved = json.loads(meta.read_text())
    return saved["records"] == records and np.allclose(saved["teacher"], teacher, rtol=1e-9)


class CachedTargetSource:
    """A source whose records carry the teacher's cached targets (``teacher_logits``, ``teacher_map``).

    ``data.views.make_views`` sees them and then crops centrally, applies the same
    random dihedral transform to the crop and the map, and skips colour jitter. The
    targets stay in ``folder`` and are memory-mapped where they are read: grain's
    workers receive the folder's name, not gigabytes of feature maps.
    """

    def __init__(self, source, *, folder: str | pathlib.Path):
        self.source, self.folder = source, pathlib.Path(folder)
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None
        if len(self._targets()[0]) != len(source):
            raise ValueError(f"{len(self._targets()[0])} cached targets in {folder} for a source of "
                             f"{len(source)} records")

    def _targets(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = (np.load(self.folder / "logits.npy", mmap_mode="r"),
                            np.load(self.folder / "maps.npy", mmap_mode="r"))
        return self._arrays

    def __repr__(self) -> str:  # grain checks a resumed loader's source by its repr
        return f"CachedTargetSource({self.source!r}, folder={str(self.folder)!r})"

    def __getstate__(self) -> dict:  # pickled into grain workers: without the mapped arrays
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        logits, maps = self._targets()
        element = dict(self.source[index])
        element["teacher_logits"], element["teacher_map"] = np.array(logits[index]), np.array(maps[index])
        return element

    def labels(self) -> np.ndarray:
        return self.source.labels()
