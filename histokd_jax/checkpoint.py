"""Orbax checkpoints of one training stage: state, best params, data iterator, metadata, config.

Each stage (teacher, distill, baseline) has its own manager under
``workdir/<stage>/checkpoints``. A checkpoint holds everything needed to resume
bit-for-bit: the train state, the grain iterator position, the best-so-far
parameters selected on validation, and the config that produced them.

A kill (SIGKILL, a lost node) can leave debris of three kinds, and the next run
resumes from the last complete step whatever it finds:

- ``<step>.orbax-checkpoint-tmp``: a save cut short. Orbax writes a step under
  that name and renames it when complete, so it is never taken for a checkpoint;
  ``make_manager`` has orbax delete it.
- a step directory without its commit markers, older than the last complete
  step: orbax's deletion of old checkpoints (``keep``) cut short. Orbax would
  still list it as a step; ``make_manager`` finishes deleting it.
- a step directory without its commit markers, newer than the last complete
  step (a filesystem without atomic rename, a copy cut short): orbax goes by the
  name alone, so it would resume from it and fail to restore. ``make_manager``
  moves it aside to ``<step>.incomplete``; ``load_best_params`` skips it.

Each is reported with a warning. A directory whose steps have no commit markers
at all predates them (older orbax) and is left as it is.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh

from histokd_jax.parallel import on_process_0, replicated

# "identity": what the stage's result depends on beyond its config (the training data's and the teacher's
# fingerprints), compared before a resume; checkpoints written before it existed have none.
ITEMS = ("state", "best", "data", "meta", "config", "identity")
COMMIT_MARKER = "commit_success.txt"  # what orbax writes last, in the step and in each item's directory
_STEP_NAME = re.compile(r"(0|[1-9][0-9]*)")  # orbax's default step directory names


def is_complete(step_dir: pathlib.Path) -> bool:
    """Whether orbax finished writing this step: its commit marker and every item's are there."""
    items = [p for p in step_dir.iterdir() if p.is_dir()]
    return (step_dir / COMMIT_MARKER).is_file() and bool(items) and all((p / COMMIT_MARKER).is_file() for p in items)


def _has_a_marker(step_dir: pathlib.Path) -> bool:
    return (step_dir / COMMIT_MARKER).is_file() or any((p / COMMIT_MARKER).is_file() for p in step_dir.iterdir())


def incomplete_steps(directory: pathlib.Path) -> list[pathlib.Path]:
    """Step directories that orbax would list as finished but that lack a commit marker or an item's,
    oldest first; none when no step has any marker (a directory written before orbax wrote them)."""
    if not directory.is_dir():
        return []
    steps = sorted((p for p in directory.iterdir() if p.is_dir() and _STEP_NAME.fullmatch(p.name)),
                   key=lambda p: int(p.name))
    if not any(_has_a_marker(p) for p in steps):
        return []
    return [p for p in steps if not is_complete(p)]


def complete_steps(manager: ocp.CheckpointManager) -> list[int]:
    """The manager's steps less those ``incomplete_steps`` names, oldest first."""
    unfinished = {int(p.name) for p in incomplete_steps(pathlib.Path(manager.directory))}
    return sorted(s for s in manager.all_steps() if s not in unfinished)


def set_aside_incomplete_steps(directory: pathlib.Path) -> list[pathlib.Path]:
    """Clear unfinished step directories out of orbax's way (see the module docstring): finish deleting
    those older than the last complete step, rename newer ones to ``<step>.incomplete``. Returns the
    directories moved aside. Only process 0 changes anything; every process waits until it has."""
    moved = on_process_0(lambda: _set_aside(directory) if directory.is_dir() else [],
                         what=f"clearing unfinished checkpoints out of {directory}")
    return moved or []


def _set_aside(directory: pathlib.Path) -> list[pathlib.Path]:
    moved = []
    for path in sorted(directory.glob(f"*{ocp.utils.TMP_DIR_SUFFIX}*")):
        logging.warning("%s: ignoring %s, left by an interrupted save; it will be deleted", directory, path.name)
    unfinished = incomplete_steps(directory)
    complete = [int(p.name) for p in directory.iterdir()
                if p.is_dir() and _STEP_NAME.fullmatch(p.name) and p not in unfinished]
    for path in unfinished:
        if complete and int(path.name) < max(complete):
            shutil.rmtree(path)
            logging.warning("%s: deleted step %s, an unfinished deletion of an old checkpoint",
                            directory, path.name)
            continue
        target = path.with_name(path.name + ".incomplete")
        if target.exists():  # left by an earlier crash at the same step
            shutil.rmtree(target)
        path.rename(target)
        moved.append(target)
        logging.warning("%s: step %s was not completely written (no commit marker); ignoring it and moving it "
                        "to %s, resuming from %s", directory, path.name, target.name,
                        f"step {max(complete)}" if complete else "the start")
    return moved


def make_manager(directory: str | pathlib.Path, *, keep: int = 2) -> ocp.CheckpointManager:
    """A manager that resumes from the last complete step: unfinished step directories are set
    aside and the temporary directories of interrupted saves deleted."""
    directory = pathlib.Path(directory).absolute()
    set_aside_incomplete_steps(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    *,
    state: Any,
    best_params: Any,
    data_iterator: Any,
    meta: dict,
    config_json: str,
    identity: dict,
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
            identity=ocp.args.JsonSave(identity),
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


def load_identity(manager: ocp.CheckpointManager, step: int) -> dict | None:
    """The data and teacher fingerprints a checkpoint was saved with; None for checkpoints older than them."""
    if not (pathlib.Path(manager.directory) / str(step) / "identity").is_dir():
        return None
    return manager.restore(step, args=ocp.args.Composite(identity=ocp.args.JsonRestore()))["identity"]


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
        steps = complete_steps(manager)  # read-only here: skip unfinished steps, move nothing
        step = steps[-1] if steps else None
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
