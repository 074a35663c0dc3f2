"""`histokd ablate` from a checkout without installing:
ablations of the distilled student on the benchmark.

    python launch/ablate.py --help
See histokd_jax/cli/ablate.py for the flags and examples.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the checkout's histokd_jax and configs/

from histokd_jax import cli  # noqa: E402

if __name__ == "__main__":
    cli.run_command("ablate", sys.argv[1:], prog=sys.argv[0])
