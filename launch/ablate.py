"""Ablations of the distilled student on the multi-scale benchmark, from the teachers of a reproduction.

    python launch/reproduce.py --workdir=/tmp/histokd-reproduce
    python launch/ablate.py --workdir=/tmp/histokd-reproduce

At 2.5x (``--factor=4``), per seed: KL alone, KL + feature loss (max-pool / bicubic / both), + cross-entropy
on the labelled tiles, temperature 2 and 4, ``views_per_crop`` 2 and 4, the target cache, the bf16 teacher.
Writes ``ablations/ablations.md`` (accuracy per seed, mean, change against the default objective, wall
time). Rerunning resumes.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so configs/ imports from any cwd

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from histokd_jax import config_checks, runtime  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "benchmark.py"),
                                          "Path to a config file (default: configs/benchmark.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The workdir of a finished launch/reproduce.py run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds whose teachers the variants distil from.")
_FACTOR = flags.DEFINE_integer("factor", 4, "Downsample factor of the ablated student (4: 10x -> 2.5x).")
_BOOT = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for the accuracy intervals.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    del argv
    runtime.prepare_runtime()
    from histokd_jax import ablations

    try:
        text = ablations.run_ablations(_CONFIG.value, _WORKDIR.value, seeds=[int(s) for s in _SEEDS.value],
                                       factor=_FACTOR.value, should_stop=runtime.StopOnSignal(),
                                       config_name=flags.FLAGS["config"].config_filename, n_boot=_BOOT.value)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    if text is None:
        sys.exit("stopped before the end; run the same command again to resume")
    print(text)


if __name__ == "__main__":
    app.run(main, flags_parser=config_checks.parse_flags)
