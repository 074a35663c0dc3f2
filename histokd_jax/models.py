"""ResNet with GroupNorm, the paper's teacher/student architecture.

GroupNorm instead of BatchNorm keeps the network a pure function of its
parameters (no batch statistics), so teacher and student run identically under
jit on any number of devices and in train or eval mode.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
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
    """Spatial side of each stage's output for a square input (stem /2, pool /2, then /2 per stage).

    Either padding gives these sizes: ceil(n / 2) for every stride-2 layer."""
    side = -(-input_px // 2)  # 7x7/2 conv, SAME padding
    side = -(-side // 2)  # 3x3/2 max-pool, SAME padding
    sizes = [side]
    for _ in range(1, num_stages):
        side = -(-side // 2)
        sizes.append(side)
    return sizes


def forward_flops(*, input_px: int, widths: Sequence[int] = (32, 64, 128, 256),
                  blocks_per_stage: Sequence[int] = (1, 1, 1, 1), num_classes: int = 3) -> float:
    """FLOPs of one forward pass of ``ResNetGN`` on a square image: 2 x the multiply-adds of every
    convolution (all kernel taps, as papers count them) and of the head; normalisation, ReLU and
    pooling are not counted. Independent of how XLA lowers the convolutions."""
    flops, side, cin = 0.0, input_px, 3

    def conv(kernel: int, cout: int, stride: int) -> None:
        nonlocal flops, side, cin
        side = -(-side // stride)
        flops += 2.0 * side * side * kernel * kernel * cin * cout
        cin = cout

    conv(7, widths[0], 2)
    side = -(-side // 2)  # max-pool
    for stage, (width, blocks) in enumerate(zip(widths, blocks_per_stage)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            block_in = cin
            conv(3, width, stride)
            conv(3, width, 1)
            if block_in != width or stride != 1:
                flops += 2.0 * side * side * block_in * width  # 1x1 projection, at the output size
    return flops + 2.0 * cin * num_classes


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


# Convolutions whose output has at most this many positions run as one matmul over explicit patches:
# on CPU, XLA's convolution kernels are 5-20x slower than a matmul for 1x1, 2x2 and 4x4 outputs
# with 64-256 channels (the late stages of small students; see BENCHMARKS.md), while for larger
# outputs materialising the patches costs more than the matmul saves.
MATMUL_MAX_POSITIONS = 16


# ``ResNetGN.padding``: "same" is XLA's SAME (the extra row/column at the bottom/right when a stride
# meets an even size); "symmetric" is PyTorch's ``padding=k // 2`` on both sides, which a teacher
# imported from the authors' PyTorch code needs (``histokd_jax.torch_interop``). Output sizes agree.
PADDINGS = ("same", "symmetric")
# Compute precisions of ``model.compute_dtype`` / ``distill.teacher_dtype`` (parameters stay float32).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, tuple[int, int]]:
    """Output size and (low, high) padding of XLA's SAME convolution along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, (total // 2, total - total // 2)


def _padding(size: int, kernel: int, stride: int, padding: str) -> tuple[int, tuple[int, int]]:
    """Output size and (low, high) padding along one axis for ``padding`` ("same" or "symmetric")."""
    if padding == "same":
        return _same_padding(size, kernel, stride)
    if padding != "symmetric":
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    pad = kernel // 2
    return (size + 2 * pad - kernel) // stride + 1, (pad, pad)


def conv_as_matmul(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: str = "same") -> jnp.ndarray:
    """Convolution (NHWC x HWIO) as patches @ kernel: the same sums as ``lax.conv`` in another order."""
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x.shape
    oh, pad_h = _padding(h, kh, stride, padding)
    ow, pad_w = _padding(w, kw, stride, padding)
    xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    taps = [xp[:, i:i + (oh - 1) * stride + 1:stride, j:j + (ow - 1) * stride + 1:stride, :]
            for i in range(kh) for j in range(kw)]
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    return (patches.reshape(n * oh * ow, kh * kw * cin) @ kernel.reshape(kh * kw * cin, cout)).reshape(n, oh, ow, cout)


def _lax_conv(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: str = "same") -> jnp.ndarray:
    if padding == "same":
        pads = "SAME"
    else:
        pads = [_padding(x.shape[1], kernel.shape[0], stride, padding)[1],
                _padding(x.shape[2], kernel.shape[1], stride, padding)[1]]
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Up to this many input channels, ``conv_few_inputs`` computes the kernel gradient (the RGB stem), and
# its forward pads the input channels with zeros to this many.
FEW_INPUT_CHANNELS = 4


