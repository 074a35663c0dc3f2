"""Orbax checkpoints of one training stage: state, best params, data iterator, metadata, config.

Each stage (teacher, student_kd, student_baseline) has its own manager under
``workdir/<stage>/checkpoints``. A checkpoint holds everything needed to resume
bit-for-bit: the train state, the grain iterator position, the best-so-far
parameters selected on validation, and the config that produced them.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from histokd_jax.parallel import replicated

ITEMS = ("state", "best", "data", "meta", "config")


def make_manager(directory: str | pathlib.Path, *, keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options, item_names=ITEMS)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    *,
    state: Any,
    best_params: Any,
    data_iterator: Any,
    meta: dict,
    config_json: str,
) -> None:
    """Save asynchronously; call ``manager.wait_until_finished()`` before exiting."""
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            best=ocp.args.StandardSave(best_params),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta),
            config=ocp.args.JsonSave(json.loads(config_json)),
        ),
        force=True,
    )


def _abstract(tree: Any, *, mesh: Mesh) -> Any:
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore(manager: ocp.CheckpointManager, step: int, *, state_like: Any, data_iterator: Any, mesh: Mesh) -> dict:
    """Restore step ``step`` into the structure of ``state_like``; the iterator is restored in place."""
    return manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(state_like, mesh=mesh)),
            best=ocp.args.StandardRestore(_abstract(state_like.params, mesh=mesh)),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
            meta=ocp.args.JsonRestore(),
        ),
    )


def load_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The config (as a JSON dict) a checkpoint was saved with."""
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def load_best_params(directory: str | pathlib.Path, *, params_like: Any, mesh: Mesh) -> tuple[Any, dict]:
    """The validation-selected parameters of a finished or interrupted stage.

    The restore is strict: the checkpoint's tree must match ``params_like`` leaf
    for leaf (names and shapes), so a teacher of another architecture is an error,
    never a silently random network.
    """
    directory = pathlib.Path(directory)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    with ocp.CheckpointManager(directory.absolute(), item_names=ITEMS) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory} holds no finished checkpoint")
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    best=ocp.args.StandardRestore(_abstract(params_like, mesh=mesh)), meta=ocp.args.JsonRestore()
                ),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"the checkpoint at {directory} (step {step}) does not match the configured model: {err}"
            ) from err
    _check_same_tree(restored["best"], params_like, where=str(directory))
    return restored["best"], restored["meta"]


def _check_same_tree(loaded: Any, expected: Any, *, where: str) -> None:
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(loaded)}
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    if got != want:
        missing = sorted(set(want) - set(got))[:5]
        extra = sorted(set(got) - set(want))[:5]
        shapes = sorted(k for k in set(got) & set(want) if got[k] != want[k])[:5]
        raise ValueError(
            f"checkpoint {where} does not match the configured model: missing {missing}, unexpected {extra}, "
            f"different shapes {shapes}"
        )
