"""Evaluation reports of a workdir: every trained model's test predictions, with CIs, in JSON and Markdown.

Each finished stage saves its test-split predictions (``test_predictions.npz``:
labels, class probabilities and, for slide data, the slide of each tile) once,
from its validation-selected parameters. Reports are computed from those files
only, so ``launch/evaluate.py`` never re-runs a model and never touches the
test split twice.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import ml_collections
import numpy as np

from histokd_jax import atomic, metrics
from histokd_jax.stage_names import STAGE_ORDER

PREDICTIONS = "test_predictions.npz"
# A student's test tiles read from each slide's pyramid at its own µm/px (what launch/predict.py reads),
# beside PREDICTIONS, which holds them as trained: the block mean of the teacher's view.
PYRAMID_PREDICTIONS = "test_predictions_pyramid.npz"


def save_predictions(stage_dir: str | pathlib.Path, *, labels: np.ndarray, probs: np.ndarray,
                     class_names: Sequence[str], slides: np.ndarray | None = None,
                     dropped: Sequence[tuple[str, str]] = (), filename: str = PREDICTIONS) -> pathlib.Path:
    """Write ``stage_dir/test_predictions.npz`` (atomically: a report never reads half a file).

    ``dropped``: (slide or tile file, reason) of what the evaluation left out because it
    failed to read, so the report can say what its figures do not cover."""
    path = pathlib.Path(stage_dir) / filename
    atomic.save_npz(path, labels=np.asarray(labels, np.int32), probs=np.asarray(probs, np.float32),
                    class_names=np.asarray(list(class_names)),
                    slides=np.asarray([] if slides is None else slides, dtype=str),
                    dropped=np.asarray([list(d) for d in dropped], dtype=str).reshape(-1, 2))
    return path


def load_predictions(stage_dir: str | pathlib.Path, *, filename: str = PREDICTIONS) -> dict:
    with np.load(pathlib.Path(stage_dir) / filename) as data:
        out = {key: data[key] for key in data.files}
    out["class_names"] = [str(c) for c in out["class_names"]]
    out["slides"] = out["slides"] if out["slides"].size else None
    out["dropped"] = [(str(a), str(b)) for a, b in out.get("dropped", np.zeros((0, 2), str))]  # older files: none
    return out


def find_models(workdir: str | pathlib.Path) -> list[pathlib.Path]:
    """Stage folders under ``workdir`` (any depth: a sweep nests runs) that saved test predictions."""
    workdir = pathlib.Path(workdir)
    return sorted((p.parent for p in workdir.rglob(PREDICTIONS)),
                  key=lambda d: (d.parent != workdir, d.parent.name, STAGE_ORDER.get(d.name, 9), d.name))


def load_run(run_dir: str | pathlib.Path) -> tuple[ml_collections.ConfigDict, dict]:
    """(the resolved config, run.json) of a training run folder."""
    run_dir = pathlib.Path(run_dir)
    config = ml_collections.ConfigDict(json.loads((run_dir / "config.json").read_text()))
    return config, json.loads((run_dir / "run.json").read_text())


def _with_ci(point: dict[str, float], ci: dict[str, tuple[float, float]], keys: Sequence[str]) -> dict:
    return {k: {"value": point[k], "ci95": list(ci[k])} for k in keys}


def model_report(preds: dict, *, n_boot: int = 1000, seed: int = 0, slide_method: str = "mean") -> dict:
    """Tile-level (and, with slides, slide-level) figures of one model, each with its 95% CI."""
    names = preds["class_names"]
    labels, probs = preds["labels"], preds["probs"]

    def block(y: np.ndarray, p: np.ndarray, groups: np.ndarray | None = None) -> dict:
        point = metrics.scores(y, p)
        ci = metrics.bootstrap_ci(y, p, n_boot=n_boot, seed=seed, groups=groups)
        per_class = {
            name: _with_ci(point, ci, [f"{m}/{c}" for m in ("precision", "recall", "f1", "auc")])
            for c, name in enumerate(names)
        }
        per_class = {name: {k.split("/")[0]: v for k, v in figs.items()} for name, figs in per_class.items()}
        cm = metrics.confusion_matrix(y, p.argmax(-1), len(names))
        for c, name in enumerate(names):
            per_class[name]["support"] = int(cm[c].sum())
        return {"n": int(len(y)), **_with_ci(point, ci, metrics.SUMMARY_KEYS), "per_class": per_class,
                "confusion_matrix": cm.tolist()}

    # tile intervals resample whole slides when the tiles come from slides (tiles of a slide are correlated)
    out = {"class_names": names, "tiles": block(labels, probs, preds.get("slides")),
           "ci_resampling": "slides" if preds.get("slides") is not None else "tiles",
           "scored": scored_counts(preds)}
    if preds.get("slides") is not None:
        ids, slide_labels, slide_probs = metrics.aggregate_slides(preds["slides"], labels, probs, method=slide_method)
        out["slides"] = {"aggregation": slide_method, **block(slide_labels, slide_probs),
                         "predictions": {s: {"label": names[int(y)], "predicted": names[int(p.argmax())],
                                             "probs": [round(float(v), 4) for v in p]}
                                         for s, y, p in zip(ids, slide_labels, slide_probs)}}
    return out


def scored_counts(preds: dict) -> dict:
    """How much of the test split the figures cover: tiles and slides scored, and what was dropped (unreadable)."""
    slides = preds.get("slides")
    return {"tiles": int(len(preds["labels"])), "slides": None if slides is None else int(len(np.unique(slides))),
            "dropped": [{"name": name, "reason": reason} for name, reason in preds.get("dropped", [])]}


def build_report(workdir: str | pathlib.Path, *, n_boot: int = 1000, seed: int = 0,
                 slide_method: str = "mean") -> dict:
    """Reports of every model in ``workdir``, keyed by its folder relative to the workdir, plus the
    agreement of each student with the teacher of its run (same test tiles, same order)."""
    workdir = pathlib.Path(workdir)
    models = find_models(workdir)
    if not models:
        raise FileNotFoundError(f"no finished model under {workdir} (no {PREDICTIONS}); train one first")
    out = {}
    for stage_dir in models:
        preds = load_predictions(stage_dir)
        name = stage_dir.relative_to(workdir).as_posix()
        entry = model_report(preds, n_boot=n_boot, seed=seed, slide_method=slide_method)
        result_file = stage_dir / "result.json"
        if result_file.exists():
            row = json.loads(result_file.read_text())
            entry.update({k: row[k] for k in ("role", "input_px", "downsample", "gflops_per_image") if k in row})
            entry.update({k: row[k] for k in ("images_per_s", "magnification", "mpp") if k in row})
        if (stage_dir / PYRAMID_PREDICTIONS).exists():
            pyramid = load_predictions(stage_dir, filename=PYRAMID_PREDICTIONS)
            entry["pyramid_reads"] = model_report(pyramid, n_boot=n_boot, seed=seed, slide_method=slide_method)["tiles"]
        teacher = _teacher_of(stage_dir, workdir=workdir)
        if teacher is not None and teacher != stage_dir:
            t = load_predictions(teacher)
            if np.array_equal(t["labels"], preds["labels"]) and (t["slides"] is None) == (preds["slides"] is None):
                entry["agreement_with_teacher"] = metrics.agreement(t["probs"], preds["probs"])
        out[name] = entry
    return out


def _teacher_of(stage_dir: pathlib.Path, *, workdir: pathlib.Path) -> pathlib.Path | None:
    """The teacher a student was distilled from: a sibling ``teacher`` folder, else the workdir's."""
    for candidate in (stage_dir.parent / "teacher", workdir / "teacher"):
        if (candidate / PREDICTIONS).exists():
            return candidate
    return None


