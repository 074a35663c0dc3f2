"""Ablations of the distillation objective and of the cheaper teacher targets, on the benchmark at one
factor: each variant is a distillation run from the reproduction's teacher of the same seed.

Layout: ``workdir/ablations/seed<s>/<variant>/`` (ordinary training workdirs), and
``workdir/ablations/ablations.md`` / ``.json`` (accuracy per seed, its mean, the change against the
default variant, and the stage's wall time). Rerunning resumes.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from histokd_jax import atomic, metrics, report, sweep, trainer
from histokd_jax.messages import say
from histokd_jax.reproduce import seed_config

# (name, overrides of config.distill); the first is the configs' default (temperature 1; two views per crop in
# configs/benchmark.py): each other variant changes one setting of it.
VARIANTS: tuple[tuple[str, dict], ...] = (
    ("kl+feat_maxpool", {}),
    ("kl_only", {"loss.w_feat": 0.0}),
    ("kl+feat_bicubic", {"loss.feature_resize": "bicubic"}),
    ("kl+feat_both", {"loss.feature_resize": "maxpool+bicubic"}),
    ("kl+feat+ce", {"loss.w_ce": 1.0}),
    ("temperature_2", {"loss.temperature": 2.0}),
    ("temperature_4", {"loss.temperature": 4.0}),
    ("views_per_crop_1", {"views_per_crop": 1}),
    ("views_per_crop_4", {"views_per_crop": 4}),
    ("target_cache", {"target_cache": True}),
    ("bf16_teacher", {"teacher_dtype": "bfloat16"}),
)


def variant_config(config: ml_collections.ConfigDict, overrides: dict, *, factor: int,
                   teacher_dir: pathlib.Path) -> ml_collections.ConfigDict:
    """One distillation run at ``factor`` from ``teacher_dir`` with ``overrides`` applied to ``config.distill``,
    on the data of the teacher's sweep."""
    cell = sweep.cell_config(config, factor=factor, fraction=1.0, teacher_dir=teacher_dir,
                             data_dirs=sweep.shared_data(config, workdir=teacher_dir.parent))
    cell.stages = ("distill",)
    with cell.distill.unlocked():
        cell.distill.update_from_flattened_dict(overrides)
    return cell


def run_ablations(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, seeds: Sequence[int],
                  factor: int = 4, variants: Sequence[tuple[str, dict]] = VARIANTS,
                  should_stop: Callable[[str, int], bool] | None = None, config_name: str = "this config",
                  n_boot: int = 1000) -> str | None:
    """Every variant for every seed, each distilled from the seed's teacher in ``workdir/seed<s>/teacher``
    (the reproduction's, or trained here on the same data when it is missing). None if stopped part-way."""
    workdir = pathlib.Path(workdir).absolute()
    for seed in seeds:
        seeded = seed_config(config, seed)
        teacher_dir = sweep.train_teacher(seeded, workdir / f"seed{int(seed)}", should_stop=should_stop,
                                          config_name=config_name)
        if teacher_dir is None:
            return None
        for name, overrides in variants:
            say(f"ablation: seed {seed}, {name}")
            cell = variant_config(seeded, overrides, factor=factor, teacher_dir=teacher_dir)
            out = workdir / "ablations" / f"seed{int(seed)}" / name
            if trainer.train_and_evaluate(cell, out, should_stop=should_stop, config_name=config_name) is None:
                return None
    return write_table(workdir / "ablations", seeds=seeds, variants=variants, n_boot=n_boot)


def _cell(stage_dir: pathlib.Path, *, default_dir: pathlib.Path, n_boot: int) -> dict:
    """One variant's figures, and its accuracy minus the default's on the same tiles (paired interval)."""
    result = json.loads((stage_dir / "result.json").read_text())
    preds, default = report.load_predictions(stage_dir), report.load_predictions(default_dir)
    ci = metrics.bootstrap_ci(preds["labels"], preds["probs"], n_boot=n_boot, seed=0, groups=preds["slides"])
    change = metrics.paired_accuracy_difference(preds["labels"], preds["probs"], default["probs"], n_boot=n_boot,
                                                groups=preds["slides"])
    return {"accuracy": result["accuracy"], "accuracy_ci95": list(ci["accuracy"]), "macro_f1": result["macro_f1"],
            "change_vs_default": list(change), "seconds": result.get("stage_seconds")}


def _seed_cells(cell: dict | None, *, is_default: bool) -> str:
    """Two table cells for one seed: accuracy with its interval, and the paired change against the default."""
    if cell is None:
        return " | "
    low, high = cell["accuracy_ci95"]
    change = "" if is_default else "{:+.3f} [{:+.3f}, {:+.3f}]".format(*cell["change_vs_default"])
    return f"{cell['accuracy']:.3f} [{low:.3f}, {high:.3f}] | {change}"


def _finished(stage_dir: pathlib.Path) -> bool:
    return (stage_dir / "result.json").exists()


def write_table(root: pathlib.Path, *, seeds: Sequence[int], variants: Sequence[tuple[str, dict]],
                n_boot: int = 1000) -> str:
    """``ablations.md`` / ``ablations.json`` from the finished variants under ``root``."""
    default_name = variants[0][0]
    cells = {}
    for name, _ in variants:
        cells[name] = {}
        for s in (int(s) for s in seeds):
            stage, default = (root / f"seed{s}" / n / "distill" for n in (name, default_name))
            if _finished(stage) and _finished(default):
                cells[name][s] = _cell(stage, default_dir=default, n_boot=n_boot)
    lines = ["| variant | " + " | ".join(f"accuracy seed {s} (95% CI) | change vs default, seed {s} (paired 95% CI)"
                                         for s in seeds) + " | mean | mean change | mean distillation seconds |",
             "|" + "---|" * (2 * len(seeds) + 4)]
    for name, _ in variants:
        row, is_default = cells[name], name == default_name
        per_seed = " | ".join(_seed_cells(row.get(int(s)), is_default=is_default) for s in seeds)
        mean = np.mean([c["accuracy"] for c in row.values()]) if row else math.nan
        changes = [c["change_vs_default"][0] for c in row.values()]
        change = f"{np.mean(changes):+.3f}" if changes and not is_default else ""
        secs = [c["seconds"] for c in row.values() if c["seconds"] is not None]
        seconds = f"{np.mean(secs):.0f}" if secs else ""
        lines.append(f"| {name} | {per_seed} | {mean:.3f} | {change} | {seconds} |")
    text = "\n".join(lines)
    atomic.write_json(root / "ablations.json", {name: {str(s): c for s, c in row.items()} for name, row in cells.items()},
                      indent=1)
    atomic.write_text(root / "ablations.md", "# Ablations of the distilled student\n\n" + text + "\n")
    return text
