"""Every benchmark in one go (the figures in BENCHMARKS.md), one after the other.

    python benchmarks/run.py            # needs the bench extra: pip install -e ".[bench]"

Each script prints its own table; they run sequentially so none competes with
another for the CPU. Expect about an hour on a 2-core machine (deploy.py trains four runs first).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
SCRIPTS = (
    ("distillation step and inference vs PyTorch", ["step_vs_torch.py"]),
    ("the teacher's share: cheaper targets, step speed", ["teacher_share.py"]),
    ("input pipeline vs step", ["pipeline.py"]),
    ("slide tile source", ["slide_source.py"]),
    ("whole-slide inference", ["wholeslide.py"]),
    ("deployment: pyramid reads, scanner-like views, the cascade", ["deploy.py"]),
    ("WSInfer against predict.py on the CMU fixture", ["wsinfer_agreement.py", "--workdir=/tmp/histokd-wsinfer"]),
)


def main() -> None:
    failed = []
    for title, argv in SCRIPTS:
        print(f"\n=== {title}: python benchmarks/{' '.join(argv)}", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:]], cwd=HERE.parent)
        print(f"--- {time.perf_counter() - start:.0f} s", flush=True)
        if done.returncode:
            failed.append(title)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
