"""Multi-host data parallelism: two processes on localhost train exactly what one process with both devices does."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

from histokd_jax import checkpoint, model_config, parallel, runtime
from histokd_jax.data.pipeline import GlobalBatchSampler
from tests.test_trainer import train_losses
from histokd_jax.state import abstract_params
from tests.tiny import TINY_FLAGS, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_processes_read_disjoint_rows_of_the_single_process_stream():
    """P samplers of b rows each, side by side, are grain's one-process shuffled stream: same records, same seeds."""
    b, n_proc, records = 3, 2, 10
    single = grain.samplers.IndexSampler(num_records=records, shuffle=True, num_epochs=None, seed=7)  # grain's own
    shards = [GlobalBatchSampler(num_records=records, seed=7, per_process_batch=b, process_index=p,
                                 process_count=n_proc) for p in range(n_proc)]
    for batch in range(7):  # several epochs of 10 records
        joined = [shards[p][batch * b + row] for p in range(n_proc) for row in range(b)]
        whole = [single[batch * b * n_proc + i] for i in range(b * n_proc)]
        assert [m.record_key for m in joined] == [m.record_key for m in whole]
        assert [m.rng.integers(1 << 30) for m in joined] == [m.rng.integers(1 << 30) for m in whole]
    # the processes split the stream's positions without overlap or gap, and the stream visits every record
    # once per epoch: no record is read twice per epoch
    positions = sorted(s.global_position(i) for s in shards for i in range(4 * b))
    assert positions == list(range(4 * b * n_proc))
    assert sorted(single[i].record_key for i in range(records)) == list(range(records))


@pytest.mark.parametrize("environ, expected", [
    ({}, False),
    ({"SLURM_STEP_NUM_TASKS": "1"}, False),
    ({"SLURM_NTASKS": "4"}, False),  # set in an sbatch script too: only an srun step is a multi-process launch
    ({"SLURM_STEP_NUM_TASKS": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    ({"TPU_WORKER_HOSTNAMES": "h0,h1"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "h0:1234"}, True),
])
def test_cluster_detection(environ, expected):
    assert runtime.cluster_detected(environ) is expected


def test_a_partial_multiprocess_launch_is_a_clear_error():
    with pytest.raises(ValueError, match="--num_processes=N .* and --process_id"):
        runtime.init_distributed(coordinator_address="localhost:1", num_processes=2, process_id=5, environ={})
    assert runtime.init_distributed(environ={}) is False  # nothing asked, no cluster: single process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _best_params(stage_dir: pathlib.Path) -> list[np.ndarray]:
    """The stage's selected parameters as numpy, restored onto this process's one device."""
    model = model_config.make_model(tiny_config(), num_classes=3)
    like = abstract_params(model, input_px=64 if stage_dir.name == "teacher" else 16)
    params, _ = checkpoint.load_best_params(stage_dir, params_like=like, mesh=parallel.make_mesh())
    return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """2 processes x 1 CPU device (gloo collectives) against 1 process x 2 devices: the same loss at every
    step and the same selected parameters (saved by orbax from both processes)."""
    flags = [*TINY_FLAGS, "--config.stages=('teacher', 'distill')", "--config.teacher.steps=4",
             "--config.distill.steps=4", f"--config.data.root={tmp_path / 'data'}"]
    cmd = [sys.executable, str(REPO / "launch/train.py"), "--config=configs/demo_tiles.py", *flags]

    def env(devices: int) -> dict:
        return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")

    single = subprocess.run([*cmd, f"--workdir={tmp_path / 'one'}"], cwd=REPO, env=env(2), capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen([*cmd, f"--workdir={tmp_path / 'two'}", f"--coordinator_address=localhost:{port}",
                               "--num_processes=2", f"--process_id={i}", "--config.train.final_report=True"], cwd=REPO, env=env(1),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "write the report on one host afterwards" in outs[0]  # not a report that waits for the others
    assert "devices" in (tmp_path / "two" / "run.json").read_text()
    assert '"processes": 2' in (tmp_path / "two" / "run.json").read_text()

    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert set(one) == set(two) == {"teacher/train", "distill/train"}
    for stage in one:
        np.testing.assert_allclose(two[stage], one[stage], rtol=1e-5)
    for stage in ("teacher", "distill"):
        for a, b in zip(_best_params(tmp_path / "one" / stage), _best_params(tmp_path / "two" / stage), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)

    # Both processes SIGKILLed after distillation step 3 (the step-2 checkpoint on disk), then the same
    # 2-process command again: every process checks the checkpoint (orbax restores wait for all) and
    # resumes; the end is the uninterrupted 2-process run's.
    killed = [cmd[0], str(REPO / "tests/kill_at_step.py"), *cmd[2:]]
    for rerun in (False, True):
        port = _free_port()
        extra = {} if rerun else {"HISTOKD_KILL_AT": "distill:3"}
        procs = [subprocess.Popen([*(cmd if rerun else killed), f"--workdir={tmp_path / 'killed'}",
                                   f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
                                  cwd=REPO, env={**env(1), **extra}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for i in range(2)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        expected = [0, 0] if rerun else [-9, -9]
        assert [p.returncode for p in procs] == expected, outs[0][-3000:] + outs[1][-3000:]
    assert "distill: resuming from step 2 of 4" in outs[0]
    for stage in ("teacher", "distill"):
        for a, b in zip(_best_params(tmp_path / "two" / stage), _best_params(tmp_path / "killed" / stage), strict=True):
            np.testing.assert_array_equal(b, a)


DECIDE_SCRIPT = """
import sys
import jax
import numpy as np
from histokd_jax import parallel, runtime

port, pid = sys.argv[1], int(sys.argv[2])
runtime.init_distributed(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
# what each process "sees" differs (a shared filesystem that has not caught up): process 0's view is taken
print("decided", parallel.from_process_0(pid == 0), parallel.from_process_0(7 + pid), flush=True)
print("dropped", parallel.any_process_each(np.asarray([pid == 0, pid == 1, False])).tolist(), flush=True)
# a check that only process 0 makes (the teacher's folder, the checkpoint's metadata) stops every process
def refuse():
    raise ValueError("refused on process 0")
try:
    parallel.on_process_0(refuse, what="checking the checkpoint")
except (ValueError, RuntimeError) as err:
    print("stopped", type(err).__name__, err, flush=True)
# a check every process makes (it reads a checkpoint through orbax): a refusal on one stops all
def refuse_on_1():
    if pid == 1:
        raise ValueError("refused on process 1")
try:
    parallel.on_every_process(refuse_on_1, what="checking the config")
except (ValueError, RuntimeError) as err:
    print("all stopped", type(err).__name__, err, flush=True)
"""


@pytest.mark.slow
def test_filesystem_decisions_are_process_0s_on_every_process(tmp_path):
    """Two processes that see different states (stage finished or not, step 7 or 8) take process 0's."""
    script = tmp_path / "decide.py"
    script.write_text(DECIDE_SCRIPT)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for out in outs:
        assert "decided True 7" in out and "dropped [True, True, False]" in out
    assert "stopped ValueError refused on process 0" in outs[0]
    assert "stopped RuntimeError process 0 failed in checking the checkpoint" in outs[1]
    assert "all stopped RuntimeError another process failed in checking the config" in outs[0]
    assert "all stopped ValueError refused on process 1" in outs[1]
