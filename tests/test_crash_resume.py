"""Crash-safe resume of launch/train.py: a SIGKILL mid-stage, a half-written checkpoint, a SIGTERM.

Each interrupted run is rerun with the same command and must end with the parameters,
best parameters and test metrics of an uninterrupted run of that command: the train
state, the data iterator's position and the best-so-far selection all come back from
the last complete checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from histokd_jax import checkpoint
from tests.tiny import TINY_FLAGS

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

STEPS = 40
# The tiny teacher, then a 40-step distillation with a checkpoint every 5 steps (and at every
# validation, every 3): long enough for a kill to land in the middle of the distill stage.
RUN = ("--config.stages=('teacher', 'distill')", f"--config.distill.steps={STEPS}",
       "--config.train.checkpoint_every_steps=5", "--config.data.workers=0")
# The same training with no periodic checkpoint and validation only at the end: a checkpoint
# before step 40 can only come from the signal.
NO_PERIODIC = (*RUN, "--config.train.checkpoint_every_steps=1000", "--config.distill.eval_every_steps=1000")


def command(workdir: pathlib.Path, data_root: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "launch/train.py"), "--config=configs/demo_tiles.py", f"--workdir={workdir}",
            *TINY_FLAGS, f"--config.data.root={data_root}", *extra]


def start(workdir: pathlib.Path, data_root: str, *extra: str) -> subprocess.Popen:
    """The command in its own session (so a kill reaches any worker processes too)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    return subprocess.Popen(command(workdir, data_root, *extra), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a started command to end; assert it succeeded."""
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        _stop(proc)
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(workdir: pathlib.Path, data_root: str, *extra: str) -> subprocess.CompletedProcess:
    """Run the command to the end; assert it succeeded."""
    return finish(start(workdir, data_root, *extra))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(proc: subprocess.Popen, condition, *, what: str, deadline_s: float = 300.0):
    """Poll ``condition()`` until it returns something truthy; fail if the run ends or time runs out."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            found = condition()
        except OSError:  # a directory orbax is renaming or deleting right now
            found = None
        if found:
            return found
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (code {proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.02)
    pytest.fail(f"no {what} within {deadline_s:.0f} s")


def complete_steps(stage_dir: pathlib.Path) -> list[int]:
    """The stage's steps that orbax finished writing (commit markers present)."""
    directory = stage_dir / "checkpoints"
    if not directory.is_dir():
        return []
    steps = [p for p in directory.iterdir() if p.name.isdigit()]
    return sorted(int(p.name) for p in steps if checkpoint.is_complete(p))


def saved(stage_dir: pathlib.Path) -> dict:
    """The last checkpoint's train state, best parameters and selection metadata, straight from orbax."""
    with ocp.CheckpointManager(stage_dir / "checkpoints", item_names=checkpoint.ITEMS) as manager:
        step = manager.latest_step()
        return {"step": step, **manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), best=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))}


def assert_same_trees(a, b, *, what: str) -> None:
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [k for k, _ in leaves_a] == [k for k, _ in leaves_b], what
    for (key, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7,
                                   err_msg=f"{what}{jax.tree_util.keystr(key)}")


def result_rows(workdir: pathlib.Path) -> list[dict]:
    """results.json without the wall times."""
    rows = json.loads((workdir / "results.json").read_text())
    return [{k: v for k, v in row.items() if k != "stage_seconds"} for row in rows]


