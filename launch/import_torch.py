"""`histokd import-torch` from a checkout without installing:
a teacher trained with the authors' PyTorch code, as a teacher folder.

    python launch/import_torch.py --help
See histokd_jax/cli/import_torch.py for the flags and examples.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the checkout's histokd_jax and configs/

from histokd_jax import cli  # noqa: E402

if __name__ == "__main__":
    cli.run_command("import-torch", sys.argv[1:], prog=sys.argv[0])
