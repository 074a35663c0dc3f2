"""Weights to and from the authors' PyTorch ResNet-GroupNorm.

The layout is that of ``model/resnet_with_groupnorm.py`` in the paper's public code
(github.com/jdipalma2/ResolutionDistillation: a torchvision ResNet with GroupNorm); it is
read for its key names only. A teacher checkpoint there is a dict with the state dict
under ``model_state_dict``; its distillation checkpoints hold ``student_model_state_dict``
and ``teacher_model_state_dict``. The keys, and this project's ``ResNetGN`` parameters:

=====================================  ==========================================
PyTorch key                            Flax parameter
=====================================  ==========================================
``conv_1.weight`` (O, I, 7, 7)         ``stem_conv/kernel`` (7, 7, I, O)
``norm_1.weight`` / ``.bias``          ``stem_norm/scale`` / ``bias``
``layer_{s}.{b}.conv_1.weight``        ``stage{s}_block{b}/conv1/kernel``
``layer_{s}.{b}.norm_1.weight|bias``   ``stage{s}_block{b}/norm1/scale|bias``
``layer_{s}.{b}.conv_2`` / ``norm_2``  ``conv2`` / ``norm2``
``layer_{s}.{b}.downsample.0.weight``  ``proj_conv/kernel`` (1x1, the projection)
``layer_{s}.{b}.downsample.1.*``       ``proj_norm/*``
``fc.weight`` (C, D) / ``fc.bias``     ``head/kernel`` (D, C) / ``head/bias``
=====================================  ==========================================

Stages and blocks count from 1 and 0 in both. What the keys cannot tell, and the
Flax model must be built to match (``TORCH_MODEL``, checked on import): that code pads
every convolution and the stem max-pool by ``k // 2`` on both sides
(``padding="symmetric"``) and PyTorch's GroupNorm adds 1e-5 to the variance (Flax's
default is 1e-6: a 4e-5 relative difference in the feature maps of a random network).
It also uses 32 GroupNorm groups everywhere: ``num_groups=32``, the default, gives the
same for widths that 32 divides; other group counts cannot be checked from the weights.

Every key must be used and every parameter filled: a partial load (the original
code's ``strict=False``) would leave a silently random teacher. ``torch`` is optional:
it is imported only by the functions that need it.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

STATE_DICT_KEYS = ("model_state_dict", "state_dict")  # tried in this order when no key is given
# ResNetGN fields (config: model.<name>) that make the Flax model compute what the PyTorch one does.
TORCH_MODEL = {"padding": "symmetric", "norm_epsilon": 1e-5}

_TOP = {"stem_conv": "conv_1", "stem_norm": "norm_1", "head": "fc"}
_IN_BLOCK = {"conv1": "conv_1", "norm1": "norm_1", "conv2": "conv_2", "norm2": "norm_2",
             "proj_conv": "downsample.0", "proj_norm": "downsample.1"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_BLOCK = re.compile(r"stage(\d+)_block(\d+)")


def torch_key(path: tuple[str, ...]) -> str:
    """The PyTorch key of a Flax parameter path, e.g. ``('stage2_block0', 'proj_conv', 'kernel')``
    -> ``'layer_2.0.downsample.0.weight'``."""
    match = _BLOCK.fullmatch(path[0]) if len(path) == 3 else None
    if len(path) == 2 and path[0] in _TOP and path[1] in _LEAF:
        return f"{_TOP[path[0]]}.{_LEAF[path[1]]}"
    if match and path[1] in _IN_BLOCK and path[2] in _LEAF:
        return f"layer_{match[1]}.{match[2]}.{_IN_BLOCK[path[1]]}.{_LEAF[path[2]]}"
    raise ValueError(f"{'/'.join(path)} is not a ResNetGN parameter")


_TOP_ORDER = {"conv_1": (0, 0), "norm_1": (0, 1), "fc": (2, 0)}


def _order(key: str) -> tuple:
    """Module order of the PyTorch model (stem, stages, head; weight before bias), for readable files."""
    *module, leaf = key.split(".")
    if module[0].startswith("layer_"):
        inner = tuple(_IN_BLOCK.values()).index(".".join(module[2:]))
        return (1, int(module[0][len("layer_"):]), int(module[1]), inner, leaf != "weight")
    return (*_TOP_ORDER[module[0]], 0, 0, leaf != "weight")


def to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """Flax conv kernels are HWIO and Dense kernels (in, out); PyTorch wants OIHW and (out, in)."""
    if path[-1] != "kernel":
        return value
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T


def from_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """The inverse of ``to_torch_layout``."""
    if path[-1] != "kernel":
        return value
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(to_torch_layout(path, np.empty(shape, np.bool_)).shape)


def _as_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any float dtype, any device) or array as float32 numpy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        value = value.numpy()
    return np.asarray(value, np.float32)


def params_from_torch(state_dict: Mapping[str, Any], *, model: Any) -> dict:
    """Flax parameters of ``model`` (a ``ResNetGN``) from an authors'-layout state dict.

    Strict: a missing key, an unused key or a shape that differs raises a ValueError
    naming each one, since a partial load would be a silently random network.
    """
    from histokd_jax.state import abstract_params

    differ = {name: getattr(model, name) for name, value in TORCH_MODEL.items() if getattr(model, name) != value}
    if differ:
        raise ValueError(
            f"the PyTorch ResNet-GN pads by k // 2 on both sides and uses GroupNorm eps 1e-5; build the model with "
            f"{', '.join(f'{k}={v!r}' for k, v in TORCH_MODEL.items())} (config: "
            f"{' '.join(f'--config.model.{k}={v}' for k, v in TORCH_MODEL.items())}), not "
            f"{', '.join(f'{k}={v!r}' for k, v in differ.items())}, or its outputs will differ from the PyTorch "
            "model's")
    wanted = traverse_util.flatten_dict(abstract_params(model, input_px=32))
    by_key = {torch_key(path): path for path in wanted}
    missing = sorted(set(by_key) - set(state_dict), key=_order)
    unused = sorted(set(state_dict) - set(by_key))
    arrays = {key: _as_numpy(state_dict[key]) for key in by_key if key in state_dict}
    shapes = [f"{key} {arrays[key].shape} (expected {_torch_shape(by_key[key], wanted[by_key[key]].shape)})"
              for key in sorted(arrays, key=_order)
              if arrays[key].shape != _torch_shape(by_key[key], wanted[by_key[key]].shape)]
    if missing or unused or shapes:
        problems = [f"{what}: {', '.join(keys)}" for what, keys in
                    (("missing keys", missing), ("unexpected keys", unused), ("wrong shapes", shapes)) if keys]
        raise ValueError(
            f"the state dict does not match ResNetGN(widths={tuple(model.widths)}, "
            f"blocks_per_stage={tuple(model.blocks_per_stage)}, num_classes={model.num_classes}): "
            + "; ".join(problems))
    flat = {path: jax.numpy.asarray(from_torch_layout(path, arrays[key])) for key, path in by_key.items()}
    return traverse_util.unflatten_dict(flat)


def torch_state_dict_from_params(params: Mapping[str, Any]) -> dict:
    """An authors'-layout state dict (float32 CPU tensors, module order) of Flax ``ResNetGN`` parameters.

    The PyTorch model must be built with the same widths, blocks and classes. It computes
    what a Flax model with ``TORCH_MODEL``'s settings computes; one trained with the defaults
    (SAME padding, eps 1e-6) gives slightly different outputs there.
    """
    import torch

    flat = traverse_util.flatten_dict(dict(params))
    out = {torch_key(path): torch.from_numpy(np.array(to_torch_layout(path, _as_numpy(value)), order="C"))
           for path, value in flat.items()}  # copies: torch wants writable, contiguous memory
    return {key: out[key] for key in sorted(out, key=_order)}


def export_torch(params: Mapping[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    """Save ``params`` as ``{"model_state_dict": ...}``, the layout the authors' code loads a teacher from."""
    import torch

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": torch_state_dict_from_params(params)}, path)
    return path


