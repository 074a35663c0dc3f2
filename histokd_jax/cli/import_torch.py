"""Import a teacher trained with the authors' PyTorch ResNet-GroupNorm as a finished teacher folder.

    python launch/import_torch.py --checkpoint=teacher.pt --config=configs/cd.py \
        --config.model.padding=symmetric --config.model.norm_epsilon=1e-5 --out=/tmp/cd-torch/teacher
    python launch/train.py --config=configs/cd.py --config.data.root=/data/cd \
        --config.model.padding=symmetric --config.model.norm_epsilon=1e-5 \
        --config.teacher.checkpoint=/tmp/cd-torch/teacher --workdir=/tmp/cd-kd

The two model settings make the Flax model compute what the PyTorch one does (both for the
teacher and the students trained beside it); the import refuses a config without them.

The file is read with ``torch.load(weights_only=True)`` (never runs code from it); its state
dict (``model_state_dict``, ``state_dict``, bare, or ``--key``) must fill the configured model
exactly. The class count comes from ``fc.weight``. See ``histokd_jax/torch_interop.py``.

Installed, the same command is ``histokd import-torch`` with the same flags
(``--config=demo`` names a config shipped in the package).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from histokd_jax import runtime, torch_interop

_CONFIG = config_flags.DEFINE_config_file("config", None, "The config the teacher will be used with.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A PyTorch .pt file of the authors' ResNet-GN.")
_OUT = flags.DEFINE_string("out", None, "The teacher folder to write (must not exist or be empty).")
_KEY = flags.DEFINE_string("key", None, "Entry of the .pt holding the state dict (default: model_state_dict, "
                           "state_dict, or the bare file), e.g. teacher_model_state_dict.")
flags.mark_flags_as_required(["config", "checkpoint", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.prepare_runtime()
    try:
        folder = torch_interop.import_teacher(_CHECKPOINT.value, config=_CONFIG.value, out=_OUT.value, key=_KEY.value)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        sys.exit(f"error: {err}")
    same = " ".join(f"--config.model.{k}={v}" for k, v in torch_interop.TORCH_MODEL.items())
    print(f"teacher written to {folder}; distil from it with the same --config, {same} and "
          f"--config.teacher.checkpoint={folder}")


def run(argv: list[str] | None = None) -> None:
    """The command's entry point (`histokd import-torch`, `launch/import_torch.py`)."""
    app.run(main, argv=argv)
