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

import hashlib
import json
import logging
import pathlib
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from histokd_jax import atomic, parallel
from histokd_jax.data.pipeline import eval_batches
from histokd_jax.models import teacher_outputs

log = logging.getLogger(__name__)


def compute_targets(
    teacher_params: Any, source, *, teacher, spec, mesh, batch_size: int, show_progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's (logits, last feature map) for every record's central un-augmented crop, in record order."""

    def forward(params, batch):
        return teacher_outputs(teacher, params, batch["teacher_image"])

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


def fingerprint(params: Any) -> str:
    """A hash of the teacher's parameters (names, shapes, dtypes, bytes): a resume or a saved cache is
    accepted only for the very same teacher."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(parallel.to_host(params)):
        array = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}{array.dtype.str}{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()[:24]


def cache_key(source, *, teacher: str, teacher_dtype: str, teacher_px: int) -> dict:
    """What cached targets depend on: the teacher, its precision and input size, and which records
    (``repr(source)`` names them by content, see data/sources.py)."""
    return {"records": len(source), "source": repr(source), "teacher": teacher,
            "teacher_dtype": teacher_dtype, "teacher_px": int(teacher_px)}


def save_targets(folder: pathlib.Path, *, logits: np.ndarray, maps: np.ndarray, key: dict) -> None:
    """``logits.npy``, ``maps.npy`` and ``meta.json`` (its ``key``; written last: its presence marks a
    complete cache). Every file is written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)
    if len(logits) != key["records"]:
        raise ValueError(f"{len(logits)} targets for a key of {key['records']} records")
    atomic.save_npy(folder / "logits.npy", logits)
    atomic.save_npy(folder / "maps.npy", maps)
    atomic.write_json(folder / "meta.json", key)


def saved_targets_match(folder: pathlib.Path, *, key: dict) -> bool:
    """Whether ``folder`` holds a complete cache made for exactly ``key``; a damaged one is reported and redone."""
    meta = folder / "meta.json"
    if not meta.exists():
        return False
    try:
        saved = json.loads(meta.read_text())
    except (OSError, ValueError) as err:
        log.warning("teacher targets in %s: unreadable %s (%s); computing them again", folder, meta.name, err)
        return False
    if saved != key:
        differ = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
        log.warning("teacher targets in %s were made for another %s; computing them again", folder,
                    " / ".join(differ))
        return False
    return True


class CachedTargetSource:
    """A source whose records carry the teacher's cached targets (``teacher_logits``, ``teacher_map``).

    ``data.views`` sees them (``draw_train_views`` in training, whose batch half passes them
    through, and ``make_views``) and then crops centrally, applies the same
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

    def __repr__(self) -> str:  # grain checks a resumed loader's source by its repr: content, not the folder's place
        return f"CachedTargetSource({self.source!r})"

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
