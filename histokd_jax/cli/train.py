"""Train teacher, distilled student and label-only baseline as the config says.

    python launch/train.py --config=configs/demo.py --workdir=/tmp/histokd-demo
    python launch/train.py --config=configs/cd.py --workdir=/tmp/cd --config.data.root=/data/cd

Any config field can be overridden with ``--config.a.b=value``. Rerunning the same
command resumes from the latest checkpoint; finished stages are not redone.

Several hosts: run the same command on each, adding
``--coordinator_address=HOST0:1234 --num_processes=N --process_id=i`` (not needed
under SLURM, Open MPI or on a Cloud TPU slice, whose variables JAX reads).

Installed, the same command is ``histokd train`` with the same flags
(``--config=demo`` names a config shipped in the package).
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from histokd_jax import config_checks, runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/demo.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-host: the same command on every host, each with its --process_id (or none of the three where the cluster's
# variables say it: SLURM, Open MPI, Cloud TPU slices, JAX_COORDINATOR_ADDRESS).
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index, 0..num_processes-1.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.prepare_runtime()
    runtime.init_distributed(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                             process_id=_PROCESS_ID.value)
    from histokd_jax import experiment

    stop = runtime.StopOnSignal()
    rows = experiment.train_and_report(
        _CONFIG.value, _WORKDIR.value, should_stop=stop, config_name=flags.FLAGS["config"].config_filename
    )
    if rows is None:
        sys.exit("stopped before the end; run the same command again to resume")
    print(f"results: {pathlib.Path(_WORKDIR.value) / 'results.json'}")


def run(argv: list[str] | None = None) -> None:
    """The command's entry point (`histokd train`, `launch/train.py`)."""
    app.run(main, argv=argv, flags_parser=config_checks.parse_flags)  # an unknown --config.key: one line, not a traceback
