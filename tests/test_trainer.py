"""End-to-end behaviour of the trainer: devices, resume, NaN stop, launch script."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from histokd_jax import experiment, steps, trainer
from tests.tiny import TINY_FLAGS, TINY_SLIDE_FLAGS, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    """One generated tile folder shared by every run of this module."""
    return str(tmp_path_factory.mktemp("tiles"))


def final_params(stage_dir: pathlib.Path) -> dict:
    """The last saved training state's parameters, read straight from the orbax files."""
    with ocp.CheckpointManager(stage_dir / "checkpoints", item_names=("state",)) as manager:
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]["params"]


def launch(workdir: pathlib.Path, *extra: str, devices: int = 1,
           config: str = "configs/demo_tiles.py") -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(REPO / "launch/train.py"), f"--config={config}", f"--workdir={workdir}",
           *TINY_FLAGS, *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def train_losses(workdir: pathlib.Path) -> dict[str, list[float]]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    out: dict[str, list[float]] = {}
    for row in rows:
        if row["stage"].endswith("/train"):
            out.setdefault(row["stage"], []).append(row["loss"])
    return out


def test_launch_end_to_end_writes_results_and_is_not_redone(tmp_path, data_root):
    workdir = tmp_path / "run"
    done = launch(workdir, f"--config.data.root={data_root}")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((workdir / "results.json").read_text())
    assert [r["role"] for r in rows] == ["teacher", "distill", "baseline"]
    for row in rows:
        assert set(trainer.RESULT_KEYS) <= set(row)
        assert row["split"] == "test" and 0.0 <= row["accuracy"] <= 1.0
    assert rows[0]["input_px"] == 64 and rows[1]["input_px"] == 16 and rows[1]["downsample"] == 4
    # 16x fewer pixels; the late stages shrink to 1x1 but still count all 9 taps, so the ratio is ~14.6x here
    assert rows[0]["gflops_per_image"] > 10 * rows[1]["gflops_per_image"] > 0
    assert "distill" in done.stdout and "teacher / student FLOPs" in done.stdout
    assert (workdir / "config.json").exists() and list((workdir / "tensorboard").iterdir())

    # Running the same command again redoes nothing: no training step is logged twice.
    lines_before = (workdir / "metrics.jsonl").read_text().count("\n")
    again = launch(workdir, f"--config.data.root={data_root}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (workdir / "metrics.jsonl").read_text().count("\n") == lines_before
    assert json.loads((workdir / "results.json").read_text()) == rows


def test_one_and_eight_devices_give_the_same_losses(tmp_path, data_root):
    extra = (f"--config.data.root={data_root}", "--config.stages=('teacher', 'distill')")
    one, eight = tmp_path / "one", tmp_path / "eight"
    for workdir, devices in ((one, 1), (eight, 8)):
        done = launch(workdir, *extra, devices=devices)
        assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((eight / "run.json").read_text())["devices"] == 8
    losses_one, losses_eight = train_losses(one), train_losses(eight)
    assert set(losses_one) == {"teacher/train", "distill/train"}
    for stage, values in losses_one.items():
        assert len(values) == 6
        np.testing.assert_allclose(losses_eight[stage], values, rtol=2e-4, atol=1e-5)


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path, data_root):
    done = launch(tmp_path / "bad", f"--config.data.root={data_root}", "--config.teacher.batch_size=12", devices=8)
    assert done.returncode != 0
    assert "does not divide evenly over 8 device(s)" in done.stderr


def test_interrupted_run_resumes_to_the_same_parameters(tmp_path, data_root):
    config = tiny_config(data_root)
    config.stages = ("teacher", "distill")
    straight = tmp_path / "straight"
    assert trainer.train_and_evaluate(config, straight) is not None

    # A clean stop (preemption signal): checkpoint at the stop step, return None.
    resumed = tmp_path / "resumed"
    stopped = trainer.train_and_evaluate(config, resumed, should_stop=lambda role, step: role == "distill" and step == 3)
    assert stopped is None
    assert not (resumed / "distill" / "result.json").exists()

    # A crash after step 5: the last checkpoint is step 4, so step 5 is redone on resume.
    def crash(role, step):
        if role == "distill" and step == 5:
            raise RuntimeError("simulated crash")
        return False

    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train_and_evaluate(config, resumed, should_stop=crash)
    assert trainer.train_and_evaluate(config, resumed) is not None

    for role in ("teacher", "distill"):
        a, b = final_params(straight / role), final_params(resumed / role)
        for x, y in zip(_leaves(a), _leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
        row_a = json.loads((straight / role / "result.json").read_text())
        row_b = json.loads((resumed / role / "result.json").read_text())
        row_a.pop("stage_seconds"), row_b.pop("stage_seconds")  # wall time: differs run to run
        assert row_a == pytest.approx(row_b)


def test_resume_with_other_settings_is_refused(tmp_path, data_root):
    config = tiny_config(data_root)
    config.stages = ("teacher",)
    assert trainer.train_and_evaluate(config, tmp_path, should_stop=lambda role, step: step == 2) is None
    config.teacher.optim.learning_rate = 0.5
    with pytest.raises(ValueError, match=r"teacher.optim.learning_rate: 0.003 -> 0.5"):
        trainer.train_and_evaluate(config, tmp_path)


def test_a_stage_restarted_from_scratch_logs_each_step_once(tmp_path, data_root):
    """A crash before the first checkpoint: the rerun starts the stage again, and metrics.jsonl forgets
    what the crashed run logged."""
    config = tiny_config(data_root)
    config.stages, config.train.checkpoint_every_steps, config.teacher.eval_every_steps = ("teacher",), 1000, 1000

    def crash(role, step):
        if step == 4:
            raise RuntimeError("simulated crash")
        return False

    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train_and_evaluate(config, tmp_path, should_stop=crash)
    assert not (tmp_path / "teacher" / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "teacher" / "checkpoints").iterdir())
    assert trainer.train_and_evaluate(config, tmp_path) is not None
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "teacher/train"] == list(range(1, config.teacher.steps + 1))


