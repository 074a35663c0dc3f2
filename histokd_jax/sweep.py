"""The resolution sweep: one teacher, then students and baselines at several downsample factors.

Layout of a sweep workdir::

    sweep/teacher/                 the one teacher (trained here, or config.teacher.checkpoint)
    sweep/f4/distill/ ...       one run per factor: distilled student, label-only baseline,
    sweep/f4/control/      and (synthetic data) the student trained on the pool's true labels
    sweep/f4_pool25/distill/    distillation on 25% of the unlabelled pool (config.sweep.unlabeled_fractions)
    sweep/sweep.md, sweep.json     the paper-style table; plots/accuracy_vs_gflops.png

Every cell is an ordinary training workdir, so rerunning resumes the unfinished
cells and skips the finished ones.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from histokd_jax import atomic, evaluation, metrics, parallel, report, trainer
from histokd_jax.data.splits import resolve_downsample
from histokd_jax.messages import say
from histokd_jax.model_config import make_model
from histokd_jax.models import check_groupnorm
from histokd_jax.stage_names import STAGE_ORDER
from histokd_jax.state import init_params
from histokd_jax.units import MPP_AT_1X, resolution_to_mpp

def cell_name(factor: int, fraction: float) -> str:
    return f"f{factor}" if fraction == 1.0 else f"f{factor}_pool{round(100 * fraction)}"


def shared_data(config: ml_collections.ConfigDict, *, workdir: pathlib.Path) -> dict:
    """Where a sweep's cells find the data the sweep's first run generated and indexed: generated
    synthetic data and slide indexes are made once, under the sweep's workdir, not once per cell."""
    data = config.data
    shared = {}
    if data.kind in ("synthetic", "synthetic_slides") and not data.root:
        shared["root"] = str(workdir / ("slides" if data.kind == "synthetic_slides" else "data"))
    if not data.slide_index_dir:
        shared["slide_index_dir"] = str(workdir / "slide_index")
    return shared


def cell_config(config: ml_collections.ConfigDict, *, factor: int, fraction: float,
                teacher_dir: pathlib.Path, data_dirs: dict | None = None) -> ml_collections.ConfigDict:
    """The run of one sweep cell: the student at ``factor``, distilled from the sweep's teacher, reading
    the sweep's data (``data_dirs``: ``shared_data``)."""
    cell = ml_collections.ConfigDict(config.to_dict())
    for key, value in (data_dirs or {}).items():
        cell.data[key] = value
    cell.data.downsample = int(factor)
    cell.data.student_magnification = ""  # the factor decides; the teacher magnification stays
    cell.data.unlabeled_fraction = float(fraction)
    cell.teacher.checkpoint = str(teacher_dir)
    cell.train.final_report = False  # the sweep writes one table for all cells
    stages = ["distill"]
    if fraction == 1.0:
        stages.append("baseline")
        if config.sweep.control:
            stages.append("control")
    cell.stages = tuple(stages)
    return cell


def train_teacher(config: ml_collections.ConfigDict, workdir: pathlib.Path, *,
                  should_stop: Callable[[str, int], bool] | None = None,
                  config_name: str = "this config") -> pathlib.Path | None:
    """The sweep's teacher: ``config.teacher.checkpoint`` if given, else trained (or reused) in
    ``workdir/teacher``, on the sweep's data. None if stopped part-way."""
    if config.teacher.checkpoint:
        return pathlib.Path(config.teacher.checkpoint)
    first = ml_collections.ConfigDict(config.to_dict())
    first.stages = ("teacher",)
    first.train.final_report = False
    if trainer.train_and_evaluate(first, workdir, should_stop=should_stop, config_name=config_name) is None:
        return None
    return workdir / "teacher"


def run_sweep(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
              should_stop: Callable[[str, int], bool] | None = None, config_name: str = "this config",
              n_boot: int = 1000) -> list[dict] | None:
    """Train (or reuse) the teacher, then every cell; write the table. None if stopped part-way."""
    workdir = pathlib.Path(workdir).absolute()
    teacher_dir = train_teacher(config, workdir, should_stop=should_stop, config_name=config_name)
    if teacher_dir is None:
        return None
    for factor in config.sweep.factors:
        student_px = config.data.teacher_px // int(factor)
        try:
            check_groupnorm(input_px=student_px, widths=config.model.widths, num_groups=config.model.num_groups,
                            role=f"student at factor {factor}")
        except ValueError as err:
            say(f"sweep: factor {factor} skipped: {err}")
            continue
        pool_factors = tuple(int(f) for f in config.sweep.pool_factors)
        fractions = config.sweep.unlabeled_fractions if not pool_factors or int(factor) in pool_factors else (1.0,)
        for fraction in fractions:
            name = cell_name(int(factor), float(fraction))
            say(f"sweep: {name}")
            cell = cell_config(config, factor=int(factor), fraction=float(fraction), teacher_dir=teacher_dir,
                               data_dirs=shared_data(config, workdir=workdir))
            if trainer.train_and_evaluate(cell, workdir / name, should_stop=should_stop,
                                          config_name=config_name) is None:
                return None
    return write_table(workdir, n_boot=n_boot, batch_size=config.sweep.measure_batch_size)


