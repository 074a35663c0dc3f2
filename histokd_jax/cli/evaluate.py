"""Evaluation report of every model trained in a workdir (from their saved test predictions).

    python launch/evaluate.py --workdir=/tmp/histokd-demo

Writes ``report.json``, ``report.md`` and ``plots/`` (ROC curves and a confusion
matrix per model, accuracy vs GFLOPs for all of them) into the workdir.

Installed, the same command is ``histokd evaluate`` with the same flags.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

from histokd_jax import report

_WORKDIR = flags.DEFINE_string("workdir", None, "A training (or sweep) workdir.", required=True)
_BOOT = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for the 95% intervals.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the bootstrap resampling.")
_SLIDES = flags.DEFINE_enum("slide_aggregation", "mean", ["mean", "vote"],
                            "Tile-to-slide aggregation: mean probability or majority vote.")


def main(argv: list[str]) -> None:
    del argv
    try:
        report.write_report(_WORKDIR.value, n_boot=_BOOT.value, seed=_SEED.value, slide_method=_SLIDES.value)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    workdir = Path(_WORKDIR.value)
    print((workdir / "report.md").read_text().split("\n## ")[0])
    print(f"report: {workdir / 'report.md'}, {workdir / 'report.json'}; figures in {workdir / 'plots'}")


def run(argv: list[str] | None = None) -> None:
    """The command's entry point (`histokd evaluate`, `launch/evaluate.py`)."""
    app.run(main, argv=argv)
