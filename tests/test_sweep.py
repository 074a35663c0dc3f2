"""The resolution sweep (launch/sweep.py) and the true-label pool behind its control."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from histokd_jax.data import splits as splits_lib
from histokd_jax.data import synthetic_slides
from tests.tiny import TINY_FLAGS, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def sweep(workdir: pathlib.Path, data_root: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(REPO / "launch/sweep.py"), "--config=configs/demo_tiles.py", f"--workdir={workdir}",
           *TINY_FLAGS, "--config.control.steps=6", "--config.control.batch_size=16",
           "--config.control.eval_every_steps=3", f"--config.data.root={data_root}", "--config.sweep.factors=(2, 4)",
           "--config.sweep.unlabeled_fractions=(0.5, 1.0)", "--config.sweep.control=True",
           "--config.sweep.measure_batch_size=16", "--bootstrap=50"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_sweep_trains_every_cell_once_and_writes_the_table(tmp_path):
    workdir, data_root = tmp_path / "sweep", tmp_path / "tiles"
    done = sweep(workdir, data_root)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((workdir / "sweep.json").read_text())
    got = sorted((r["model"], r["factor"], r["input_px"], r["pool"]) for r in rows)
    assert got == sorted([
        ("teacher", 1, 64, None),
        ("f2/distill", 2, 32, 1.0), ("f2_pool50/distill", 2, 32, 0.5), ("f2/baseline", 2, 32, None),
        ("f2/control", 2, 32, None),
        ("f4/distill", 4, 16, 1.0), ("f4_pool50/distill", 4, 16, 0.5), ("f4/baseline", 4, 16, None),
        ("f4/control", 4, 16, None),
    ])
    by = {r["model"]: r for r in rows}
    assert by["teacher"]["flop_ratio"] == 1.0
    assert 1.0 < by["f2/distill"]["flop_ratio"] < by["f4/distill"]["flop_ratio"]
    for r in rows:
        lo, hi = r["accuracy_ci95"]
        assert lo <= r["accuracy"] <= hi and r["images_per_s"] > 0
    # one teacher for every cell: each cell's run distils from the sweep's teacher folder
    cell = json.loads((workdir / "f4" / "config.json").read_text())
    assert cell["teacher"]["checkpoint"] == str(workdir / "teacher") and not (workdir / "f4" / "teacher").exists()
    # the half pool: all 48 labelled tiles and 24 of the 48 unlabelled ones
    assert json.loads((workdir / "f2_pool50" / "run.json").read_text())["records"]["unlabeled"] == 24
    md = (workdir / "sweep.md").read_text()
    assert "| f4_pool50/distill |" in md and "FLOP ratio" in md
    assert (workdir / "plots" / "accuracy_vs_gflops.png").read_bytes()[:4] == b"\x89PNG"

    # rerunning recomputes nothing: no training line is added to any cell's log
    logs = {p: p.read_text() for p in workdir.rglob("metrics.jsonl")}
    again = sweep(workdir, data_root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.read_text() for p in workdir.rglob("metrics.jsonl")} == logs


def test_tile_pool_truth_is_the_generators_record(tmp_path):
    config = tiny_config(str(tmp_path / "tiles"))
    splits = splits_lib.load_splits(config.data, workdir=tmp_path)
    meta = json.loads((tmp_path / "tiles" / "synthetic.json").read_text())
    truth = splits.pool_truth.labels()
    n = len(splits.train)
    np.testing.assert_array_equal(truth[:n], splits.train.labels())
    names = [pathlib.Path(r.path).stem for r in splits.pool.records[n:]]
    np.testing.assert_array_equal(truth[n:], [meta["unlabeled_labels"][int(s)] for s in names])
    assert splits.pool.labels()[n:].max() == -1  # the distillation pool itself stays unlabelled
    assert splits.pool_truth[n]["has_label"] and splits.pool_truth[n]["label"] == truth[n]


def test_slide_pool_truth_matches_the_rendered_cells(tmp_path):
    config = tiny_config("")
    config.data.kind = "synthetic_slides"
    config.data.class_names = ("solid", "speckled", "vesicular")
    config.data.teacher_magnification, config.data.student_magnification, config.data.downsample = "10x", "2.5x", 0
    config.data.slides_per_class, config.data.n_unlabeled_slides, config.data.slide_tiles = 3, 2, 6
    splits = splits_lib.load_splits(config.data, workdir=tmp_path)
    pool, truth = splits.pool, splits.pool_truth.labels()
    meta = json.loads((tmp_path / "slides" / "synthetic_slides.json").read_text())
    mixed = [s for s in meta["slides"] if not s["label"]]
    checked = 0
    for s in mixed:  # 64 µm tiles at 1 µm/px start at 0: each tile is one rendered 64 px cell
        _, info = synthetic_slides.render_slide(label=None, seed=s["seed"], tile_grid=(6, 6), tile_px=64)
        index = [i for i, p in enumerate(pool.paths) if p.endswith(s["slide"])][0]
        rows = np.flatnonzero(pool.slide_of == index)
        cells = info["tile_labels"][pool.coords[rows, 1] // 64, pool.coords[rows, 0] // 64]
        np.testing.assert_array_equal(truth[rows], cells)
        checked += len(rows)
    assert checked > 0 and len(np.unique(truth[pool.labels() == -1])) >= 2


def _predictions_only_stage(run_dir: pathlib.Path, role: str) -> pathlib.Path:
    """A stage folder that saved its test predictions, as a run killed just after that leaves it."""
    from histokd_jax import report

    rng = np.random.default_rng(0)
    report.save_predictions(run_dir / role, labels=rng.integers(0, 2, 10), probs=rng.dirichlet([1, 1], 10),
                            class_names=("a", "b"))
    return run_dir / role


@pytest.mark.parametrize("results_rows", [None, [{"role": "distill"}]])
def test_a_stage_without_a_result_row_is_named_with_what_to_do(tmp_path, results_rows):
    from histokd_jax import sweep as sweep_lib

    stage = _predictions_only_stage(tmp_path / "f4", "teacher")
    if results_rows is not None:
        (tmp_path / "f4" / "results.json").write_text(json.dumps(results_rows))
    with pytest.raises(sweep_lib.UnfinishedStage) as err:
        sweep_lib.table_rows(tmp_path, measure=False)
    message = str(err.value)
    assert f"teacher stage of the run in {tmp_path / 'f4'} is unfinished" in message
    assert str(stage) in message and "again" in message
    assert ("has no 'teacher' row" if results_rows else "there is no") in message


def test_launch_sweep_prints_an_unfinished_stage_as_one_error_line(tmp_path):
    workdir = tmp_path / "sweep"
    _predictions_only_stage(workdir / "f2", "distill")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(REPO / "launch/sweep.py"), "--config=configs/demo_tiles.py", f"--workdir={workdir}",
           *TINY_FLAGS, f"--config.data.root={tmp_path / 'tiles'}", f"--config.teacher.checkpoint={tmp_path}",
           "--config.sweep.factors=()", "--bootstrap=10"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("error: the distill stage of the run in")
    assert "Traceback" not in done.stderr


def test_cells_read_the_sweeps_generated_data_and_slide_index(tmp_path):
    """A cell must not generate and index its own copy of the synthetic data (minutes per cell)."""
    from histokd_jax.configs import demo
    from histokd_jax import sweep as sweep_lib

    config = demo.get_config()
    cell = sweep_lib.cell_config(config, factor=8, fraction=0.5, teacher_dir=tmp_path / "teacher",
                                 data_dirs=sweep_lib.shared_data(config, workdir=tmp_path))
    assert cell.data.root == str(tmp_path / "slides") and cell.data.slide_index_dir == str(tmp_path / "slide_index")
    assert cell.data.downsample == 8 and cell.data.unlabeled_fraction == 0.5 and cell.stages == ("distill",)
    own = config.copy_and_resolve_references()
    own.data.root, own.data.slide_index_dir = "/data/slides", "/data/index"  # given by the user: kept
    assert sweep_lib.shared_data(own, workdir=tmp_path) == {}
