"""Bad configurations are refused up front, before any data is written or read, with a message that names
the key, the bad value and the fix (histokd_jax/config_checks.py)."""

from __future__ import annotations

import importlib
import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

from histokd_jax.configs import demo
from histokd_jax import checkpoint, config_checks, models, parallel, state, trainer
from tests.tiny import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def refused(config, tmp_path: pathlib.Path, match: str, error: type[Exception] = ValueError) -> None:
    """``train_and_evaluate`` raises ``error`` matching ``match`` and has written nothing: no data, no workdir."""
    with pytest.raises(error, match=match):
        trainer.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "tiles").exists() and not (tmp_path / "run").exists()


@pytest.fixture
def config(tmp_path):
    """The tiny demo config, its tiles to be generated in tmp_path/tiles (which a refusal must not do)."""
    return tiny_config(str(tmp_path / "tiles"))


# --- resolution ------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [3, 6, 32])
def test_downsample_not_a_power_of_two_is_refused(config, tmp_path, factor):
    config.data.downsample = factor
    refused(config, tmp_path, rf"data.downsample={factor} is not a power of two in 1, 2, 4, 8, 16; use one of them")


def test_downsample_not_dividing_the_teacher_tile_is_refused(config, tmp_path):
    config.data.teacher_px, config.data.downsample = 60, 8
    refused(config, tmp_path, r"data.teacher_px=60 is not divisible by the downsample 8.*use data.teacher_px=56 or 64")


def test_synthetic_tile_smaller_than_the_teacher_crop_is_refused(config, tmp_path):
    config.data.tile_px, config.data.teacher_px = 48, 64
    refused(config, tmp_path, r"data.tile_px=48 is smaller than data.teacher_px=64.*data.tile_px >= 64")


@pytest.mark.parametrize("teacher, student", [("10x", "20x"), ("1.0", "0.5")])  # magnifications; µm/px
def test_student_resolution_above_the_teachers_is_refused(config, tmp_path, teacher, student):
    config.data.teacher_magnification, config.data.student_magnification, config.data.downsample = teacher, student, 0
    refused(config, tmp_path, rf"data.student_magnification='{student}' \(0.5 µm/px\): the student's resolution is "
                              r"higher than the teacher's.*LOWER magnification")


def test_negative_downsample_is_refused_as_a_student_above_the_teacher(config, tmp_path):
    config.data.downsample = -2
    refused(config, tmp_path, r"data.downsample=-2 would give the student a higher resolution than the teacher")


def test_magnifications_that_are_not_a_power_of_two_apart_are_refused(config, tmp_path):
    config.data.teacher_magnification, config.data.student_magnification, config.data.downsample = "10x", "3x", 0
    refused(config, tmp_path, r"'10x' \(1 µm/px\) -> data.student_magnification='3x' \(3.33333 µm/px\): a downsample "
                              r"of 3.333, not a power of two.*one of '5x', '2.5x', '1.25x', '0.625x'")


def test_magnifications_give_the_factor():
    data = demo.get_config().data  # 10x -> 2.5x
    assert config_checks.check_resolution(data) == 4


# --- batch sizes ---------------------------------------------------------------------------------


def test_every_stage_batch_is_checked_against_the_global_device_count_at_once():
    config = tiny_config()
    config.distill.batch_size, config.train.eval_batch_size = 12, 20
    with pytest.raises(ValueError, match=r"distill.batch_size=12 does not divide evenly over 8 device\(s\) \(use 8 or "
                                         r"16\); train.eval_batch_size=20 does not divide evenly over 8 device\(s\) "
                                         r"\(use 16 or 24\)\. Batch sizes are global"):
        config_checks.check_config(config, device_count=8)


def test_only_the_stages_that_run_need_a_divisible_batch():
    config = tiny_config()
    config.stages, config.baseline.batch_size = ("teacher",), 12
    config_checks.check_config(config, device_count=8)
    config.stages = ("teacher", "baseline")
    with pytest.raises(ValueError, match=r"baseline.batch_size=12 does not divide evenly over 8 device\(s\)"):
        config_checks.check_config(config, device_count=8)


def test_trainer_checks_batches_against_jax_device_count_before_any_data(config, tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 32)  # as if 4 hosts with 8 devices each
    refused(config, tmp_path, r"teacher.batch_size=16 does not divide evenly over 32 device\(s\) \(use 32\)")


# --- stages and settings -------------------------------------------------------------------------


def test_unknown_stage_names_are_refused(config, tmp_path):
    config.stages = ("teacher", "distil")
    refused(config, tmp_path, r"config.stages=\('teacher', 'distil'\) has unknown names \['distil'\]; use names from "
                              "teacher, distill, baseline, control")


