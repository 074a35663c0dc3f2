"""One call for everything a config names: every stage (``trainer.train_and_evaluate``), then what a
person looks at afterwards (``train.final_report``). Composed here, above the trainer, because the
report needs the sweep's table and whole-slide inference, which themselves build on the trainer."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import jax
import ml_collections

from histokd_jax import inference, report, sweep, trainer
from histokd_jax.messages import say


def train_and_report(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                     should_stop: Callable[[str, int], bool] | None = None,
                     config_name: str = "this config") -> list[dict] | None:
    """``trainer.train_and_evaluate``, then (``train.final_report``, on process 0) ``finish_run``;
    returns the results rows, or None when stopped part-way."""
    rows = trainer.train_and_evaluate(config, workdir, should_stop=should_stop, config_name=config_name)
    if rows is None or not config.train.final_report or jax.process_index() != 0:
        return rows
    workdir = pathlib.Path(workdir).absolute()
    if jax.process_count() > 1:  # the report measures speed and runs inference on this host's devices alone
        say(f"multi-process run: write the report on one host afterwards with "
            f"python launch/evaluate.py --workdir={workdir} (and launch/sweep.py / launch/predict.py)")
    else:
        finish_run(config, workdir)
    return rows


def _test_slides(workdir: pathlib.Path, *, limit: int) -> list[str]:
    """The first ``limit`` slides the distilled student was tested on (slide data only), in test order."""
    if not limit or not (workdir / "distill" / "result.json").exists():
        return []
    slides = report.load_predictions(workdir / "distill")["slides"]
    return [] if slides is None else list(dict.fromkeys(str(s) for s in slides))[:limit]


def finish_run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """What a person looks at after a run: the evaluation report (CIs, ROC and confusion plots), the
    resolution table with measured images/s, and heatmaps of the first ``train.heatmap_slides`` test slides."""
    say("writing the evaluation report and the resolution table")
    report.write_report(workdir, n_boot=config.train.bootstrap)
    sweep.write_table(workdir, n_boot=config.train.bootstrap, batch_size=config.sweep.measure_batch_size)
    print((workdir / "sweep.md").read_text().split("\n\n", 2)[-1], flush=True)
    test_slides = _test_slides(workdir, limit=config.train.heatmap_slides)
    if test_slides:
        predictor = inference.load_predictor(workdir, model="student")
        summaries, _ = inference.predict_slides([(pathlib.Path(p), None, None) for p in test_slides],
                                                predictor=predictor, out_dir=workdir / "predictions",
                                                min_tissue=config.data.min_tissue, show_progress=False)
        for s in summaries:
            say(f"student heatmap: {workdir / 'predictions' / s['name']}.heatmap.png "
                f"(predicted {s['predicted']}, {s['tiles']} tiles at {s['tiles_per_s']:.0f} tiles/s)")
    say(f"report: {workdir / 'report.md'}; table: {workdir / 'sweep.md'}; figures: {workdir / 'plots'}")
