"""ResNet with GroupNorm, the paper's teacher/student architecture.

GroupNorm instead of BatchNorm keeps the network a pure function of its
parameters (no batch statistics), so teacher and student run identically under
jit on any number of devices and in train or eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# Per-channel statistics used to centre uint8 RGB images before the network.
# Rough H&E values; exact numbers matter little because GroupNorm follows the stem.
PIXEL_MEAN = (0.70, 0.55, 0.70)
PIXEL_STD = (0.18, 0.22, 0.16)

# A GroupNorm group holding fewer values than this normalises away its signal
# (measured on this project: 8 px students with 32 groups stay at chance).
MIN_VALUES_PER_GROUP = 4


def normalize_images(images: jnp.ndarray) -> jnp.ndarray:
    """uint8 NHWC in [0, 255] -> float32, centred per channel."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)


def groups_for(channels: int, num_groups: int) -> int:
    """GroupNorm groups for a layer: the largest divisor of ``channels`` not above ``num_groups``.

    So the paper's 32 groups apply where they fit, and narrow layers (or widths
    that 32 does not divide) still get equal-sized groups.
    """
    groups = max(1, min(num_groups, channels))
    while channels % groups:
        groups -= 1
    return groups


def stage_sizes(input_px: int, num_stages: int) -> list[int]:
    """Spatial side of each stage's output for a square input (stem /2, pool /2, then /2 per stage)."""
    side = -(-input_px // 2)  # 7x7/2 conv, SAME padding
    side = -(-side // 2)  # 3x3/2 max-pool, SAME padding
    sizes = [side]
    for _ in range(1, num_stages):
        side = -(-side // 2)
        sizes.append(side)
    return sizes


def check_groupnorm(*, input_px: int, widths: Sequence[int], num_groups: int, role: str = "model") -> None:
    """Refuse configurations where GroupNorm would wipe out the signal.

    A group's statistics are taken over (channels per group) x H x W values; when a
    small input shrinks a late stage to 1x1 with one channel per group, every group
    normalises to zero. Fail early with the fix instead of training at chance.
    """
    for stage, (width, side) in enumerate(zip(widths, stage_sizes(input_px, len(widths))), start=1):
        per_group = (width // groups_for(width, num_groups)) * side * side
        if per_group < MIN_VALUES_PER_GROUP:
            raise ValueError(
                f"{role}: at {input_px} px input, stage {stage} is {side}x{side} with {width} channels in "
                f"{groups_for(width, num_groups)} GroupNorm groups, i.e. {per_group} value(s) per group "
                f"(< {MIN_VALUES_PER_GROUP}); normalisation would erase the features. Use fewer groups "
                f"(model.num_groups, e.g. {max(1, width * side * side // MIN_VALUES_PER_GROUP)}) or a larger input."
            )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18 style)."""

    features: int
    strides: int
    num_groups: int
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        groups = groups_for(self.features, self.num_groups)
        conv = lambda k, s, name: nn.Conv(self.features, (k, k), strides=s, use_bias=False,  # noqa: E731
                                          dtype=self.dtype, name=name)
        norm = lambda name: nn.GroupNorm(num_groups=groups, dtype=self.dtype, name=name)  # noqa: E731
        y = nn.relu(norm("norm1")(conv(3, self.strides, "conv1")(x)))
        y = norm("norm2")(conv(3, 1, "conv2")(y))
        if x.shape[-1] != self.features or self.strides != 1:
            x = norm("proj_norm")(conv(1, self.strides, "proj_conv")(x))
        return nn.relu(x + y)


class ResNetGN(nn.Module):
    """ResNet-GN returning ``(logits, features)``.

    ``features`` maps ``"stage1"``...``"stageN"`` to NHWC maps and ``"pooled"``
    to the globally averaged last stage; the last stage feeds the feature loss.
    Inputs are float NHWC images, normalised by the caller with
    ``normalize_images`` (the step functions do this).
    """

    num_classes: int
    widths: Sequence[int] = (32, 64, 128, 256)
    blocks_per_stage: Sequence[int] = (1, 1, 1, 1)
    num_groups: int = 32
    # Compute dtype (e.g. jnp.bfloat16 on GPU/TPU: mixed precision). Parameters, GroupNorm
    # statistics, logits and losses stay float32.
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        if len(self.widths) != len(self.blocks_per_stage):
            raise ValueError(f"widths {self.widths} and blocks_per_stage {self.blocks_per_stage} differ in length")
        stem_width = self.widths[0]
        x = nn.Conv(stem_width, (7, 7), strides=2, use_bias=False, dtype=self.dtype, name="stem_conv")(x)
        x = nn.relu(nn.GroupNorm(num_groups=groups_for(stem_width, self.num_groups), dtype=self.dtype,
                                 name="stem_norm")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        features = {}
        for stage, (width, blocks) in enumerate(zip(self.widths, self.blocks_per_stage), start=1):
            for block in range(blocks):
                strides = 2 if stage > 1 and block == 0 else 1
                x = BasicBlock(width, strides, self.num_groups, dtype=self.dtype, name=f"stage{stage}_block{block}")(x)
            features[f"stage{stage}"] = x
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features["pooled"] = pooled
        logits = nn.Dense(self.num_classes, name="head")(pooled)  # float32 head
        return logits, features


def last_stage(features: dict[str, jnp.ndarray]) -> jnp.ndarray:
    """The deepest stage's feature map (the one the paper distils)."""
    deepest = max(int(k[len("stage"):]) for k in features if k.startswith("stage"))
    return features[f"stage{deepest}"]