def images_per_second(config: ml_collections.ConfigDict, *, num_classes: int, input_px: int, batch_size: int = 64,
                      min_seconds: float = 1.0) -> float:
    """Forward-pass throughput at ``input_px`` on this machine's devices (speed does not depend on the
    weights, so fresh ones are used): the median of timed batches after a warm-up."""
    mesh = parallel.make_mesh()
    batch_size = int(math.ceil(batch_size / mesh.size) * mesh.size)
    model = make_model(config, num_classes=num_classes)
    params = parallel.put_replicated(init_params(model, rng=jax.random.key(0), input_px=input_px), mesh=mesh)
    eval_fn = evaluation.make_eval_fn(model=model, image_key="image", mesh=mesh)
    batch = parallel.put_batch({"image": np.zeros((batch_size, input_px, input_px, 3), np.uint8)}, mesh=mesh)
    jax.block_until_ready(eval_fn(params, batch))
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 3:
        t0 = time.perf_counter()
        jax.block_until_ready(eval_fn(params, batch))
        times.append(time.perf_counter() - t0)
    return batch_size / float(np.median(times))


class UnfinishedStage(FileNotFoundError):
    """A stage folder with test predictions but no result row: the run stopped between the two."""


def _result_of(stage_dir: pathlib.Path) -> dict:
    """A model's result row: its stage's ``result.json``, or, for a teacher given by ``teacher.checkpoint``
    (evaluated, not trained here: no result.json, which would mark a trained stage), its row of the run's
    ``results.json``. Neither there: ``UnfinishedStage``, saying which stage and what to do."""
    if (stage_dir / "result.json").exists():
        return json.loads((stage_dir / "result.json").read_text())
    results = stage_dir.parent / "results.json"
    rows = json.loads(results.read_text()) if results.exists() else []
    row = next((row for row in rows if row.get("role") == stage_dir.name), None)
    if row is None:
        where = f"{results} has no {stage_dir.name!r} row" if results.exists() else f"there is no {results}"
        raise UnfinishedStage(
            f"the {stage_dir.name} stage of the run in {stage_dir.parent} is unfinished: {stage_dir} has test "
            f"predictions but no result.json, and {where}. Run the same launch/train.py or launch/sweep.py "
            f"command again to finish it, or remove {stage_dir} to leave it out of the table.")
    return row


def _scored(preds: dict, *, n_boot: int) -> tuple[dict, dict]:
    """(point figures, 95% bootstrap CIs over slides) of saved test predictions."""
    ci = metrics.bootstrap_ci(preds["labels"], preds["probs"], n_boot=n_boot, seed=0, groups=preds["slides"])
    return metrics.scores(preds["labels"], preds["probs"]), ci


def _pyramid_accuracy(stage_dir: pathlib.Path, *, n_boot: int) -> dict:
    """A student's test accuracy on pyramid reads, with its CI ({} where there are none: tile data, teachers)."""
    if not (stage_dir / report.PYRAMID_PREDICTIONS).exists():
        return {}
    point, ci = _scored(report.load_predictions(stage_dir, filename=report.PYRAMID_PREDICTIONS), n_boot=n_boot)
    return {"pyramid_accuracy": point["accuracy"], "pyramid_accuracy_ci95": list(ci["accuracy"])}