def test_resume_with_another_selection_metric_is_refused(tmp_path, data_root):
    config = tiny_config(data_root)
    config.stages = ("teacher",)
    assert trainer.train_and_evaluate(config, tmp_path, should_stop=lambda role, step: step == 2) is None
    config.train.select_metric = "accuracy"
    with pytest.raises(ValueError, match=r"train.select_metric: 'balanced_accuracy' -> 'accuracy'"):
        trainer.train_and_evaluate(config, tmp_path)


def test_resume_on_a_changed_dataset_of_the_same_size_is_refused_and_loses_nothing(tmp_path):
    root = tmp_path / "tiles"
    config = tiny_config(str(root))
    config.stages = ("teacher",)
    assert trainer.train_and_evaluate(config, tmp_path / "run", should_stop=lambda role, step: step == 4) is None
    # one training tile relabelled (moved to another class folder): as many records, not the same ones
    tile = sorted((root / "train" / "solid").glob("*.png"))[0]
    moved = root / "train" / "speckled" / f"moved-{tile.name}"
    tile.rename(moved)
    with pytest.raises(ValueError, match=r"teacher: cannot resume .* the training data changed"):
        trainer.train_and_evaluate(config, tmp_path / "run")
    moved.rename(tile)  # the data restored: the checkpoint was kept, the run resumes and finishes
    assert trainer.train_and_evaluate(config, tmp_path / "run") is not None
    assert (tmp_path / "run" / "teacher" / "result.json").exists()


def test_resume_with_another_teacher_is_refused(tmp_path, data_root):
    config = tiny_config(data_root)
    config.stages = ("teacher",)
    for name, seed in (("a", 0), ("b", 1)):  # two teachers of the same architecture and classes
        config.seed = seed
        assert trainer.train_and_evaluate(config, tmp_path / name) is not None
    config.seed, config.stages = 0, ("distill",)
    config.teacher.checkpoint = str(tmp_path / "a" / "teacher")
    assert trainer.train_and_evaluate(config, tmp_path / "s", should_stop=lambda role, step: step == 2) is None
    config.teacher.checkpoint = str(tmp_path / "b" / "teacher")  # the path may change; the teacher may not
    with pytest.raises(ValueError, match=r"distill: cannot resume .* the teacher changed"):
        trainer.train_and_evaluate(config, tmp_path / "s")


def test_unlabeled_pool_overlapping_an_evaluation_split_is_refused(tmp_path, data_root):
    config = tiny_config(data_root)
    config.data.unlabeled_folder = "."
    with pytest.raises(ValueError, match="would leak"):
        trainer.train_and_evaluate(config, tmp_path)


def _leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_root, monkeypatch):
    real_step = steps.supervised_step

    def poisoned(state, batch, **kw):  # the loss turns NaN from the 5th update on
        new_state, metrics = real_step(state, batch, **kw)
        metrics["loss"] = jnp.where(state.step >= 4, jnp.nan, metrics["loss"])
        return new_state, metrics

    monkeypatch.setattr(steps, "supervised_step", poisoned)
    config = tiny_config(data_root)
    config.stages = ("teacher",)
    with pytest.raises(FloatingPointError, match="step 5"):
        trainer.train_and_evaluate(config, tmp_path / "nan")
    with ocp.CheckpointManager(tmp_path / "nan" / "teacher" / "checkpoints") as manager:
        assert manager.latest_step() == 4  # saved at step 4 (every 2 steps), never at the poisoned step 5


def test_distils_from_a_configured_teacher_checkpoint(tmp_path, data_root):
    config = tiny_config(data_root)
    config.stages = ("teacher",)
    assert trainer.train_and_evaluate(config, tmp_path / "t") is not None

    config.stages = ("distill",)
    config.teacher.checkpoint = str(tmp_path / "t" / "teacher")
    rows = trainer.train_and_evaluate(config, tmp_path / "s")
    assert [r["role"] for r in rows] == ["distill"]
    assert not (tmp_path / "s" / "teacher").exists()  # no teacher was trained there

    # Listing the given teacher among the stages evaluates it; the end-of-run table has its row.
    config.stages = ("teacher", "distill")
    config.train.final_report, config.train.bootstrap, config.sweep.measure_batch_size = True, 20, 16
    rows = experiment.train_and_report(config, tmp_path / "s3")
    assert [r["role"] for r in rows] == ["teacher", "distill"]
    assert not (tmp_path / "s3" / "teacher" / "result.json").exists()  # evaluated here, not trained here
    table = (tmp_path / "s3" / "sweep.md").read_text()
    assert "| teacher |" in table and "| distill |" in table

    # A teacher of another architecture is refused, never loaded loosely.
    config.model.widths = (8, 16, 16, 16)
    with pytest.raises(ValueError, match="does not match"):
        trainer.train_and_evaluate(config, tmp_path / "s2")


