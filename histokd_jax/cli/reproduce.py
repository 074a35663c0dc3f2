"""The paper's experiments on the multi-scale benchmark, in one command (50 minutes measured on
2 CPU cores; README).

    python launch/reproduce.py --workdir=/tmp/histokd-reproduce

Per seed (``--seeds``, default 0 and 1): one teacher at 10x, then at 5x, 2.5x and 1.25x the distilled
student, the label-only baseline and the true-label control, and at 2.5x the distilled student with
0 / 25 / 50 / 100% of the unlabelled pool. Writes ``reproduce.md`` (both seeds, and each of the
paper's claims with its measured margin) and ``plots/``. Rerunning resumes. ``--config`` (default
configs/benchmark.py) and ``--config.key=value`` change the experiment, as for launch/train.py.

Installed, the same command is ``histokd reproduce`` with the same flags
(``--config=demo`` names a config shipped in the package).
"""

from __future__ import annotations

import pathlib

from absl import app

from histokd_jax import config_checks, configs, seeded_runs

_FLAGS = seeded_runs.define_flags(
    default_config=pathlib.Path(configs.__file__).parent / "benchmark.py",
    workdir_help="Directory of the reproduction (one sweep per seed).",
    seeds_help="Seeds: each draws new slides and a new initialisation.")


def main(argv: list[str]) -> None:
    del argv
    from histokd_jax import reproduce

    seeded_runs.run(reproduce.run_reproduction, _FLAGS)


def run(argv: list[str] | None = None) -> None:
    """The command's entry point (`histokd reproduce`, `launch/reproduce.py`)."""
    app.run(main, argv=argv, flags_parser=config_checks.parse_flags)
