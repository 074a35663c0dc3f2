"""The resolution sweep: one teacher, then students and baselines at every factor of config.sweep.

    python launch/sweep.py --config=configs/demo.py --workdir=/tmp/histokd-sweep
    python launch/sweep.py --config=configs/cd.py --workdir=/tmp/cd-sweep --config.data.manifest=... \\
        --config.sweep.unlabeled_fractions="(0.0, 0.25, 1.0)"

Writes ``sweep.md`` / ``sweep.json`` (magnification, µm/px, accuracy with its 95% CI,
macro-F1, AUC, GFLOPs, FLOP ratio to the teacher, measured images/s) and
``plots/accuracy_vs_gflops.png``. Rerunning resumes: finished cells are not recomputed.

Installed, the same command is ``histokd sweep`` with the same flags
(``--config=demo`` names a config shipped in the package).
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from histokd_jax import config_checks, runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/demo.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the sweep (one sub-folder per cell).")
_BOOT = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for the accuracy intervals.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    runtime.prepare_runtime()
    from histokd_jax import sweep

    try:
        rows = sweep.run_sweep(_CONFIG.value, _WORKDIR.value, should_stop=runtime.StopOnSignal(),
                               config_name=flags.FLAGS["config"].config_filename, n_boot=_BOOT.value)
    except sweep.UnfinishedStage as err:  # one line that says what to do, not a traceback
        sys.exit(f"error: {err}")
    if rows is None:
        sys.exit("stopped before the end; run the same command again to resume")
    print((pathlib.Path(_WORKDIR.value) / "sweep.md").read_text())


def run(argv: list[str] | None = None) -> None:
    """The command's entry point (`histokd sweep`, `launch/sweep.py`)."""
    app.run(main, argv=argv, flags_parser=config_checks.parse_flags)  # an unknown --config.key: one line, not a traceback
