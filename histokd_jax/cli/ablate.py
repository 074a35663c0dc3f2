"""Ablations of the distilled student on the multi-scale benchmark, from the teachers of a reproduction
(trained here first when the workdir has none).

    python launch/reproduce.py --workdir=/tmp/histokd-reproduce
    python launch/ablate.py --workdir=/tmp/histokd-reproduce

At 2.5x (``--factor=4``), per seed, each against the configs' default: KL alone, KL + feature loss (max-pool /
bicubic / both), + cross-entropy on the labelled tiles, temperature 2 and 4, ``views_per_crop`` 1 and 4, the
target cache, the bf16 teacher (``histokd_jax.ablations.VARIANTS``).
Writes ``ablations/ablations.md`` (accuracy per seed, mean, change against the default objective, wall
time). Rerunning resumes.

Installed, the same command is ``histokd ablate`` with the same flags
(``--config=demo`` names a config shipped in the package).
"""

from __future__ import annotations

import pathlib

from absl import app, flags

from histokd_jax import config_checks, configs, seeded_runs

_FLAGS = seeded_runs.define_flags(
    default_config=pathlib.Path(configs.__file__).parent / "benchmark.py",
    workdir_help="Directory of the reproduction (its teachers are reused; missing ones are trained).",
    seeds_help="Seeds whose teachers the variants distil from.")
_FACTOR = flags.DEFINE_integer("factor", 4, "Downsample factor of the ablated student (4: 10x -> 2.5x).")


def main(argv: list[str]) -> None:
    del argv
    from histokd_jax import ablations

    seeded_runs.run(ablations.run_ablations, _FLAGS, factor=_FACTOR.value)


def run(argv: list[str] | None = None) -> None:
    """The command's entry point (`histokd ablate`, `launch/ablate.py`)."""
    app.run(main, argv=argv, flags_parser=config_checks.parse_flags)
