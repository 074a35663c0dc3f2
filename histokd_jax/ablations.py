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

from histokd_jax import atomic, metrics, report, sweep
from histokd_jax.reproduce import seed_config

# (name, overrides of config.distill); the first is the configs' default objective.
VARIANTS: tuple[tuple[str, dict], ...] = (
    ("kl+feat_maxpool", {}),
    ("kl_only", {"loss.w_feat": 0.0}),
    ("kl+feat_bicubic", {"loss.feature_resize": "bicubic"}),
    ("kl+feat_both", {"loss.feature_resize": "maxpool+bicubic"}),
    ("kl+feat+ce", {"loss.w_ce": 1.0}),
    ("temperature_2", {"loss.temperature": 2.0}),
    ("temperature_4", {"loss.temperature": 4.0}),
    ("views_per_crop_2", {"views_per_crop": 2}),
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
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = cell.distill
        for name in parents:
            node = node[name]
        node[leaf] = value
    return cell


def run_ablations(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, seeds: Sequence[int],
                  factor: int = 4, variants: Sequence[tuple[str, dict]] = VARIANTS,
                  should_stop: Callable[[str, int], bool] | None = None, config_name: str = "this config",
                  n_boot: int = 1000) -> str | None:
    """Every variant for every seed (the seed's teacher must exist: run the reproduction first)."""
    from histokd_jax import trainer

    workdir = pathlib.Path(workdir).absolute()
    for seed in seeds:
        teacher_dir = workdir / f"seed{int(seed)}" / "teacher"
        if not (teacher_dir / "result.json").exists():
            raise FileNotFoundError(f"no finished teacher in {teacher_dir}: run launch/reproduce.py with "
                                    f"--workdir={workdir} --seeds={int(seed)} first")
        for name, overrides in variants:
            trainer.say(f"ablation: seed {seed}, {name}")
            cell = variant_config(seed_config(config, seed), overrides, factor=factor, teacher_dir=teacher_dir)
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


def write_table(root: pathlib.Path, *, seeds: Sequence[int], variants: Sequence[tuple[str, dict]],
                n_boot: int = 1000) -> str:
    """``ablations.md`` / ``ablations.json`` from the finished variants under ``root``."""
    default_name = variants[0][0]
    cells = {name: {int(s): _cell(root / f"seed{int(s)}" / name / "student_kd", n_boot=n_boot,
                                  default_dir=root / f"seed{int(s)}" / default_name / "student_kd") for s in seeds
                    if (root / f"seed{int(s)}" / name / "student_kd" / "result.json").exists()
                    and (root / f"seed{int(s)}" / default_name / "student_kd" / "result.json").exists()}
             for name, _ in variants}
    lines = ["| variant | " + " | ".join(f"accuracy seed {s} (95% CI) | change vs default, seed {s} (paired 95% CI)"
                                         for s in seeds) + " | mean | mean change | mean distillation seconds |",
             "|" + "---|" * (2 * len(seeds) + 4)]
    for name, _ in variants:
        row = cells[name]
        per_seed = " | ".join(
            f"{row[int(s)]['accuracy']:.3f} [{row[int(s)]['accuracy_ci95'][0]:.3f}, {row[int(s)]['accuracy_ci95'][1]:.3f}]"
            " | " + ("" if name == default_name else "{:+.3f} [{:+.3f}, {:+.3f}]".format(*row[int(s)]["change_vs_default"]))
            if int(s) in row else " | " for s in seeds)
        mean = np.mean([c["accuracy"] for c in row.values()]) if row else math.nan
        changes = [c["change_vs_default"][0] for c in row.values()]
        change = f"{np.mean(changes):+.3f}" if changes and name != default_name else ""
        secs = [c["seconds"] for c in row.values() if c["seconds"] is not None]
        lines.append(f"| {name} | {per_seed} | {mean:.3f} | {change} | {np.mean(secs):.0f} |" if secs else
                     f"| {name} | {per_seed} | {mean:.3f} | {change} | |")
    text = "\n".join(lines)
    atomic.write_json(root / "ablations.json", {name: {str(s): c for s, c in row.items()} for name, row in cells.items()},
                      indent=1)
    atomic.write_text(root / "ablations.md", "# Ablations of the distilled student\n\n" + text + "\n")
    return text