def _lax_conv_padded_channels(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: str) -> jnp.ndarray:
    """XLA's convolution with the input channels padded with zeros to ``FEW_INPUT_CHANNELS``: the same sums
    (the extra channel meets zero weights), but XLA's CPU kernel runs the 7x7 RGB stem ~2x faster on 4
    channels than on 3 (16-20 vs 32-55 GFLOP/s at 256 px on the AMD EPYC, BENCHMARKS.md), and the stem is most
    of a 256 px teacher's forward."""
    extra = FEW_INPUT_CHANNELS - x.shape[-1]
    if extra > 0:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
        kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, extra), (0, 0)))
    return _lax_conv(x, kernel, stride, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_few_inputs(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, padding: str = "same") -> jnp.ndarray:
    """XLA's convolution on zero-padded input channels, with the kernel gradient as one matmul per tap.

    For the stem (3 input channels) XLA's weight-gradient convolution reaches only
    ~13 GFLOP/s on CPU; contracting each tap's (positions x 3) input slice with the
    (positions x features) output gradient is ~30% faster and sums the same terms.
    """
    return _lax_conv_padded_channels(x, kernel, stride, padding)


def _few_fwd(x, kernel, stride, padding):
    return _lax_conv_padded_channels(x, kernel, stride, padding), (x, kernel)


def _few_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    kh, kw, cin, cout = kernel.shape
    _, h, w, _ = x.shape
    oh, pad_h = _padding(h, kh, stride, padding)
    ow, pad_w = _padding(w, kw, stride, padding)
    xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    g2 = g.reshape(-1, cout)
    taps = [xp[:, i:i + (oh - 1) * stride + 1:stride, j:j + (ow - 1) * stride + 1:stride, :].reshape(-1, cin).T @ g2
            for i in range(kh) for j in range(kw)]
    d_kernel = jnp.stack(taps).reshape(kh, kw, cin, cout).astype(kernel.dtype)
    d_x = jax.vjp(lambda v: _lax_conv(v, kernel, stride, padding), x)[1](g)[0]  # dropped by XLA when x is data
    return d_x, d_kernel


conv_few_inputs.defvjp(_few_fwd, _few_bwd)


class Conv(nn.Module):
    """A bias-free convolution with ``nn.Conv``'s parameter (``kernel``, HWIO, LeCun normal),
    lowered per call site by output size: XLA's convolution, or ``conv_as_matmul`` for small outputs.

    ``lowering="xla"`` forces the plain convolution (the reference the tests compare against);
    ``padding`` is "same" or "symmetric" (see ``PADDINGS``).
    """

    features: int
    kernel_size: int
    strides: int = 1
    dtype: Any = jnp.float32
    lowering: str = "auto"
    padding: str = "same"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        oh, _ = _padding(x.shape[1], k, self.strides, self.padding)
        ow, _ = _padding(x.shape[2], k, self.strides, self.padding)
        if self.lowering == "auto" and oh * ow <= MATMUL_MAX_POSITIONS:
            return conv_as_matmul(x, kernel, self.strides, self.padding)
        if self.lowering not in ("auto", "xla"):
            raise ValueError(f"conv lowering must be 'auto' or 'xla', got {self.lowering!r}")
        if self.lowering == "auto" and x.shape[-1] <= FEW_INPUT_CHANNELS and k > 1:
            return conv_few_inputs(x, kernel, self.strides, self.padding)
        return _lax_conv(x, kernel, self.strides, self.padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_3x3_s2(x: jnp.ndarray, padding: str = "same") -> jnp.ndarray:
    """The stem's 3x3 / stride-2 max-pool (padding with -inf, "same" or "symmetric"), with a faster gradient.

    The forward pass is XLA's ``reduce_window``. Its automatic gradient
    (``select_and_scatter``) is 4-5x slower on CPU than the forward and backward of
    the whole following stage; ``_max_pool_grad`` routes each gradient to the first
    maximum of its window (the same rule) with nine strided comparisons instead.
    """
    if padding == "same":
        pads = "SAME"
    else:
        pads = ((0, 0), _padding(x.shape[1], 3, 2, padding)[1], _padding(x.shape[2], 3, 2, padding)[1], (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pads)


def _max_pool_fwd(x: jnp.ndarray, padding: str) -> tuple[jnp.ndarray, tuple[jnp.ndarray, jnp.ndarray]]:
    y = max_pool_3x3_s2(x, padding)
    return y, (x, y)


def _max_pool_grad(padding: str, residuals: tuple[jnp.ndarray, jnp.ndarray], g: jnp.ndarray) -> tuple[jnp.ndarray]:
    x, y = residuals
    _, h, w, _ = x.shape
    oh, (top, bottom) = _padding(h, 3, 2, padding)
    ow, (left, right) = _padding(w, 3, 2, padding)
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=-jnp.inf)
    grad = jnp.zeros(xp.shape, g.dtype)
    taken = jnp.zeros(y.shape, bool)
    zero = jnp.zeros((), g.dtype)
    for i in range(3):
        for j in range(3):
            tap = xp[:, i:i + 2 * (oh - 1) + 1:2, j:j + 2 * (ow - 1) + 1:2, :]
            hit = (tap == y) & ~taken
            taken = taken | hit
            # place the window's gradient back at stride 2 from (i, j): a pad with interior zeros
            grad = grad + jax.lax.pad(jnp.where(hit, g, zero), zero, (
                (0, 0, 0), (i, xp.shape[1] - i - 2 * (oh - 1) - 1, 1), (j, xp.shape[2] - j - 2 * (ow - 1) - 1, 1),
                (0, 0, 0)))
    return (grad[:, top:top + h, left:left + w, :],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_grad)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18 style)."""

    features: int
    strides: int
    num_groups: int
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    conv_lowering: str = "auto"
    padding: str = "same"
    norm_epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        groups = groups_for(self.features, self.num_groups)
        conv = lambda k, s, name: Conv(self.features, k, s, dtype=self.dtype, lowering=self.conv_lowering,  # noqa: E731
                                       padding=self.padding, name=name)
        norm = lambda name: nn.GroupNorm(num_groups=groups, epsilon=self.norm_epsilon, dtype=self.dtype,  # noqa: E731
                                         name=name)
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
    # "auto": small-output convolutions as matmuls (faster on CPU; same parameters and sums);
    # "xla": every convolution through XLA's kernel.
    conv_lowering: str = "auto"
    # "same": XLA's SAME padding; "symmetric": PyTorch's k // 2 on both sides (for imported PyTorch weights).
    padding: str = "same"
    # Added to each GroupNorm variance: Flax's default; PyTorch's GroupNorm (so imported weights) uses 1e-5.
    norm_epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        if len(self.widths) != len(self.blocks_per_stage):
            raise ValueError(f"widths {self.widths} and blocks_per_stage {self.blocks_per_stage} differ in length")
        stem_width = self.widths[0]
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        x = Conv(stem_width, 7, 2, dtype=self.dtype, lowering=self.conv_lowering, padding=self.padding,
                 name="stem_conv")(x)
        x = nn.relu(nn.GroupNorm(num_groups=groups_for(stem_width, self.num_groups), epsilon=self.norm_epsilon,
                                 dtype=self.dtype, name="stem_norm")(x))
        x = max_pool_3x3_s2(x, self.padding)
        features = {}
        for stage, (width, blocks) in enumerate(zip(self.widths, self.blocks_per_stage), start=1):
            for block in range(blocks):
                strides = 2 if stage > 1 and block == 0 else 1
                x = BasicBlock(width, strides, self.num_groups, dtype=self.dtype, conv_lowering=self.conv_lowering,
                               padding=self.padding, norm_epsilon=self.norm_epsilon,
                               name=f"stage{stage}_block{block}")(x)
            features[f"stage{stage}"] = x
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features["pooled"] = pooled
        logits = nn.Dense(self.num_classes, name="head")(pooled)  # float32 head
        return logits, features


# On CPU, XLA's convolutions run 1.5-2x slower once a layer's activations outgrow the caches (the 7x7 stem
# on 256 px: ~60 GFLOP/s up to 8 images, ~37 from 16; a 3x3 32->32 layer on 64x64: ~92 up to 32 images, ~55
# from 64; BENCHMARKS.md). Forward passes that are not differentiated run on microbatches whose stem output
# (the largest activation) holds at most this many bytes.
CPU_MICROBATCH_BYTES = 16 * 2**20


def num_microbatches(*, batch: int, input_px: int, stem_width: int, itemsize: int = 4,
                     max_bytes: int = CPU_MICROBATCH_BYTES) -> int:
    """The fewest microbatches that divide ``batch`` and keep each one's stem output within ``max_bytes``."""
    side, _ = _same_padding(input_px, 7, 2)  # the stem's 7x7 / stride-2 output
    want = -(-batch * side * side * stem_width * itemsize // max_bytes)
    return next(n for n in range(max(1, want), batch + 1) if batch % n == 0) if batch else 1


def apply_in_microbatches(model: ResNetGN, variables: Any, images: jnp.ndarray, *,
                          max_bytes: int = CPU_MICROBATCH_BYTES) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """``model.apply(variables, images)`` for a forward pass that is not differentiated (teacher targets,
    evaluation, inference): on CPU, one microbatch at a time (``lax.map``), each small enough for the caches;
    elsewhere, or when one fits, the plain call. Differentiating it is slow (the loop's transpose).

    Microbatch j holds images j, j + n, j + 2n, ...: on a batch split across devices every device keeps
    its share of every microbatch, so nothing moves between devices."""
    n = num_microbatches(batch=images.shape[0], input_px=images.shape[1], stem_width=model.widths[0],
                         itemsize=jnp.dtype(model.dtype).itemsize, max_bytes=max_bytes)
    if jax.default_backend() != "cpu" or n == 1:
        return model.apply(variables, images)
    b = images.shape[0]
    strided = images.reshape(b // n, n, *images.shape[1:]).swapaxes(0, 1)
    out = jax.lax.map(lambda x: model.apply(variables, x), strided)
    return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(b, *y.shape[2:]), out)


def last_stage(features: dict[str, jnp.ndarray]) -> jnp.ndarray:
    """The deepest stage's feature map (the one the paper distils)."""
    deepest = max(int(k[len("stage"):]) for k in features if k.startswith("stage"))
    return features[f"stage{deepest}"]


def teacher_outputs(teacher: nn.Module, params: Any, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The teacher's (logits, deepest feature map) in float32 for raw uint8 ``images``: the distillation targets,
    computed alike live in the step and once for a target cache."""
    logits, features = apply_in_microbatches(teacher, {"params": params}, normalize_images(images))
    return logits.astype(jnp.float32), last_stage(features).astype(jnp.float32)