@pytest.mark.parametrize("key, value, match", [
    ("train.select_metric", "acc", r"train.select_metric='acc' is not a metric; use one of accuracy, balanced_accuracy"),
    ("train.log_every_steps", 0, r"train.log_every_steps=0 must be positive"),
    ("control.steps", -1, r"control.steps=-1 must be positive"),
    ("model.compute_dtype", "float16", r"model.compute_dtype='float16' is not one of 'float32', 'bfloat16'"),
    ("model.padding", "valid", r"model.padding='valid' is not one of 'same', 'symmetric'"),
    ("distill.teacher_dtype", "bf16", r"distill.teacher_dtype='bf16' is not one of '', 'float32', 'bfloat16'"),
    ("distill.views_per_crop", 0, r"distill.views_per_crop=0 must be 1..8"),
    ("distill.views_per_crop", 9, r"distill.views_per_crop=9 must be 1..8: a crop has 8 distinct"),
])
def test_settings_that_would_fail_after_training_are_refused(config, tmp_path, key, value, match):
    section, name = key.split(".")
    config[section][name] = value
    refused(config, tmp_path, match)


def test_groupnorm_too_small_for_the_student_is_refused_before_the_data(config, tmp_path):
    config.model.widths, config.model.num_groups, config.data.downsample = (8, 16, 16, 32), 16, 16
    refused(config, tmp_path, r"student: at 4 px input, stage \d is 1x1 .* Use fewer groups \(model.num_groups")


# --- unknown keys --------------------------------------------------------------------------------


def test_a_config_file_with_a_key_common_does_not_know_is_refused(config, tmp_path):
    config.unlock()
    config.data.tile_pxx = 80  # what a config file with a typo would add
    config.modell = {"widths": (8, 8)}
    refused(config, tmp_path, r"unknown config key\(s\) data.tile_pxx \(closest known: data.tile_px[,)].*; "
                              r"modell \(closest known: model\): nothing reads them")


@pytest.mark.parametrize("name", ["demo", "demo_tiles", "cd", "luad", "crc", "pcam"])
def test_every_shipped_config_passes_the_checks(name):
    config = importlib.import_module(f"configs.{name}").get_config()  # crc/pcam add the TFDS keys
    config_checks.check_config(config, device_count=1)


@pytest.mark.parametrize("override, match", [
    ("--config.data.nonexistent=1", r"FATAL Flags parsing error: --config.data.nonexistent=1: unknown config key "
                                    r"data.nonexistent \(the keys of data are class_names, .*tile_px"),
    ("--config.data.tile_pxx=1", r"--config.data.tile_pxx=1: unknown config key data.tile_pxx \(closest known: "
                                 r"data.tile_px"),
])
def test_an_unknown_key_on_the_command_line_is_one_line_not_a_traceback(tmp_path, override, match):
    done = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "--config=configs/demo_tiles.py", override,
                           f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert re.search(match, done.stderr), done.stderr
    assert not (tmp_path / "run").exists()


# --- the teacher ---------------------------------------------------------------------------------


def test_a_workdir_with_the_old_student_folder_names_is_refused_with_the_renames_and_left_as_it_was(config, tmp_path):
    run = tmp_path / "run"
    for old in ("student_kd", "f4/student_baseline"):  # a run and a sweep cell
        (run / old / "checkpoints").mkdir(parents=True)
        (run / old / "result.json").write_text("{}")
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    with pytest.raises(ValueError, match="older histokd_jax") as refusal:
        trainer.train_and_evaluate(config, run)
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before
    assert not (tmp_path / "tiles").exists()
    moves = [line.split() for line in str(refusal.value).splitlines() if line.strip().startswith("mv ")]
    assert sorted(m[1] for m in moves) == [str(run / "f4/student_baseline"), str(run / "student_kd")]
    for _, src, dst in moves:  # the printed commands are the fix
        os.rename(src, dst)
    assert (run / "distill" / "result.json").exists() and (run / "f4" / "baseline" / "result.json").exists()
    config_checks.check_no_old_folders(run)


def test_distillation_without_a_teacher_is_refused_before_the_data(config, tmp_path):
    config.stages = ("distill", "baseline")
    refused(config, tmp_path, r"needs a finished teacher: .*/run/teacher does not exist and config.stages="
                              r"\('distill', 'baseline'\) does not train one; add 'teacher' to config.stages",
            FileNotFoundError)


