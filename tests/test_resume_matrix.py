"""Resume on every data path: SIGKILL mid-stage, rerun, and the test predictions equal an uninterrupted run's.

Each case is one data kind or option that changes what the training loader reads (tile folders,
the synthetic tiles, synthetic slides as the demo, a manifest of slides, TFDS array_record, part
of the unlabelled pool, the true-label control, several views per crop, the target cache over
slides, scanner-like student views on it). For each, the same command runs twice: once straight through, once killed by SIGKILL
after step 10 of the stage under test (with its step-8 checkpoint on disk) and then run again.
The rerun must resume at step 8 and end with the straight run's test predictions, bit for bit:
the state, the loader's position (the data source is recognised by content) and the best-so-far
selection all come back. (A changed dataset, teacher or setting is refused: tests/test_trainer.py.)
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from histokd_jax.data import synthetic, synthetic_slides, tfds_sources
from histokd_jax.data.synthetic import CLASS_NAMES
from tests.tiny import TINY_FLAGS, TINY_SLIDE_FLAGS

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

STEPS, KILL_AT = 12, 10  # checkpoints at 4 and 8, validation at 6 and 12: the rerun redoes steps 9 and 10
LONGER = ("--config.train.checkpoint_every_steps=4", "--config.data.workers=0")
SLIDES = (f"--config.data.class_names={CLASS_NAMES}", "--config.data.teacher_magnification=10x",
          "--config.data.student_magnification=2.5x", "--config.data.downsample=0")


def longer(section: str) -> tuple[str, ...]:
    return (f"--config.{section}.steps={STEPS}", f"--config.{section}.eval_every_steps=6", *LONGER)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Data every case reads: a synthetic tile folder, a synthetic slide set and a TFDS build of the tiles."""
    root = tmp_path_factory.mktemp("data")
    tiles = root / "tiles"
    synthetic.write_tile_folder(tiles, seed=0, tile_px=64, n_train=48, n_unlabeled=48, n_val=24, n_test=24)
    manifest = synthetic_slides.write_slide_set(root / "slides", seed=0, n_per_class=5, n_unlabeled=2,
                                                tile_grid=(6, 6), tile_px=64)
    tfds_sources.build_array_record(tiles, root / "tfds", name="resume_tiles", class_names=CLASS_NAMES,
                                    splits=("train", "val", "test"))
    return {"tiles": tiles, "slides": manifest.parent, "manifest": manifest, "tfds": root / "tfds"}


def env() -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")


