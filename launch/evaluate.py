"""`histokd evaluate` from a checkout without installing:
the report of a finished workdir, recomputed from its checkpoints.

    python launch/evaluate.py --help
See histokd_jax/cli/evaluate.py for the flags and examples.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the checkout's histokd_jax and configs/

from histokd_jax import cli  # noqa: E402

if __name__ == "__main__":
    cli.run_command("evaluate", sys.argv[1:], prog=sys.argv[0])
