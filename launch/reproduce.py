"""The paper's experiments on the multi-scale benchmark, in one command (<= 90 minutes on 2 CPU cores).

    python launch/reproduce.py --workdir=/tmp/histokd-reproduce

Per seed (``--seeds``, default 0 and 1): one teacher at 10x, then at 5x, 2.5x and 1.25x the distilled
student, the label-only baseline and the true-label control, and at 2.5x the distilled student with
0 / 25 / 50 / 100% of the unlabelled pool. Writes ``reproduce.md`` (both seeds, and each of the
paper's claims with its measured margin) and ``plots/``. Rerunning resumes. ``--config`` (default
configs/benchmark.py) and ``--config.key=value`` change the experiment, as for launch/train.py.
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
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the reproduction (one sweep per seed).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds: each draws new slides and a new initialisation.")
_BOOT = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for the accuracy intervals.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    del argv
    runtime.prepare_runtime()
    from histokd_jax import reproduce, sweep

    try:
        seeds = [int(s) for s in _SEEDS.value]
    except ValueError:
        sys.exit(f"error: --seeds must be integers, got {','.join(_SEEDS.value)}")
    try:
        text = reproduce.run_reproduction(_CONFIG.value, _WORKDIR.value, seeds=seeds,
                                          should_stop=runtime.StopOnSignal(),
                                          config_name=flags.FLAGS["config"].config_filename, n_boot=_BOOT.value)
    except sweep.UnfinishedStage as err:
        sys.exit(f"error: {err}")
    if text is None:
        sys.exit("stopped before the end; run the same command again to resume")
    print(text)


if __name__ == "__main__":
    app.run(main, flags_parser=config_checks.parse_flags)
