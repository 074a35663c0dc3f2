"""Run WSInfer's command line (``python tests/wsinfer_cli.py run ...``) on the CPU torch these machines hold.

WSInfer imports only torchvision's pure-Python transforms, but importing torchvision registers fake kernels
for its C++ operators ``nms`` and ``qnms``, and the torchvision wheel on PyPI cannot load those operators
against the local CPU torch, so the import fails. Where they do not load, declaring the two operators'
schemas first lets it import; nothing here runs them. WSInfer itself is unchanged.
"""

import importlib.util
import pathlib
import sys

import torch


def torchvision_operators_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    for folder in spec.submodule_search_locations if spec else ():
        for library in pathlib.Path(folder).glob("_C*.so"):
            try:
                torch.ops.load_library(str(library))
                return True
            except (OSError, RuntimeError):
                return False
    return False


_STAND_INS: list = []  # the operator library must outlive the import


def make_torchvision_importable() -> None:
    """Declare torchvision's two C++ operators where its own library does not load (idempotent)."""
    if _STAND_INS or torchvision_operators_load():
        return
    stand_in = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        stand_in.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _STAND_INS.append(stand_in)


if __name__ == "__main__":
    make_torchvision_importable()
    from wsinfer.cli.cli import cli

    sys.exit(cli())