def predictions(stage_dir: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(stage_dir / "test_predictions.npz") as npz:
        return {k: npz[k] for k in npz.files}


def tiles_args(data, kind: str) -> tuple[str, ...]:
    return ("--config=configs/demo_tiles.py", *TINY_FLAGS, f"--config.data.kind={kind}",
            f"--config.data.root={data['tiles']}")


def demo_args(data) -> tuple[str, ...]:
    # the fixture's slides are the chromatin generator's (shared with the manifest cases)
    return ("--config=configs/demo.py", *TINY_FLAGS, *TINY_SLIDE_FLAGS, f"--config.data.root={data['slides']}",
            "--config.data.generator=chromatin", "--config.data.class_names=('solid', 'speckled', 'vesicular')")


def manifest_args(data) -> tuple[str, ...]:
    return ("--config=configs/demo_tiles.py", *TINY_FLAGS, "--config.data.kind=slides",
            f"--config.data.manifest={data['manifest']}", *SLIDES)


def tfds_args(data) -> tuple[str, ...]:
    # train[:50%] labelled, train[50%:] read without its labels as the unlabelled pool
    return ("--config=configs/demo_tiles.py", *TINY_FLAGS, "--config.data.kind=tfds",
            "--config.data.tfds_name=resume_tiles", f"--config.data.tfds_data_dir={data['tfds']}",
            "--config.data.train_split=train[:50%]", "--config.data.unlabeled_split=train[50%:]",
            "--config.data.val_split=val", "--config.data.test_split=test")


def teacher_of(data, kind: str) -> str:
    return f"--config.teacher.checkpoint={data['teachers'] / kind / 'teacher'}"


# case: (args(data), the stages, the stage killed). Distillation cases take a finished teacher
# (teacher.checkpoint) so that each run trains only the stage under test.
CASES = {
    "tile_folder": (lambda d: tiles_args(d, "folder"), ("teacher",), "teacher"),
    "synthetic_tiles": (lambda d: (*tiles_args(d, "synthetic"), teacher_of(d, "tiles")), ("distill",), "distill"),
    "synthetic_slides_demo": (lambda d: (*demo_args(d), teacher_of(d, "slides")), ("distill",), "distill"),
    "manifest_of_slides": (manifest_args, ("teacher",), "teacher"),
    "tfds_array_record": (lambda d: (*tfds_args(d), teacher_of(d, "tiles")), ("distill",), "distill"),
    "unlabeled_fraction_half": (lambda d: (*demo_args(d), teacher_of(d, "slides"),
                                           "--config.data.unlabeled_fraction=0.5"), ("distill",), "distill"),
    "control_stage": (lambda d: (*demo_args(d), "--config.control.batch_size=16"), ("control",), "control"),
    # the demo's slides distil with two views per crop by default (configs/benchmark.py); here tiles do too
    "views_per_crop_2_tiles": (lambda d: (*tiles_args(d, "synthetic"), teacher_of(d, "tiles"),
                                          "--config.distill.views_per_crop=2"), ("distill",), "distill"),
    "target_cache_slides": (lambda d: (*demo_args(d), teacher_of(d, "slides"), "--config.distill.target_cache=True"),
                            ("distill",), "distill"),
    # scanner-like student views (data.scanlike_student_views) draw extra random numbers per record: on the
    # cached-target path (their views are made per record) with half of them drawn
    "scanlike_target_cache_slides": (lambda d: (*demo_args(d), teacher_of(d, "slides"),
                                                "--config.distill.target_cache=True",
                                                "--config.data.scanlike_student_views=0.5"), ("distill",), "distill"),
}
SECTION = {"teacher": "teacher", "distill": "distill", "control": "control"}


@pytest.fixture(scope="module")
def teachers(data, tmp_path_factory) -> dict[str, pathlib.Path]:
    """A finished tiny teacher on the tiles and one on the slides, for the distillation cases."""
    folder = tmp_path_factory.mktemp("teachers")
    for kind, args in (("tiles", tiles_args(data, "synthetic")), ("slides", demo_args(data))):
        done = run(folder / kind, (*args, "--config.stages=('teacher',)", *LONGER))
        assert done.returncode == 0, done.stderr[-3000:]
    data["teachers"] = folder
    return data


def case_args(name: str, data) -> tuple[str, ...]:
    make, stages, killed = CASES[name]
    return (*make(data), f"--config.stages={stages}", *longer(SECTION[killed]))


def start(workdir: pathlib.Path, args: tuple[str, ...], *, kill_at: str | None = None) -> subprocess.Popen:
    """launch/train.py (or tests/kill_at_step.py, which SIGKILLs itself at ``kill_at``) in its own session."""
    script = "tests/kill_at_step.py" if kill_at else "launch/train.py"
    extra = {"HISTOKD_KILL_AT": kill_at} if kill_at else {}
    return subprocess.Popen([sys.executable, str(REPO / script), f"--workdir={workdir}", *args], cwd=REPO,
                            env={**env(), **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(workdir: pathlib.Path, args: tuple[str, ...], *, kill_at: str | None = None) -> subprocess.CompletedProcess:
    return finish(start(workdir, args, kill_at=kill_at))


@pytest.mark.parametrize("name", sorted(CASES))
def test_sigkill_then_rerun_gives_the_uninterrupted_test_predictions_bit_for_bit(name, teachers, tmp_path):
    args, (_, _, killed) = case_args(name, teachers), CASES[name]
    # the uninterrupted run and the one killed after step 10 run side by side
    straight_proc = start(tmp_path / "straight", args)
    interrupted = run(tmp_path / "resumed", args, kill_at=f"{killed}:{KILL_AT}")
    straight = finish(straight_proc)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert interrupted.returncode == -signal.SIGKILL, interrupted.stderr[-3000:]
    assert f"SIGKILL at {killed} step {KILL_AT}" in interrupted.stdout
    assert not (tmp_path / "resumed" / killed / "result.json").exists()

    rerun = run(tmp_path / "resumed", args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{killed}: resuming from step 8 of {STEPS}" in rerun.stdout
    a, b = predictions(tmp_path / "resumed" / killed), predictions(tmp_path / "straight" / killed)
    assert a.keys() == b.keys()
    for key in a:  # bit for bit: labels, probabilities, class names, slides
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
    # what was redone after the resume stands once in the log: one row per step (log_every_steps=1)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == f"{killed}/train"] == list(range(1, STEPS + 1))
