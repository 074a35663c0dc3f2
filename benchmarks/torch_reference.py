"""The paper model and distillation step in PyTorch, equal to this project's Flax version.

What a user would otherwise run, defined here so the benchmark compares like with
like: the same ResNet-GN (7x7/2 stem, 3x3/2 max-pool, one BasicBlock per stage,
GroupNorm), TensorFlow-style SAME padding (asymmetric where a stride needs it, as
XLA pads), the same loss (T^2-scaled KL + mean-squared feature distance to the
max-pooled teacher map) and AdamW with global-norm clipping. ``load_flax_params``
copies Flax weights in, so outputs can be checked equal before anything is timed.
torch is an optional extra (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histokd_jax.models import groups_for


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv(nn.Conv2d):
    """Conv2d with XLA's SAME padding: symmetric through conv2d when it can, else padded first."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        (top, bottom), (left, right) = _same_pads(x.shape[2], k, s), _same_pads(x.shape[3], k, s)
        if top == bottom and left == right:
            return F.conv2d(x, self.weight, stride=s, padding=(top, left))
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, stride=s)


def same_max_pool(x: torch.Tensor) -> torch.Tensor:
    (top, bottom), (left, right) = _same_pads(x.shape[2], 3, 2), _same_pads(x.shape[3], 3, 2)
    return F.max_pool2d(F.pad(x, (left, right, top, bottom), value=-math.inf), 3, 2)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, num_groups: int):
        super().__init__()
        g = groups_for(cout, num_groups)
        self.conv1, self.norm1 = SameConv(cin, cout, 3, stride), nn.GroupNorm(g, cout, eps=1e-6)
        self.conv2, self.norm2 = SameConv(cout, cout, 3), nn.GroupNorm(g, cout, eps=1e-6)
        self.proj = None
        if cin != cout or stride != 1:
            self.proj = nn.Sequential(SameConv(cin, cout, 1, stride), nn.GroupNorm(g, cout, eps=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu((x if self.proj is None else self.proj(x)) + y)


class TorchResNetGN(nn.Module):
    def __init__(self, num_classes: int, widths=(32, 64, 128, 256), num_groups: int = 32):
        super().__init__()
        self.stem = SameConv(3, widths[0], 7, 2)
        self.stem_norm = nn.GroupNorm(groups_for(widths[0], num_groups), widths[0], eps=1e-6)
        cins = (widths[0], *widths[:-1])
        self.stages = nn.ModuleList(Block(cin, w, 1 if i == 0 else 2, num_groups)
                                    for i, (cin, w) in enumerate(zip(cins, widths)))
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, last-stage feature map, NCHW)."""
        x = same_max_pool(F.relu(self.stem_norm(self.stem(x))))
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean(dim=(2, 3))), x


def load_flax_params(model: TorchResNetGN, params: dict) -> TorchResNetGN:
    """Copy Flax ResNetGN parameters (HWIO kernels, GroupNorm scale/bias, Dense) into ``model``."""
    def conv(module, p):
        module.weight.data = torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy())

    def norm(module, p):
        module.weight.data = torch.from_numpy(np.asarray(p["scale"]).copy())
        module.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())

    conv(model.stem, params["stem_conv"])
    norm(model.stem_norm, params["stem_norm"])
    for i, block in enumerate(model.stages, start=1):
        p = params[f"stage{i}_block0"]
        conv(block.conv1, p["conv1"]), norm(block.norm1, p["norm1"])
        conv(block.conv2, p["conv2"]), norm(block.norm2, p["norm2"])
        if block.proj is not None:
            conv(block.proj[0], p["proj_conv"]), norm(block.proj[1], p["proj_norm"])
    model.head.weight.data = torch.from_numpy(np.asarray(params["head"]["kernel"]).T.copy())
    model.head.bias.data = torch.from_numpy(np.asarray(params["head"]["bias"]).copy())
    return model


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW, centred as ``histokd_jax.models.normalize_images``."""
    from histokd_jax.models import PIXEL_MEAN, PIXEL_STD

    x = images.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def make_distill_step(student: TorchResNetGN, teacher: TorchResNetGN, *, lr: float = 1e-3,
                      temperature: float = 1.0, channels_last: bool = False):
    """One distillation step (teacher under no_grad), returning the loss; AdamW + clipping at 1.0."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    student.to(memory_format=memory), teacher.to(memory_format=memory)
    teacher.eval()

    def step(teacher_images: torch.Tensor, student_images: torch.Tensor) -> float:
        xt = normalize(teacher_images).contiguous(memory_format=memory)
        xs = normalize(student_images).contiguous(memory_format=memory)
        with torch.no_grad():
            t_logits, t_map = teacher(xt)
        s_logits, s_map = student(xs)
        kl = temperature ** 2 * F.kl_div(F.log_softmax(s_logits / temperature, -1),
                                         F.log_softmax(t_logits / temperature, -1),
                                         reduction="batchmean", log_target=True)
        feat = F.mse_loss(s_map, F.adaptive_max_pool2d(t_map, s_map.shape[2:]))
        loss = kl + feat
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        return float(loss)

    return step
