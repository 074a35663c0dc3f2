"""Export a trained model of a workdir for WSInfer (TorchScript + config.json) and, optionally, as ONNX.

    python launch/export_wsinfer.py --workdir=/tmp/histokd-demo --model=student --out=/tmp/student-wsinfer
    histokd export --workdir=/tmp/histokd-demo --model=student --out=/tmp/student-wsinfer --onnx
    wsinfer run -i SLIDES/ -o OUT/ -c /tmp/student-wsinfer/config.json -p /tmp/student-wsinfer/model.pt

``model.pt`` takes NCHW float tiles as WSInfer's transforms make them (``ToTensor`` then ``Normalize``, both
written in ``config.json`` with the model's tile size and µm/px) and returns logits. Each export is checked
against the Flax model on random tiles before it is kept. Needs the ``export`` extra (torch, onnx).
"""

from __future__ import annotations

import sys

from absl import app, flags

from histokd_jax import runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (or a stage folder in it).", required=True)
_MODEL = flags.DEFINE_enum("model", "student", ["student", "teacher", "baseline"], "Which finished model.")
_OUT = flags.DEFINE_string("out", None, "Folder to write model.pt, config.json (and model.onnx) into.",
                           required=True)
_TEACHER_MPP = flags.DEFINE_float("teacher_mpp", None, "The teacher tiles' µm/px, for runs on tile folders "
                                  "(slide runs know it).")
_ONNX = flags.DEFINE_bool("onnx", False, "Also write model.onnx (checked with onnxruntime).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.prepare_runtime()
    from histokd_jax import export

    try:
        done = export.export_run(_WORKDIR.value, model=_MODEL.value, out=_OUT.value,
                                 teacher_mpp=_TEACHER_MPP.value, onnx=_ONNX.value)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        sys.exit(f"error: {err}")
    except ModuleNotFoundError as err:  # torch / onnx are an optional extra
        sys.exit(f"error: {err}; histokd export needs the export extra: pip install \"histokd_jax[export]\"")
    config = done["config"]
    print(f"{_MODEL.value} of {done['source']}: {config['patch_size_pixels']} px tiles at "
          f"{config['spacing_um_px']:g} µm/px, classes {config['class_names']}")
    for path in done["files"]:
        print(f"wrote {path}")
    for kind, error in done["max_logit_difference"].items():
        print(f"{kind}: largest logit difference from the Flax model {error:.2g}")


def run(argv: list[str] | None = None) -> None:
    """The command's entry point (`histokd export`, `launch/export_wsinfer.py`)."""
    app.run(main, argv=argv)
