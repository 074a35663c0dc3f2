"""``launch/train.py`` that SIGKILLs itself after step K of one stage: the resume tests' crash, at a known place.

    HISTOKD_KILL_AT=distill:10 python tests/kill_at_step.py --config=... --workdir=W ...

Before the kill it waits until a checkpoint of that stage earlier than K is completely written (orbax
saves in the background), so the rerun has a checkpoint to resume from and redoes the steps after it.
SIGKILL leaves no chance to clean up: no final save, no flush, no atexit.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from absl import app, flags  # noqa: E402

from histokd_jax import checkpoint, config_checks, runtime  # noqa: E402
from histokd_jax.cli import train  # noqa: E402

ROLE, STEP = os.environ["HISTOKD_KILL_AT"].rsplit(":", 1)


def _saved_before(directory: pathlib.Path, step: int) -> bool:
    """A complete checkpoint before ``step`` and no save still being written."""
    if not directory.is_dir():
        return False
    entries = list(directory.iterdir())
    if any(".orbax-checkpoint-tmp" in p.name for p in entries):
        return False
    return any(p.name.isdigit() and int(p.name) < step and checkpoint.is_complete(p) for p in entries)


class KillAt(runtime.StopOnSignal):
    def __call__(self, role: str, step: int) -> bool:
        if role == ROLE and step == int(STEP):
            directory = pathlib.Path(flags.FLAGS.workdir).absolute() / role / "checkpoints"
            deadline = time.monotonic() + 120
            while not _saved_before(directory, step) and time.monotonic() < deadline:
                time.sleep(0.01)
            print(f"kill_at_step: SIGKILL at {role} step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(role, step)


runtime.StopOnSignal = KillAt

if __name__ == "__main__":
    app.run(train.main, flags_parser=config_checks.parse_flags)
