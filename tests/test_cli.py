"""The installed ``histokd`` command and the launch/ wrappers: they reach the same commands, from any folder."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from histokd_jax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
HISTOKD = pathlib.Path(sys.executable).parent / "histokd"  # written by `pip install` ([project.scripts])
SHIPPED = REPO / "histokd_jax" / "configs"


def _run(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_histokd_lists_every_command_from_outside_the_checkout(tmp_path):
    assert HISTOKD.is_file(), "pip install -e . writes the histokd console script"
    done = _run([str(HISTOKD)], tmp_path)
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.splitlines()[2:] if line.strip()]
    assert listed == ["train", "evaluate", "sweep", "predict", "export", "reproduce", "ablate",
                      "import-torch", "export-torch"]


def test_unknown_command_fails_with_the_list(tmp_path):
    done = _run([str(HISTOKD), "trian"], tmp_path)
    assert done.returncode != 0
    assert "unknown command 'trian'" in done.stderr and "train" in done.stderr


@pytest.mark.parametrize("command, flag", [("train", "--workdir"), ("export", "--teacher_mpp"),
                                           ("predict", "--cascade_budget")])
def test_command_help_lists_its_own_flags(tmp_path, command, flag):
    done = _run([str(HISTOKD), command, "--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert flag in done.stdout


def test_train_outside_the_checkout_reads_the_packaged_config(tmp_path):
    """`--config=configs/demo.py` from a folder with no configs/ loads the shipped demo config: an override of a
    key it lacks is refused by name (a missing config file would fail differently, and nothing is trained)."""
    for config in ("configs/demo.py", "demo"):
        done = _run([str(HISTOKD), "train", f"--config={config}", f"--workdir={tmp_path / 'w'}",
                     "--config.data.no_such_key=1"], tmp_path)
        assert done.returncode != 0
        assert "data.no_such_key" in done.stderr, done.stderr
        assert not (tmp_path / "w").exists()


def test_packaged_config_rewrites_only_missing_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.packaged_config(["--config=demo"]) == [f"--config={SHIPPED / 'demo.py'}"]
    assert cli.packaged_config(["--config", "configs/cd.py:x", "--workdir=w"]) == [
        "--config", f"{SHIPPED / 'cd.py'}:x", "--workdir=w"]
    own = tmp_path / "configs" / "demo.py"  # the user's own file of the same name wins
    own.parent.mkdir()
    own.write_text("")
    assert cli.packaged_config(["--config=configs/demo.py"]) == ["--config=configs/demo.py"]
    assert cli.packaged_config(["--config=mine.py", "--config.a=1"]) == ["--config=mine.py", "--config.a=1"]


@pytest.mark.parametrize("wrapper", sorted(p.name for p in (REPO / "launch").glob("*.py")))
def test_launch_wrappers_run_from_any_folder(tmp_path, wrapper):
    done = _run([sys.executable, str(REPO / "launch" / wrapper), "--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--" in done.stdout and done.stdout.startswith(str(REPO / "launch" / wrapper))