def _is_state_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_torch_state_dict(path: str | pathlib.Path, *, key: str | None = None) -> dict:
    """The model state dict in a ``.pt`` file: under ``key``, else ``model_state_dict`` or
    ``state_dict``, else the file's top level when it is a bare state dict.

    Loads with ``weights_only=True``: unpickling never runs code from the file, so a file
    holding pickled objects other than tensors and plain containers is refused.
    A ``module.`` prefix on every key (``nn.DataParallel``) is dropped.
    """
    import torch

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no PyTorch checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed| Please|\n|$)", str(err))
        reason = found[1] if found else "not a weights-only file"
        raise ValueError(
            f"refusing to load {path}: it holds pickled objects beyond tensors and plain containers, and loading "
            f"them would run code from the file ({reason}). Re-save just the weights: "
            "torch.save({'model_state_dict': model.state_dict()}, path)") from err
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            top = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"{path} has no {key!r}; its top level: {top}")
        obj = obj[key]
    elif isinstance(obj, Mapping) and not _is_state_dict(obj):
        found = [k for k in STATE_DICT_KEYS if k in obj]
        if not found:
            raise ValueError(
                f"{path} holds no model state dict under {' or '.join(STATE_DICT_KEYS)} and is not a bare one; its "
                f"top-level keys: {sorted(map(str, obj))}. Name one with key= (--key), e.g. 'teacher_model_state_dict'")
        obj = obj[found[0]]
    if not _is_state_dict(obj):
        raise ValueError(f"{path}: the selected entry is not a state dict of tensors ({type(obj).__name__})")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def write_teacher(params: Any, folder: str | pathlib.Path, *, config: Any, source: str, input_px: int) -> pathlib.Path:
    """A finished-teacher folder that ``--config.teacher.checkpoint=FOLDER`` accepts.

    ``checkpoints/0`` holds the parameters as the best ones (and the config, so a later run is
    checked against it); ``result.json`` marks the teacher finished and records where it came
    from (no test metrics: nothing was evaluated). ``run.json`` beside the folder, written only
    when absent, records the classes (when the config names them) and the input size.
    """
    import orbax.checkpoint as ocp

    from histokd_jax import atomic, checkpoint

    folder = pathlib.Path(folder).absolute()
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty; choose a new --out folder")
    with checkpoint.make_manager(folder / "checkpoints", keep=1) as manager:
        manager.save(0, args=ocp.args.Composite(
            best=ocp.args.StandardSave(params),
            meta=ocp.args.JsonSave({"step": 0, "imported_from": source}),
            config=ocp.args.JsonSave(json.loads(config.to_json())),
        ))
        manager.wait_until_finished()
    record = {"role": "teacher", "input_px": input_px, "downsample": 1, "imported_from": source}
    atomic.write_json(folder / "result.json", record)  # marks the teacher finished: never half written
    run_file = folder.parent / "run.json"
    if not run_file.exists():
        run = {"teacher_px": input_px, "imported_from": source}
        if config.data.class_names:
            run["class_names"] = list(config.data.class_names)
        atomic.write_json(run_file, run)
    return folder