def _fmt(fig: dict) -> str:
    v, (lo, hi) = fig["value"], fig["ci95"]
    return "n/a" if not np.isfinite(v) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown(report: dict) -> str:
    """The report as Markdown tables: one summary row per model, then slide level, then per class."""
    resampled = {m.get("ci_resampling", "tiles") for m in report.values()}
    lines = ["# Evaluation report", "", f"Test split; 95% bootstrap intervals in brackets (resampling "
             f"{' / '.join(sorted(resampled))}).", "",
             "| model | input px | GFLOPs | tiles | accuracy | accuracy, pyramid reads | balanced acc. | macro-F1 | "
             "macro AUC | top-1 agreement / KL to teacher |",
             "|---|---:|---:|---:|---|---|---|---|---|---|"]
    for name, m in report.items():
        t, agree = m["tiles"], m.get("agreement_with_teacher")
        agree_s = f"{agree['top1_agreement']:.3f} / {agree['mean_kl']:.3f}" if agree else ""
        pyramid = _fmt(m["pyramid_reads"]["accuracy"]) if "pyramid_reads" in m else ""
        lines.append(f"| {name} | {m.get('input_px', '')} | {m.get('gflops_per_image', float('nan')):.4f} | {t['n']} | "
                     f"{_fmt(t['accuracy'])} | {pyramid} | {_fmt(t['balanced_accuracy'])} | {_fmt(t['macro_f1'])} | "
                     f"{_fmt(t['macro_auc'])} | {agree_s} |")
    if any("pyramid_reads" in m for m in report.values()):
        lines += ["", "Students are trained and scored (accuracy) on the block mean of the teacher's view; "
                  "*pyramid reads* scores them on the same tiles read from each slide's own pyramid level at the "
                  "student's µm/px, as `launch/predict.py` reads them."]
    slide_models = {k: v for k, v in report.items() if "slides" in v}
    if slide_models:
        lines += ["", "## Slide level", "",
                  "| model | aggregation | slides | accuracy | balanced acc. | macro-F1 | macro AUC |",
                  "|---|---|---:|---|---|---|---|"]
        for name, m in slide_models.items():
            s = m["slides"]
            lines.append(f"| {name} | {s['aggregation']} | {s['n']} | {_fmt(s['accuracy'])} | "
                         f"{_fmt(s['balanced_accuracy'])} | {_fmt(s['macro_f1'])} | {_fmt(s['macro_auc'])} |")
    lines += _dropped_lines(report)
    for name, m in report.items():
        lines += ["", f"## {name}: per class (tiles)", "", "| class | support | precision | recall | F1 | AUC |",
                  "|---|---:|---|---|---|---|"]
        for cls, f in m["tiles"]["per_class"].items():
            lines.append(f"| {cls} | {f['support']} | {_fmt(f['precision'])} | {_fmt(f['recall'])} | "
                         f"{_fmt(f['f1'])} | {_fmt(f['auc'])} |")
    return "\n".join(lines) + "\n"


