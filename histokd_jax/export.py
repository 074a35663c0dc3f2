"""A trained model as files the tools pathologists use load: TorchScript + ``config.json`` for WSInfer (and its
QuPath extension), and ONNX for runtimes outside Python.

WSInfer reads each patch at level 0, resizes it to ``patch_size_pixels`` (PIL), applies the config's
``ToTensor`` + ``Normalize`` and calls the TorchScript model on the NCHW batch; it softmaxes the logits. A
distilled student's ``spacing_um_px`` is its downsample factor times the teacher's, so WSInfer reads that many
times fewer pixels per tissue area. Every export is checked against the Flax model on random tiles before it is
kept. ``torch`` (and ``onnxscript`` for ONNX) are imported only here: ``pip install "histokd-jax[export]"``.
"""

from __future__ import annotations

import io
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from histokd_jax import atomic
from histokd_jax.inference import RunModel, load_run_model
from histokd_jax.models import PIXEL_MEAN, PIXEL_STD, normalize_images

WSINFER_SPEC_VERSION = "1.0"
# Largest |TorchScript - Flax| logit difference accepted on the export's check (float32 reorderings give ~1e-6).
EXPORT_TOLERANCE = 1e-3


def wsinfer_config(found: RunModel) -> dict[str, Any]:
    """The wsinfer-zoo model config (spec 1.0) of a run's model: its tile size, µm/px, classes and our
    pixel normalisation (``models.normalize_images`` is ``ToTensor`` then ``Normalize``)."""
    net = found.net
    return {
        "spec_version": WSINFER_SPEC_VERSION,
        "architecture": f"histokd_jax ResNetGN widths={list(net.widths)} blocks={list(net.blocks_per_stage)}",
        "num_classes": len(found.class_names),
        "patch_size_pixels": int(found.input_px),
        "spacing_um_px": float(found.known_mpp()),
        "class_names": list(found.class_names),
        "transform": [
            {"name": "Resize", "arguments": {"size": [int(found.input_px)] * 2}},
            {"name": "ToTensor"},
            {"name": "Normalize", "arguments": {"mean": list(PIXEL_MEAN), "std": list(PIXEL_STD)}},
        ],
    }


def check_tiles(input_px: int, *, count: int = 4, seed: int = 0) -> np.ndarray:
    """Random uint8 RGB tiles (NHWC) to compare an export with the Flax model on."""
    return np.random.default_rng(seed).integers(0, 256, (count, input_px, input_px, 3), dtype=np.uint8)


def normalized_nchw(tiles: np.ndarray) -> np.ndarray:
    """uint8 NHWC tiles as the exported models take them: float NCHW after ``ToTensor`` + ``Normalize``."""
    return np.ascontiguousarray(np.asarray(normalize_images(jnp.asarray(tiles)), np.float32).transpose(0, 3, 1, 2))


def flax_logits(found: RunModel, tiles: np.ndarray) -> np.ndarray:
    """The Flax model's logits on uint8 NHWC tiles: the reference every export is checked against."""
    logits, _ = jax.jit(found.net.apply)({"params": found.params}, normalize_images(jnp.asarray(tiles)))
    return np.asarray(logits, np.float32)


def jax_to_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)


def _check(what: str, got: np.ndarray, want: np.ndarray) -> float:
    error = float(np.abs(got - want).max())
    if not error <= EXPORT_TOLERANCE:
        raise RuntimeError(f"the {what} export computes other logits than the Flax model (max difference {error:.3g} "
                           f"> {EXPORT_TOLERANCE}); nothing was kept")
    return error


def _refuse_existing(paths: list[pathlib.Path]) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); choose a new --out folder")


def write_torchscript(module: Any, path: pathlib.Path, *, tiles: np.ndarray, want: np.ndarray) -> float:
    """Script ``module``, check its logits against ``want`` on ``tiles``, save it atomically; returns the error."""
    import torch

    scripted = torch.jit.script(module)
    with torch.no_grad():
        got = scripted(torch.from_numpy(normalized_nchw(tiles))).numpy()
    error = _check("TorchScript", got, want)
    with atomic.atomic_open(path, "wb") as handle:
        torch.jit.save(scripted, handle)
    return error


def write_onnx(module: Any, path: pathlib.Path, *, tiles: np.ndarray, want: np.ndarray) -> float:
    """``module`` as ONNX (input ``image``: float NCHW with a free batch size; output ``logits``), checked with
    onnxruntime against ``want`` on ``tiles``; returns the error."""
    import onnxruntime
    import torch

    example = torch.from_numpy(normalized_nchw(tiles))
    buffer = io.BytesIO()
    torch.onnx.export(module, (example,), buffer, input_names=["image"], output_names=["logits"], dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    error = _check("ONNX", session.run(None, {"image": example.numpy()})[0], want)
    with atomic.atomic_open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return error


def export_run(checkpoint_dir: str | pathlib.Path, *, model: str = "student", out: str | pathlib.Path,
               teacher_mpp: float | None = None, onnx: bool = False) -> dict[str, Any]:
    """``histokd export``: ``out/model.pt`` (TorchScript) and ``out/config.json`` (WSInfer), and ``out/model.onnx``
    with ``onnx``. Refuses runs of unknown µm/px (tile folders without ``teacher_mpp``) and existing files.
    Returns what was written and each export's largest logit difference from the Flax model."""
    from histokd_jax import torch_model

    out = pathlib.Path(out)
    targets = [out / "model.pt", out / "config.json"] + ([out / "model.onnx"] if onnx else [])
    _refuse_existing(targets)
    found = load_run_model(checkpoint_dir, model=model, teacher_mpp=teacher_mpp)
    config = wsinfer_config(found)  # raises for an unknown resolution before anything is written
    module = torch_model.from_flax(jax_to_numpy(found.params), net=found.net)
    tiles = check_tiles(found.input_px)
    want = flax_logits(found, tiles)
    out.mkdir(parents=True, exist_ok=True)
    errors = {"torchscript": write_torchscript(module, out / "model.pt", tiles=tiles, want=want)}
    if onnx:
        errors["onnx"] = write_onnx(module, out / "model.onnx", tiles=tiles, want=want)
    atomic.write_json(out / "config.json", config)
    return {"files": [str(p) for p in targets], "max_logit_difference": errors, "config": config,
            "source": str(found.stage_dir)}
