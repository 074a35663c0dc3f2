"""launch/reproduce.py: the claims arithmetic on hand-made rows, and a tiny end-to-end run of two seeds."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from histokd_jax import ablations, reproduce

REPO = pathlib.Path(__file__).resolve().parents[1]


def _row(role: str, factor: int, accuracy: float, pool: float | None = None) -> dict:
    return {"role": role, "factor": factor, "accuracy": accuracy, "pool": pool}


HAND_ROWS = [
    _row("teacher", 1, 0.93),
    _row("distill", 2, 0.925, 1.0), _row("baseline", 2, 0.90), _row("control", 2, 0.94),
    _row("distill", 4, 0.88, 1.0), _row("baseline", 4, 0.80), _row("control", 4, 0.89),
    _row("distill", 4, 0.84, 0.0), _row("distill", 4, 0.86, 0.25), _row("distill", 4, 0.87, 0.5),
    _row("distill", 8, 0.82, 1.0), _row("baseline", 8, 0.80), _row("control", 8, 0.85),
]


def test_claims_margins_are_the_hand_computed_differences():
    got = {c.name: c for c in reproduce.claims(HAND_ROWS)}
    expected = {  # margin = how far past the target, computed by hand from HAND_ROWS
        "teacher in range": min(0.93 - 0.90, 0.97 - 0.93),  # 0.03
        "resolution costs (1/8)": 0.93 - 0.85 - 0.05,  # 0.03
        "labels are scarce (1/4)": 0.89 - 0.80 - 0.05,  # 0.04
        "KD beats baseline (1/4)": 0.88 - 0.80 - 0.03,  # 0.05
        "KD beats baseline (1/8)": 0.82 - 0.80 - 0.03,  # -0.01: missed
        "KD near control (1/2)": 0.925 - 0.94 + 0.02,  # 0.005
        "KD near control (1/4)": 0.88 - 0.89 + 0.02,  # 0.01
        "KD near control (1/8)": 0.82 - 0.85 + 0.02,  # -0.01: missed
        "KD near teacher (1/2)": 0.925 - 0.93 + 0.01,  # 0.005
        "more pool helps (1/4)": min(0.86 - 0.84, 0.88 - 0.86),  # 0.02
    }
    assert set(got) == set(expected)
    for name, margin in expected.items():
        assert got[name].margin == pytest.approx(margin, abs=1e-9), name
        assert got[name].holds == (margin >= 0), name


def test_equal_accuracies_do_not_count_as_rising_with_the_pool():
    rows = [dict(r, accuracy=0.86) if r["pool"] == 0.0 else r for r in HAND_ROWS]  # 0% == 25%
    pool = next(c for c in reproduce.claims(rows) if c.name == "more pool helps (1/4)")
    assert pool.margin == 0.0 and not pool.holds


def test_a_missing_model_is_a_missed_claim_not_a_crash():
    rows = [r for r in HAND_ROWS if not (r["role"] == "control" and r["factor"] == 8)]
    got = {c.name: c for c in reproduce.claims(rows)}
    assert not got["resolution costs (1/8)"].holds and not got["KD near control (1/8)"].holds
    assert got["KD beats baseline (1/8)"].margin == pytest.approx(-0.01)
    no_pool = [r for r in HAND_ROWS if r["pool"] != 0.0]  # NaN in either place of the comparison
    assert not next(c for c in reproduce.claims(no_pool) if c.name == "more pool helps (1/4)").holds
    no_teacher = [r for r in HAND_ROWS if r["role"] != "teacher"]
    assert not next(c for c in reproduce.claims(no_teacher) if c.name == "teacher in range").holds


# configs/benchmark.py shrunk to seconds per stage: 64 px teacher tiles (students of 32, 16 and 8 px),
# a few 192 px slides, a narrow model (one GroupNorm group: 8 px students keep enough values per group).
TINY_BENCHMARK = [
    "--config.data.tile_px=64", "--config.data.teacher_px=64", "--config.data.slide_tiles=3",
    "--config.data.slides_per_class=3", "--config.data.test_slides_per_class=1", "--config.data.n_unlabeled_slides=2",
    "--config.model.widths=(8, 8, 16, 16)", "--config.model.num_groups=1",
    "--config.sweep.unlabeled_fractions=(0.0, 0.25, 1.0)", "--config.sweep.measure_batch_size=8",
    *(f"--config.{stage}.{key}={value}" for stage in ("teacher", "distill", "baseline", "control")
      for key, value in (("steps", 4), ("batch_size", 8), ("eval_every_steps", 2))),
    "--config.train.eval_batch_size=16", "--config.train.log_every_steps=2", "--config.train.checkpoint_every_steps=2",
    "--config.train.progress=False",
]


@pytest.mark.slow
def test_reproduce_runs_two_seeds_and_writes_the_table_claims_and_plots(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(REPO / "launch/reproduce.py"), f"--workdir={tmp_path}", "--seeds=0,1",
           "--bootstrap=20", *TINY_BENCHMARK]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "reproduce.json").read_text())
    assert sorted(summary["rows"]) == ["0", "1"]
    for seed in ("0", "1"):
        models = sorted(r["model"] for r in summary["rows"][seed])
        assert models == sorted(["teacher", *(f"f{f}/{stage}" for f in (2, 4, 8)
                                              for stage in ("distill", "baseline", "control")),
                                 "f4_pool0/distill", "f4_pool25/distill"])
        assert len(summary["claims"][seed]) == 10
    # the seeds drew different slides
    manifests = [(tmp_path / f"seed{s}" / "slides" / "manifest.csv").read_text() for s in (0, 1)]
    index = [json.loads((tmp_path / f"seed{s}" / "slides" / "synthetic_slides.json").read_text()) for s in (0, 1)]
    assert manifests[0] == manifests[1] and index[0]["slides"] != index[1]["slides"]
    md = (tmp_path / "reproduce.md").read_text()
    assert "accuracy seed 0" in md and "accuracy seed 1" in md and "| KD beats baseline (1/4) |" in md
    assert "| distilled - baseline (paired" in md and sorted(summary["kd_minus_baseline"]["0"]) == ["2", "4", "8"]
    assert md.split("\n", 2)[2] in done.stdout  # the tables, printed at the end
    for name in ("accuracy_vs_gflops.png", "accuracy_vs_pool.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"

    # the ablations distil from seed 0's teacher (reused, not retrained); the default variant is the
    # reproduction's 2.5x student
    teacher_result = tmp_path / "seed0" / "teacher" / "result.json"
    trained_at = teacher_result.stat().st_mtime_ns
    cmd = [sys.executable, str(REPO / "launch/ablate.py"), f"--workdir={tmp_path}", "--seeds=0", "--bootstrap=20",
           *TINY_BENCHMARK]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads((tmp_path / "ablations" / "ablations.json").read_text())
    assert sorted(table) == sorted(name for name, _ in ablations.VARIANTS)
    reproduced = next(r for r in summary["rows"]["0"] if r["model"] == "f4/distill")
    assert table["kl+feat_maxpool"]["0"]["accuracy"] == reproduced["accuracy"]
    kl_only = json.loads((tmp_path / "ablations" / "seed0" / "kl_only" / "config.json").read_text())
    assert kl_only["distill"]["loss"]["w_feat"] == 0.0 and kl_only["distill"]["loss"]["w_kl"] == 1.0
    cache = json.loads((tmp_path / "ablations" / "seed0" / "target_cache" / "config.json").read_text())
    assert cache["distill"]["target_cache"] is True and cache["teacher"]["checkpoint"] == str(tmp_path / "seed0" / "teacher")
    assert "| views_per_crop_4 |" in (tmp_path / "ablations" / "ablations.md").read_text()
    assert teacher_result.stat().st_mtime_ns == trained_at


@pytest.mark.parametrize("script", ["reproduce.py", "ablate.py"])
def test_seeded_commands_refuse_seeds_that_are_not_integers(script, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "launch" / script), f"--workdir={tmp_path}", "--seeds=0,one"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--seeds must be integers, got 0,one" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing written