def _dropped_lines(report: dict) -> list[str]:
    """Per model: tiles and slides scored, and what was dropped from the test split because it failed to read."""
    if not any(m.get("scored", {}).get("dropped") for m in report.values()):
        return []
    lines = ["", "## Scored and dropped", "", "Slides (or tiles) that failed to read during the test evaluation "
             "were left out whole; the figures above cover the rest.", "",
             "| model | tiles scored | slides scored | dropped | reasons |", "|---|---:|---:|---:|---|"]
    for name, m in report.items():
        s = m.get("scored", {})
        dropped = s.get("dropped", [])
        reasons = "; ".join(f"{d['name']}: {d['reason']}" for d in dropped).replace("|", "/")
        slides = "" if s.get("slides") is None else s["slides"]
        lines.append(f"| {name} | {s.get('tiles', m['tiles']['n'])} | {slides} | {len(dropped)} | {reasons} |")
    return lines


def _jsonable(value):
    """nan (an undefined figure) becomes null: strict JSON readers reject NaN."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def plot_name(model: str) -> str:
    return model.replace("/", "__")


def write_report(workdir: str | pathlib.Path, *, n_boot: int = 1000, seed: int = 0,
                 slide_method: str = "mean") -> dict:
    """``report.json``, ``report.md``, per-model ROC and confusion-matrix PNGs (``plots/``) and
    ``plots/accuracy_vs_gflops.png`` in ``workdir``; returns the report."""
    from histokd_jax import plots  # matplotlib only when figures are drawn

    workdir = pathlib.Path(workdir)
    report = build_report(workdir, n_boot=n_boot, seed=seed, slide_method=slide_method)
    atomic.write_json(workdir / "report.json", _jsonable(report), indent=1)
    atomic.write_text(workdir / "report.md", markdown(report))
    out = workdir / "plots"
    out.mkdir(exist_ok=True)
    points = []
    for name, m in report.items():
        preds = load_predictions(workdir / name)
        plots.roc_plot(out / f"roc_{plot_name(name)}.png", labels=preds["labels"], probs=preds["probs"],
                       class_names=m["class_names"], title=f"{name}: ROC (test tiles)")
        plots.confusion_plot(out / f"confusion_{plot_name(name)}.png", cm=np.asarray(m["tiles"]["confusion_matrix"]),
                             class_names=m["class_names"], title=f"{name} (test tiles)")
        if "gflops_per_image" in m:
            role = m.get("role", name.rsplit("/", 1)[-1])
            points.append({"name": name, "group": role if "/" in name else name, "gflops": m["gflops_per_image"],
                           "accuracy": m["tiles"]["accuracy"]["value"], "ci95": m["tiles"]["accuracy"]["ci95"]})
    if points:
        plots.accuracy_vs_gflops(out / "accuracy_vs_gflops.png", points, title=f"{workdir.name}: accuracy vs cost")
    return report
