"""What every launcher sets up: quiet logs, a persistent compilation cache, and polite stops on signals."""

from __future__ import annotations

import os
import pathlib
import signal


def prepare_runtime() -> None:
    """Quiet orbax/jax INFO logs; reuse compiled programs across runs (a rerun after a preemption
    does not recompile for minutes)."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and jax log every checkpoint at INFO
    import jax

    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path.home() / ".cache/histokd_jax/xla"))
    jax.config.update("jax_compilation_cache_dir", cache)


class StopOnSignal:
    """Ctrl-C or SIGTERM (a preemption) -> finish the current step, save a checkpoint, exit.

    Pass it as ``should_stop``. A second Ctrl-C interrupts at once (losing the steps
    since the last checkpoint).
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