def test_a_missing_teacher_checkpoint_is_refused_even_when_not_distilling(config, tmp_path):
    config.stages, config.teacher.checkpoint = ("baseline",), str(tmp_path / "nowhere" / "teacher")
    refused(config, tmp_path, r"teacher.checkpoint=.*/nowhere/teacher does not exist; point it at the teacher/ folder "
                              "of a finished run", FileNotFoundError)


def test_an_unfinished_teacher_checkpoint_is_refused(config, tmp_path):
    (tmp_path / "half" / "teacher" / "checkpoints").mkdir(parents=True)
    config.stages, config.teacher.checkpoint = ("distill",), str(tmp_path / "half" / "teacher")
    refused(config, tmp_path, r"teacher.checkpoint=.*/half/teacher has not finished training \(no result.json\)",
            FileNotFoundError)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> pathlib.Path:
    """A finished tiny teacher (widths (8, 16, 16, 32), 4 groups, 3 classes, 64 px); returns its folder."""
    config = tiny_config(str(tmp_path_factory.mktemp("teacher_tiles")))
    config.stages = ("teacher",)
    config.teacher.steps, config.teacher.eval_every_steps = 2, 2
    workdir = tmp_path_factory.mktemp("teacher_run")
    assert trainer.train_and_evaluate(config, workdir) is not None
    return workdir / "teacher"


def student_config(tmp_path: pathlib.Path, teacher: pathlib.Path):
    config = tiny_config(str(tmp_path / "tiles"))
    config.stages, config.teacher.checkpoint = ("distill",), str(teacher)
    return config


@pytest.mark.slow
@pytest.mark.parametrize("key, value, match", [
    ("widths", (8, 16, 16, 16), r"model.widths: \(8, 16, 16, 32\) there, \(8, 16, 16, 16\) here"),
    ("blocks_per_stage", (2, 1, 1, 1), r"model.blocks_per_stage: \(1, 1, 1, 1\) there, \(2, 1, 1, 1\) here"),
    ("num_groups", 2, r"model.num_groups: 4 there, 2 here"),  # same parameter shapes: only the config shows these
    ("padding", "symmetric", r"model.padding: 'same' there, 'symmetric' here"),
])
def test_a_teacher_of_another_architecture_is_refused_before_the_data(tmp_path, teacher, key, value, match):
    config = student_config(tmp_path, teacher)
    config.model[key] = value
    refused(config, tmp_path, r"teacher.checkpoint=.*/teacher does not match this config: " + match
            + r"\. A teacher loads only into the architecture, classes and resolution it was trained with")


@pytest.mark.slow
def test_a_teacher_of_other_classes_is_refused_before_the_data(tmp_path, teacher):
    config = student_config(tmp_path, teacher)
    config.data.class_names = ("solid", "speckled")
    refused(config, tmp_path, r"does not match this config: classes: 3 \['solid', 'speckled', 'vesicular'\] there, "
                              r"2 \['solid', 'speckled'\] here \(data.class_names\)")


@pytest.mark.slow
def test_a_teacher_at_another_resolution_is_refused(tmp_path, teacher):
    config = student_config(tmp_path, teacher)
    config.data.teacher_px = config.data.tile_px = 128
    refused(config, tmp_path, r"does not match this config: data.teacher_px: 64 there, 128 here")


@pytest.mark.slow
def test_a_finished_teacher_in_the_workdir_is_not_reused_with_another_architecture(tmp_path, teacher):
    config = tiny_config(str(tmp_path / "tiles"))
    config.stages, config.model.num_groups = ("teacher", "distill"), 2
    with pytest.raises(ValueError, match=r"the finished teacher in .*/teacher does not match this config: "
                                         r"model.num_groups: 4 there, 2 here"):
        trainer.train_and_evaluate(config, teacher.parent)
    assert not (tmp_path / "tiles").exists()


@pytest.mark.slow
@pytest.mark.parametrize("num_classes, widths, match", [
    (2, (8, 16, 16, 32), r"is not compatible with the stored shape"),
    (3, (8, 16, 16, 16), r"is not compatible with the stored shape"),
    (3, (8, 16, 32), r"tree structures do not match"),
])
def test_the_strict_loader_refuses_another_class_count_or_architecture(teacher, num_classes, widths, match):
    """The last guard, whatever the saved config says: every parameter must load with its own shape."""
    model = models.ResNetGN(num_classes=num_classes, widths=widths, blocks_per_stage=(1,) * len(widths), num_groups=4)
    like = state.abstract_params(model, input_px=64)
    with pytest.raises(ValueError, match=r"does not match the configured model: .*" + match):
        checkpoint.load_best_params(teacher, params_like=like, mesh=parallel.make_mesh())