def table_rows(workdir: str | pathlib.Path, *, n_boot: int = 1000, batch_size: int = 64,
               measure: bool = True) -> list[dict]:
    """One row per finished model under ``workdir`` (a sweep or a single run), teacher first, then by factor."""
    workdir = pathlib.Path(workdir)
    rows, speed = [], {}
    teacher_gflops = None
    for stage_dir in report.find_models(workdir):
        result = _result_of(stage_dir)
        config, run = report.load_run(stage_dir.parent)
        point, ci = _scored(report.load_predictions(stage_dir), n_boot=n_boot)
        pyramid = _pyramid_accuracy(stage_dir, n_boot=n_boot)
        factor = 1 if result["role"] == "teacher" else resolve_downsample(config.data)
        teacher_mpp = resolution_to_mpp(config.data.teacher_magnification) if config.data.teacher_magnification \
            else None
        px = int(result["input_px"])
        if measure and px not in speed:
            speed[px] = images_per_second(config, num_classes=len(run["class_names"]), input_px=px,
                                          batch_size=batch_size)
        row = {
            "model": stage_dir.relative_to(workdir).as_posix(), "role": result["role"], "factor": factor,
            "input_px": px, "mpp": None if teacher_mpp is None else teacher_mpp * factor,
            "magnification": None if teacher_mpp is None else MPP_AT_1X / (teacher_mpp * factor),
            "pool": float(config.data.get("unlabeled_fraction", 1.0)) if result["role"] == "distill" else None,
            "accuracy": point["accuracy"], "accuracy_ci95": list(ci["accuracy"]), "macro_f1": point["macro_f1"],
            "macro_auc": point["macro_auc"], "gflops_per_image": result["gflops_per_image"],
            "images_per_s": speed.get(px), **pyramid,
        }
        if result["role"] == "teacher":
            teacher_gflops = result["gflops_per_image"]
        rows.append(row)
    rows.sort(key=lambda r: (r["factor"], STAGE_ORDER.get(r["role"], 9), -(r["pool"] or 0), r["model"]))
    for row in rows:
        row["flop_ratio"] = teacher_gflops / row["gflops_per_image"] if teacher_gflops else None
    return rows


def format_table(rows: list[dict]) -> str:
    """The paper-style table in Markdown."""
    pyramid = any("pyramid_accuracy" in r for r in rows)  # slide data: students also scored on pyramid reads
    lines = ["| model | magnification | µm/px | input px | pool | accuracy (95% CI) | "
             + ("accuracy, pyramid reads | " if pyramid else "") + "macro-F1 | macro AUC | "
             "GFLOPs/image | FLOP ratio | images/s |",
             "|---|---:|---:|---:|---:|---|" + ("---|" if pyramid else "") + "---:|---:|---:|---:|---:|"]
    opt = lambda v, fmt: "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)  # noqa: E731
    for r in rows:
        lo, hi = r["accuracy_ci95"]
        mag = f"{r['magnification']:.3g}x" if r["magnification"] else f"1/{r['factor']}"
        pool = "" if r["pool"] is None else f"{100 * r['pool']:.0f}%"
        lines.append(f"| {r['model']} | {mag} | {opt(r['mpp'], '.3g')} | {r['input_px']} | {pool} | "
                     f"{r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | " + (_pyramid_cell(r) if pyramid else "")
                     + f"{r['macro_f1']:.3f} | {opt(r['macro_auc'], '.3f')} | "
                     f"{r['gflops_per_image']:.4f} | {opt(r['flop_ratio'], '.1f')} | {opt(r['images_per_s'], '.0f')} |")
    return "\n".join(lines)


def _pyramid_cell(row: dict) -> str:
    if "pyramid_accuracy" not in row:
        return " | "
    lo, hi = row["pyramid_accuracy_ci95"]
    return f"{row['pyramid_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | "


def write_table(workdir: str | pathlib.Path, *, n_boot: int = 1000, batch_size: int = 64,
                measure: bool = True) -> list[dict]:
    """``sweep.json``, ``sweep.md`` and ``plots/accuracy_vs_gflops.png`` for the models under ``workdir``."""
    from histokd_jax import plots

    workdir = pathlib.Path(workdir)
    rows = table_rows(workdir, n_boot=n_boot, batch_size=batch_size, measure=measure)
    atomic.write_json(workdir / "sweep.json", rows, indent=1)
    header = (f"# Resolution table: {workdir.name}\n\nTest split, 95% bootstrap CI (whole slides resampled "
              f"for slide data); analytic GFLOPs (every kernel tap); images/s measured on {jax.device_count()} {jax.default_backend()} device(s), "
              f"batch {batch_size}.\n\n")
    atomic.write_text(workdir / "sweep.md", header + format_table(rows) + "\n")
    (workdir / "plots").mkdir(exist_ok=True)
    labels = {"teacher": "teacher", "distill": "distilled", "baseline": "baseline (labels only)",
              "control": "control (true pool labels)"}
    points = [{"name": r["model"], "group": labels.get(r["role"], r["role"]) + (
                   f", pool {100 * r['pool']:.0f}%" if r["pool"] not in (None, 1.0) else ""),
               "gflops": r["gflops_per_image"], "accuracy": r["accuracy"], "ci95": r["accuracy_ci95"]} for r in rows]
    plots.accuracy_vs_gflops(workdir / "plots" / "accuracy_vs_gflops.png", points,
                             title=f"{workdir.name}: accuracy vs cost")
    return rows