def import_teacher(checkpoint: str | pathlib.Path, *, config: Any, out: str | pathlib.Path,
                   key: str | None = None) -> pathlib.Path:
    """``launch/import_torch.py``: read a ``.pt``, convert it strictly for ``config``'s model, write the teacher
    folder. The class count comes from ``fc.weight`` and must agree with ``data.class_names`` when set."""
    from histokd_jax.model_config import make_model

    state = load_torch_state_dict(checkpoint, key=key)
    if "fc.weight" not in state:
        raise ValueError(f"{checkpoint} has no fc.weight: not the authors' ResNet-GN layout")
    num_classes = int(state["fc.weight"].shape[0])
    names = tuple(config.data.class_names)
    if names and len(names) != num_classes:
        raise ValueError(f"{checkpoint} has {num_classes} classes (fc.weight); data.class_names has {len(names)}")
    params = params_from_torch(state, model=make_model(config, num_classes=num_classes))
    return write_teacher(params, out, config=config, source=str(pathlib.Path(checkpoint).absolute()),
                         input_px=int(config.data.teacher_px))


def export_run_model(workdir: str | pathlib.Path, *, model: str, out: str | pathlib.Path) -> tuple[pathlib.Path, list]:
    """``launch/export_torch.py``: save a finished model of a training workdir ("student", "teacher" or
    "baseline") to ``out``; returns (the file, the settings in which the run differs from ``TORCH_MODEL``)."""
    from histokd_jax.inference import load_run_model

    found = load_run_model(workdir, model=model)
    net = found.net
    differ = [f"model.{k}={getattr(net, k)!r} (PyTorch: {v!r})" for k, v in TORCH_MODEL.items() if getattr(net, k) != v]
    return export_torch(found.params, out), differ
