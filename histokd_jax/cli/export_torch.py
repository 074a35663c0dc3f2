"""Export a trained model of a workdir to the authors' PyTorch ResNet-GroupNorm layout.

    python launch/export_torch.py --workdir=/tmp/histokd-demo --model=student --out=/tmp/student.pt

Writes ``{"model_state_dict": ...}`` (keys ``conv_1.weight`` ... ``fc.bias``) that the authors'
``ResNet(planes=widths, layers=blocks_per_stage, num_classes=...)`` loads with ``strict=True``.
It computes exactly what the Flax model did when the run used ``model.padding=symmetric`` and
``model.norm_epsilon=1e-5``; otherwise its outputs differ slightly (a warning says so).

Installed, the same command is ``histokd export-torch`` with the same flags.
"""

from __future__ import annotations

import sys

from absl import app, flags

from histokd_jax import runtime, torch_interop

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (it holds config.json and run.json).")
_MODEL = flags.DEFINE_enum("model", "student", ["student", "teacher", "baseline"], "Which finished model.")
_OUT = flags.DEFINE_string("out", None, "The .pt file to write.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.prepare_runtime()
    try:
        path, differ = torch_interop.export_run_model(_WORKDIR.value, model=_MODEL.value, out=_OUT.value)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    if differ:
        print(f"warning: this run used {', '.join(differ)}: the PyTorch model's outputs will differ slightly")
    print(f"wrote {path} (state dict under 'model_state_dict')")


def run(argv: list[str] | None = None) -> None:
    """The command's entry point (`histokd export-torch`, `launch/export_torch.py`)."""
    app.run(main, argv=argv)
