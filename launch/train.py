"""Train teacher, distilled student and label-only baseline as the config says.

    python launch/train.py --config=configs/demo.py --workdir=/tmp/histokd-demo
    python launch/train.py --config=configs/cd.py --workdir=/tmp/cd --config.data.root=/data/cd

Any config field can be overridden with ``--config.a.b=value``. Rerunning the same
command resumes from the latest checkpoint; finished stages are not redone.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # so configs/ imports from any cwd

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/demo.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


class _StopOnSignal:
    """Ctrl-C or SIGTERM (a preemption) -> finish the current step, save a checkpoint, exit.

    A second Ctrl-C interrupts at once (losing the steps since the last checkpoint).
    """

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to abort)", flush=True)

    def __call__(self, role: str, step: int) -> bool:
        return self.requested


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and jax log every checkpoint at INFO
    import jax

    # Reruns (e.g. after a preemption) reuse compiled programs instead of recompiling for minutes.
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path.home() / ".cache/histokd_jax/xla"))
    jax.config.update("jax_compilation_cache_dir", cache)
    from histokd_jax import trainer

    stop = _StopOnSignal()
    rows = trainer.train_and_evaluate(
        _CONFIG.value, _WORKDIR.value, should_stop=stop, config_name=flags.FLAGS["config"].config_filename
    )
    if rows is None:
        sys.exit("stopped before the end; run the same command again to resume")
    print(f"results: {pathlib.Path(_WORKDIR.value) / 'results.json'}")


if __name__ == "__main__":
    app.run(main)
