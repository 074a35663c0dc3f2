"""The model a config names, its compute precision and its cost: what training, evaluation, the sweep,
whole-slide inference and the PyTorch interop all build from ``config.model``."""

from __future__ import annotations

from typing import Any

import ml_collections

from histokd_jax.models import COMPUTE_DTYPES, ResNetGN, forward_flops


def make_model(config: ml_collections.ConfigDict, *, num_classes: int) -> ResNetGN:
    m = config.model
    return ResNetGN(
        num_classes=num_classes,
        widths=tuple(m.widths),
        blocks_per_stage=tuple(m.blocks_per_stage),
        num_groups=m.num_groups,
        dtype=compute_dtype(m.get("compute_dtype", "float32")),
        conv_lowering=m.get("conv_lowering", "auto"),
        padding=m.get("padding", "same"),
        norm_epsilon=m.get("norm_epsilon", 1e-6),
    )


def compute_dtype(name: str) -> Any:
    """``model.compute_dtype``: "float32", or "bfloat16" for mixed precision on GPU/TPU (parameters,
    GroupNorm statistics, logits and losses stay float32). On CPUs without bfloat16 units it is slower."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"model.compute_dtype must be one of {', '.join(map(repr, COMPUTE_DTYPES))}, got {name!r}")
    return COMPUTE_DTYPES[name]


def gflops_per_image(model: ResNetGN, *, input_px: int) -> float:
    """GFLOPs of one forward pass, counted analytically (``models.forward_flops``: every kernel tap,
    as papers count them). XLA's cost analysis would depend on the lowering: it skips padded taps of
    its convolutions but counts them in the patch matmuls that small convolutions become."""
    return forward_flops(input_px=input_px, widths=tuple(model.widths), blocks_per_stage=tuple(model.blocks_per_stage),
                         num_classes=model.num_classes) / 1e9
