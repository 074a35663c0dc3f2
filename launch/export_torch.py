"""`histokd export-torch` from a checkout without installing:
a trained model as the authors' PyTorch state dict.

    python launch/export_torch.py --help
See histokd_jax/cli/export_torch.py for the flags and examples.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the checkout's histokd_jax and configs/

from histokd_jax import cli  # noqa: E402

if __name__ == "__main__":
    cli.run_command("export-torch", sys.argv[1:], prog=sys.argv[0])
