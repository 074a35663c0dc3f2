"""``models.ResNetGN`` as a PyTorch module, for exports that run outside JAX (TorchScript for WSInfer, ONNX).

The parameters are those of the authors' layout (``torch_interop``: ``conv_1`` ... ``layer_{s}.{b}`` ... ``fc``;
here ``layer_{s}`` is ``stages.{s-1}``), so a trained run's parameters load through
``torch_interop.torch_state_dict_from_params`` with ``strict=True``.
Unlike the authors' code it computes what the Flax model computes for either of its paddings (XLA's SAME,
asymmetric where a stride meets an even size, or PyTorch's ``k // 2``) and with its GroupNorm epsilon, so
any run exports exactly. Input: float NCHW, already normalised (``ToTensor`` then ``Normalize`` with
``models.PIXEL_MEAN`` / ``PIXEL_STD``); output: logits. ``torch`` is imported here only.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histokd_jax import torch_interop
from histokd_jax.models import PADDINGS, ResNetGN, groups_for


def _pads(size: int, kernel: int, stride: int, same: bool) -> tuple[int, int]:
    """(low, high) padding along one axis: XLA's SAME (``same``) or ``k // 2`` on both sides."""
    if not same:
        return kernel // 2, kernel // 2
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv(nn.Module):
    """A bias-free convolution padded as the Flax model pads (zeros, computed from the input's size)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, same: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cout, cin, kernel, kernel))
        self.kernel, self.stride, self.same = kernel, stride, same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = _pads(x.shape[2], self.kernel, self.stride, self.same)
        left, right = _pads(x.shape[3], self.kernel, self.stride, self.same)
        return F.conv2d(F.pad(x, [left, right, top, bottom]), self.weight, None, self.stride)


class MaxPool(nn.Module):
    """The stem's 3x3 / stride-2 max-pool, padded with -inf as the Flax model pads."""

    def __init__(self, same: bool):
        super().__init__()
        self.same = same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = _pads(x.shape[2], 3, 2, self.same)
        left, right = _pads(x.shape[3], 3, 2, self.same)
        return F.max_pool2d(F.pad(x, [left, right, top, bottom], value=-math.inf), 3, 2)


class Block(nn.Module):
    """``models.BasicBlock``: two 3x3 convolutions and a residual (projected when shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, *, groups: int, eps: float, same: bool):
        super().__init__()
        self.conv_1, self.norm_1 = Conv(cin, cout, 3, stride, same), nn.GroupNorm(groups, cout, eps=eps)
        self.conv_2, self.norm_2 = Conv(cout, cout, 3, 1, same), nn.GroupNorm(groups, cout, eps=eps)
        self.downsample: nn.Module = nn.Identity()
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(Conv(cin, cout, 1, stride, same), nn.GroupNorm(groups, cout, eps=eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm_1(self.conv_1(x)))
        return F.relu(self.downsample(x) + self.norm_2(self.conv_2(y)))


class TorchResNetGN(nn.Module):
    """``models.ResNetGN`` (logits only) with the same widths, blocks, groups, padding and epsilon."""

    def __init__(self, *, num_classes: int, widths: tuple[int, ...], blocks_per_stage: tuple[int, ...],
                 num_groups: int, padding: str, norm_epsilon: float):
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        same = padding == "same"
        self.conv_1 = Conv(3, widths[0], 7, 2, same)
        self.norm_1 = nn.GroupNorm(groups_for(widths[0], num_groups), widths[0], eps=norm_epsilon)
        self.pool = MaxPool(same)
        stages, cin = [], widths[0]
        for stage, (width, blocks) in enumerate(zip(widths, blocks_per_stage), start=1):
            stages.append(nn.Sequential(*[
                Block(cin if b == 0 else width, width, 2 if stage > 1 and b == 0 else 1,
                      groups=groups_for(width, num_groups), eps=norm_epsilon, same=same) for b in range(blocks)]))
            cin = width
        self.stages = nn.ModuleList(stages)  # stages.{s-1} holds the authors' layer_{s}
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.norm_1(self.conv_1(x))))
        for stage in self.stages:
            x = stage(x)
        return self.fc(x.mean(dim=(2, 3)))


def from_flax(params: Any, *, net: ResNetGN) -> TorchResNetGN:
    """A ``TorchResNetGN`` in eval mode holding ``params`` of ``net``; every parameter filled, every key used."""
    module = TorchResNetGN(num_classes=net.num_classes, widths=tuple(net.widths),
                           blocks_per_stage=tuple(net.blocks_per_stage), num_groups=net.num_groups,
                           padding=net.padding, norm_epsilon=net.norm_epsilon)
    state = {re.sub(r"^layer_(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.", key): value
             for key, value in torch_interop.torch_state_dict_from_params(params).items()}
    module.load_state_dict(state, strict=True)  # raises naming any missing or unexpected key
    return module.eval()
