"""The command line that launch/reproduce.py and launch/ablate.py share: a config (default
configs/benchmark.py), a workdir, seeds and bootstrap resamples, then one job over those seeds."""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Callable

from absl import flags
from ml_collections import config_flags

from histokd_jax import runtime


@dataclasses.dataclass(frozen=True)
class SeededFlags:
    config: flags.FlagHolder
    workdir: flags.FlagHolder
    seeds: flags.FlagHolder
    bootstrap: flags.FlagHolder


def define_flags(*, default_config: pathlib.Path, workdir_help: str, seeds_help: str) -> SeededFlags:
    held = SeededFlags(
        config=config_flags.DEFINE_config_file("config", str(default_config),
                                               f"Path to a config file (default: {default_config.parent.name}/"
                                               f"{default_config.name})."),
        workdir=flags.DEFINE_string("workdir", None, workdir_help),
        seeds=flags.DEFINE_list("seeds", ["0", "1"], seeds_help),
        bootstrap=flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for the accuracy intervals."))
    flags.mark_flags_as_required(["workdir"])
    return held


def run(job: Callable[..., str | None], held: SeededFlags, **options) -> None:
    """``job(config, workdir, seeds=..., should_stop=..., config_name=..., n_boot=..., **options)``; prints
    its table, or exits with the error (bad seeds, a missing or unfinished stage, changed settings)."""
    try:
        seeds = [int(s) for s in held.seeds.value]
    except ValueError:
        sys.exit(f"error: --seeds must be integers, got {','.join(held.seeds.value)}")
    runtime.prepare_runtime()
    try:
        text = job(held.config.value, held.workdir.value, seeds=seeds, should_stop=runtime.StopOnSignal(),
                   config_name=flags.FLAGS["config"].config_filename, n_boot=held.bootstrap.value, **options)
    except (FileNotFoundError, ValueError) as err:  # sweep.UnfinishedStage is a FileNotFoundError
        sys.exit(f"error: {err}")
    if text is None:
        sys.exit("stopped before the end; run the same command again to resume")
    print(text)