def test_distill_without_any_teacher_is_a_clear_error(tmp_path, data_root):
    config = tiny_config(data_root)
    config.stages = ("distill",)
    with pytest.raises(FileNotFoundError, match="needs a finished teacher"):
        trainer.train_and_evaluate(config, tmp_path / "none")


@pytest.mark.parametrize("name", ["cd", "luad"])
def test_private_dataset_configs_ask_for_their_data_root(tmp_path, name):
    done = subprocess.run(
        [sys.executable, str(REPO / "launch/train.py"), f"--config=configs/{name}.py", f"--workdir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0
    assert "--config.data.root=" in done.stderr
    missing = subprocess.run(
        [sys.executable, str(REPO / "launch/train.py"), f"--config=configs/{name}.py", f"--workdir={tmp_path}",
         f"--config.data.root={tmp_path / 'nowhere'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_the_demo_config_trains_from_synthetic_slides_through_openslide(tmp_path):
    done = launch(tmp_path, *TINY_SLIDE_FLAGS, "--config.train.final_report=True", "--config.train.bootstrap=50",
                  config="configs/demo.py")
    assert done.returncode == 0, done.stderr[-3000:]
    # the demo ends with the evaluation report, the resolution table and a student heatmap of a test slide
    assert "| distill |" in (tmp_path / "report.md").read_text()
    table = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["model"] for r in table] == ["teacher", "distill", "baseline"]
    assert table[1]["flop_ratio"] > 10 and table[1]["images_per_s"] > 0 and table[1]["magnification"] == 2.5
    assert "| distill |" in done.stdout
    heatmaps = list((tmp_path / "predictions").glob("*.heatmap.png"))
    assert len(heatmaps) == 1 and (tmp_path / "predictions" / heatmaps[0].name.replace(".heatmap.png", ".geojson")).exists()
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["role"] for r in rows] == ["teacher", "distill", "baseline"]
    assert rows[0]["input_px"] == 64 and rows[1]["input_px"] == 16 and rows[1]["downsample"] == 4
    assert "teacher / student FLOPs" in done.stdout
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["records"]["slides_used"] == 3 * 5 + 2 and run["records"]["slides_skipped"] == 0
    assert run["records"]["unlabeled"] > 0 and run["records"]["test"] > 0
    assert len(list((tmp_path / "slide_index").glob("*.mask.png"))) == run["records"]["slides_used"]
    assert len(list((tmp_path / "slides" / "slides").glob("*.tiff"))) == 3 * 5 + 2


@pytest.mark.parametrize("name", ["cd", "luad"])
def test_private_dataset_configs_take_a_slide_manifest_and_check_its_classes(tmp_path, name):
    from histokd_jax.data import synthetic_slides

    manifest = synthetic_slides.write_slide_set(tmp_path / "set", seed=0, n_per_class=1, n_unlabeled=0,
                                                splits={"train": 1.0})
    done = subprocess.run(
        [sys.executable, str(REPO / "launch/train.py"), f"--config=configs/{name}.py", f"--workdir={tmp_path / 'w'}",
         f"--config.data.manifest={manifest}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0
    # The synthetic slides are labelled solid/speckled/vesicular: refused before any compute, every line named.
    assert "class 'solid' is not among the config's classes" in done.stderr
    assert "line 2" in done.stderr and "line 4" in done.stderr
    assert not (tmp_path / "w" / "slide_index").exists()


def test_trains_from_a_tfds_array_record_dataset(tmp_path, data_root):
    from histokd_jax.data import synthetic, tfds_sources

    config = tiny_config(data_root)
    # The generated tile folder, turned into an array_record TFDS dataset and read back without TensorFlow.
    d = config.data
    synthetic.write_tile_folder(data_root, seed=d.seed, tile_px=d.tile_px, n_train=d.n_train,
                                n_unlabeled=d.n_unlabeled, n_val=d.n_val, n_test=d.n_test)
    tfds_sources.build_array_record(data_root, tmp_path / "tfds", name="histokd_tiny", class_names=synthetic.CLASS_NAMES)
    config.unlock()
    config.data.kind = "tfds"
    config.data.tfds_name = "histokd_tiny"
    config.data.tfds_data_dir = str(tmp_path / "tfds")
    config.data.class_names = synthetic.CLASS_NAMES
    config.stages = ("teacher", "distill")
    rows = trainer.train_and_evaluate(config, tmp_path / "run")
    assert [r["role"] for r in rows] == ["teacher", "distill"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["records"]["test"] == 24