def assert_same_end(resumed: pathlib.Path, straight: pathlib.Path, *, best_too: bool = True) -> None:
    """Same final parameters (and best parameters, selection and test metrics) as the uninterrupted run."""
    for role in ("teacher", "distill"):
        a, b = saved(resumed / role), saved(straight / role)
        assert a["step"] == b["step"] == int(a["state"]["step"])
        assert_same_trees(a["state"]["params"], b["state"]["params"], what=f"{role} final params")
        assert_same_trees(a["state"]["opt_state"], b["state"]["opt_state"], what=f"{role} optimizer state")
        if best_too:
            assert_same_trees(a["best"], b["best"], what=f"{role} best params")
            assert a["meta"] == pytest.approx(b["meta"])
    if best_too:
        rows_a, rows_b = result_rows(resumed), result_rows(straight)  # pytest.approx takes no list of dicts
        assert [r.keys() for r in rows_a] == [r.keys() for r in rows_b]
        for a, b in zip(rows_a, rows_b, strict=True):
            assert a == pytest.approx(b), a["role"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tiles"))


@pytest.fixture(scope="module")
def straight_started(tmp_path_factory, data_root):
    """The uninterrupted run of RUN, started (it runs beside the run that is killed)."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    proc = start(workdir, data_root, *RUN)
    yield workdir, proc
    _stop(proc)


@pytest.fixture(scope="module")
def straight(straight_started) -> pathlib.Path:
    """The uninterrupted run of RUN, finished."""
    workdir, proc = straight_started
    finish(proc)
    assert complete_steps(workdir / "distill")[-1] == STEPS
    return workdir


@pytest.fixture(scope="module")
def killed(tmp_path_factory, data_root, straight_started) -> tuple[pathlib.Path, int]:
    """RUN killed with SIGKILL in the middle of the distill stage: (workdir, its last complete step)."""
    workdir = tmp_path_factory.mktemp("killed") / "run"
    stage = workdir / "distill"
    proc = start(workdir, data_root, *RUN)
    try:
        # Half-way: the killed run does the work it can while the straight run runs beside it; the reruns
        # redo less.
        wait_for(proc, lambda: [s for s in complete_steps(stage) if s >= STEPS // 2],
                 what=f"a complete distill checkpoint at step {STEPS // 2} or later")
        os.killpg(proc.pid, signal.SIGKILL)  # the process and anything it started, with no chance to clean up
        proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == -signal.SIGKILL
    steps = complete_steps(stage)
    assert steps and steps[-1] < STEPS, steps  # killed with a checkpoint saved and steps still to go
    assert not (stage / "result.json").exists()
    assert (workdir / "teacher" / "result.json").exists()
    return workdir, steps[-1]


def copy_of(killed_run: tuple[pathlib.Path, int], tmp_path: pathlib.Path) -> pathlib.Path:
    workdir = tmp_path / "run"
    shutil.copytree(killed_run[0], workdir, symlinks=True)
    return workdir


def test_sigkill_mid_stage_then_rerun_ends_as_an_uninterrupted_run(killed, straight, data_root, tmp_path):
    workdir, last = copy_of(killed, tmp_path), killed[1]
    done = run(workdir, data_root, *RUN)
    assert f"distill: resuming from step {last} of {STEPS}" in done.stdout
    assert "teacher: finished earlier" in done.stdout
    assert not list((workdir / "distill" / "checkpoints").glob(f"*{ocp.utils.TMP_DIR_SUFFIX}*"))
    assert_same_end(workdir, straight)


def _next_save_step(step: int) -> int:
    """The next step at which RUN saves a checkpoint (every 5 steps and every validation, every 3; the last)."""
    return next((s for s in range(step + 1, STEPS + 1) if s % 5 == 0 or s % 3 == 0), STEPS)


def test_half_written_checkpoints_are_ignored_for_the_last_complete_one(killed, straight, data_root, tmp_path):
    workdir, last = copy_of(killed, tmp_path), killed[1]
    ckpts = workdir / "distill" / "checkpoints"
    # A step directory whose writing stopped part-way (no commit markers, the state's arrays
    # missing): orbax goes by the name alone and would resume from it. It is the next step the
    # rerun saves, so it must also be out of the way by then.
    broken = _next_save_step(last)
    shutil.copytree(ckpts / str(last), ckpts / str(broken))
    for marker in (ckpts / str(broken)).rglob(checkpoint.COMMIT_MARKER):
        marker.unlink()
    shutil.rmtree(ckpts / str(broken) / "state")
    (ckpts / str(broken) / "state").mkdir()
    # What an interrupted orbax save leaves: the step under its temporary name, unfinished.
    tmp = ckpts / f"{_next_save_step(broken)}{ocp.utils.TMP_DIR_SUFFIX}"
    if not tmp.exists():
        shutil.copytree(ckpts / str(last), tmp)
        (tmp / checkpoint.COMMIT_MARKER).unlink()
    # An old step whose deletion (orbax keeps the last 2) was cut short, as a kill sometimes leaves.
    deleted = next(s for s in range(last - 1, 0, -1) if not (ckpts / str(s)).exists())
    shutil.copytree(ckpts / str(last), ckpts / str(deleted))
    for name in ("best", "config"):
        shutil.rmtree(ckpts / str(deleted) / name)
    (ckpts / str(deleted) / checkpoint.COMMIT_MARKER).unlink()
    with ocp.CheckpointManager(ckpts, item_names=checkpoint.ITEMS) as manager:
        assert manager.latest_step() == broken and deleted in manager.all_steps()  # what plain orbax sees

    done = run(workdir, data_root, *RUN)
    assert f"distill: resuming from step {last} of {STEPS}" in done.stdout
    assert f"step {broken} was not completely written" in done.stderr
    assert f"ignoring {tmp.name}" in done.stderr
    assert f"deleted step {deleted}, an unfinished deletion" in done.stderr
    assert (ckpts / f"{broken}.incomplete").is_dir() and not tmp.exists()
    assert not (ckpts / str(deleted)).exists() and not (ckpts / f"{deleted}.incomplete").exists()
    assert complete_steps(workdir / "distill")[-1] == STEPS
    assert_same_end(workdir, straight)


def test_sigterm_saves_a_checkpoint_and_the_rerun_ends_as_an_uninterrupted_run(straight, data_root, tmp_path):
    workdir = tmp_path / "run"
    stage = workdir / "distill"

    def student_step() -> int:
        if not (workdir / "metrics.jsonl").exists():
            return 0
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return max((row["step"] for row in rows if row["stage"] == "distill/train"), default=0)

    proc = start(workdir, data_root, *NO_PERIODIC)
    try:
        seen = wait_for(proc, lambda: (s := student_step()) >= STEPS // 2 and s,
                        what=f"{STEPS // 2} distill steps")
        assert complete_steps(stage) == []  # nothing periodic to fall back on
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        _stop(proc)
    assert proc.returncode not in (0, -signal.SIGTERM), (proc.returncode, err[-3000:])
    assert "SIGTERM: saving a checkpoint" in out
    assert "run the same command again to resume" in err
    assert not (stage / "result.json").exists()
    steps = complete_steps(stage)
    assert len(steps) == 1 and seen <= steps[0] < STEPS, (seen, steps)  # saved because of the signal

    done = run(workdir, data_root, *NO_PERIODIC)
    assert f"distill: resuming from step {steps[0]} of {STEPS}" in done.stdout
    # Neither checkpoints nor validation change the training: the same end as RUN's straight run.
    # (The best parameters differ: RUN also validates every 3 steps.)
    assert_same_end(workdir, straight, best_too=False)
