"""Run a trained model over whole slides: per-tile probabilities, QuPath GeoJSON, heatmap, summary.

    python launch/predict.py --checkpoint=/tmp/histokd-demo --out=/tmp/preds SLIDE.svs [MANIFEST.csv ...]
    python launch/predict.py --checkpoint=/tmp/histokd-demo --model=teacher --out=/tmp/preds_teacher SLIDE.svs

``--checkpoint`` is a training workdir (or a stage folder in it); ``--model`` picks
the distilled student (default), the teacher or the label-only baseline. Slides
whose outputs are complete in ``--out`` are not recomputed.

A student-then-teacher cascade: the student reads every tile, the run's teacher re-reads those it is
unsure of (confidence under the threshold, and/or the least confident share of each slide):

    python launch/predict.py --checkpoint=W --cascade --cascade_threshold=0.5 --out=/tmp/preds SLIDE.svs
    python launch/predict.py --checkpoint=W --cascade --cascade_budget=0.2 --out=/tmp/preds SLIDE.svs

Installed, the same command is ``histokd predict`` with the same flags.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

from histokd_jax import atomic, cascade, inference

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or a stage folder in it.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_MODEL = flags.DEFINE_enum("model", "student", sorted(inference.MODEL_STAGES), "Which model of the run to apply.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Tiles per device batch (rounded up to the device count).")
_MPP = flags.DEFINE_float("mpp", None, "Level-0 µm/px for every slide (overrides the slides' own metadata).")
_TEACHER_MPP = flags.DEFINE_float("teacher_mpp", None, "Teacher µm/px, for runs trained on tiles of unstated "
                                  "resolution (slide runs know it).")
_MIN_TISSUE = flags.DEFINE_float("min_tissue", 0.5, "Minimum tissue fraction of a tile.")
_HEATMAP_MPP = flags.DEFINE_float("heatmap_mpp", None, "µm/px of the heatmap (default: ~1024 px across the slide, "
                                   "or the tissue mask's thumbnail where that is at most 2x finer).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Recompute slides whose outputs already exist.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar per slide.")
_CASCADE = flags.DEFINE_bool("cascade", False, "Send the tiles --model is unsure of to the run's teacher.")
_SCORE = flags.DEFINE_enum("cascade_score", "margin", cascade.SCORES, "The student's confidence: top-two "
                           "probability margin, or 1 - normalised entropy (both 0-1).")
_THRESHOLD = flags.DEFINE_float("cascade_threshold", None, "Tiles of confidence below this go to the teacher.")
_BUDGET = flags.DEFINE_float("cascade_budget", None, "At most this share of each slide's tiles (the least "
                             "confident) goes to the teacher.")


def make_cascade(teacher_mpp: float | None) -> inference.Cascade | None:
    """The --cascade flags as a Cascade (None without --cascade); ValueError for a bad combination."""
    if not _CASCADE.value:
        if _THRESHOLD.value is not None or _BUDGET.value is not None:
            raise ValueError("--cascade_threshold and --cascade_budget need --cascade")
        return None
    if _MODEL.value == "teacher":
        raise ValueError("--cascade runs a student (--model=student or baseline) before the teacher")
    rule = cascade.Rule(score=_SCORE.value, threshold=_THRESHOLD.value, budget=_BUDGET.value)
    teacher = inference.load_predictor(_CHECKPOINT.value, model="teacher", batch_size=_BATCH.value,
                                       teacher_mpp=teacher_mpp)
    return inference.Cascade(teacher=teacher, rule=rule)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("error: give at least one slide file or manifest CSV after the flags")
    try:
        entries = inference.slide_entries(argv[1:])
        predictor = inference.load_predictor(_CHECKPOINT.value, model=_MODEL.value, batch_size=_BATCH.value,
                                             teacher_mpp=_TEACHER_MPP.value)
        chain = make_cascade(_TEACHER_MPP.value)
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    if _MPP.value is not None:
        entries = [(path, _MPP.value, label) for path, _, label in entries]
    print(f"{predictor.role}: {predictor.input_px} px tiles at {predictor.input_mpp:.3g} µm/px "
          f"({predictor.tile_um:.0f} µm), {len(entries)} slide(s) -> {_OUT.value}", flush=True)
    if chain:
        print(f"cascade: teacher at {chain.teacher.input_mpp:.3g} µm/px where {chain.rule.describe()}", flush=True)
    summaries, skipped = inference.predict_slides(
        entries, predictor=predictor, out_dir=_OUT.value, overwrite=_OVERWRITE.value, min_tissue=_MIN_TISSUE.value,
        heatmap_mpp=_HEATMAP_MPP.value, cascade=chain, show_progress=_PROGRESS.value)
    for s in summaries:
        truth = f" (label {s['label']})" if s.get("label") else ""
        print(f"{s['slide']} -> {s['name']}.*: {s['predicted']}{truth}, {s['tiles']} tiles from level {s['level']} "
              f"in {s['seconds']:.1f} s ({s['tiles_per_s']:.0f} tiles/s)"
              + (f"; teacher decided {s['cascade']['to_teacher']}" if "cascade" in s else ""))
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    atomic.write_json(Path(_OUT.value) / "summary.json", summaries, indent=1)
    if not summaries:
        sys.exit("error: no slide could be processed")


def run(argv: list[str] | None = None) -> None:
    """The command's entry point (`histokd predict`, `launch/predict.py`)."""
    app.run(main, argv=argv)
