"""ResNet-GN shapes, parameter count and GroupNorm guards, checked against hand arithmetic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from histokd_jax import models
from histokd_jax.state import count_params
from tests.helpers import numpy_params

TINY = dict(widths=(8, 16, 16, 32), num_groups=4)
PAPER_WIDTHS = (32, 64, 128, 256)

# Stage sides worked out by hand: stem 7x7/2 SAME -> ceil(n/2), 3x3/2 max-pool SAME -> ceil(./2),
# stage1 keeps the side, stages 2..4 halve it (ceil).
#   16:  16 -> 8 -> 4 | 4, 2, 1, 1
#   28:  28 -> 14 -> 7 | 7, 4, 2, 1
#   64:  64 -> 32 -> 16 | 16, 8, 4, 2
#   224: 224 -> 112 -> 56 | 56, 28, 14, 7
#   30:  30 -> 15 -> 8 | 8, 4, 2, 1
HAND_STAGE_SIDES = {16: (4, 2, 1, 1), 28: (7, 4, 2, 1), 64: (16, 8, 4, 2), 224: (56, 28, 14, 7), 30: (8, 4, 2, 1)}


def _shapes(model, px, batch=2):
    x = jax.ShapeDtypeStruct((batch, px, px, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    return variables, jax.eval_shape(model.apply, variables, x)


@pytest.mark.parametrize("px", sorted(HAND_STAGE_SIDES))
def test_output_shapes_tiny(px):
    model = models.ResNetGN(num_classes=5, **TINY)
    _, (logits, features) = _shapes(model, px, batch=3)
    assert logits.shape == (3, 5)
    assert set(features) == {"stage1", "stage2", "stage3", "stage4", "pooled"}
    for stage, (side, width) in enumerate(zip(HAND_STAGE_SIDES[px], TINY["widths"]), start=1):
        assert features[f"stage{stage}"].shape == (3, side, side, width), stage
    assert features["pooled"].shape == (3, TINY["widths"][-1])


def test_output_shapes_paper_config_224():
    model = models.ResNetGN(num_classes=3)  # defaults: paper widths, one block per stage, 32 groups
    _, (logits, features) = _shapes(model, 224)
    assert logits.shape == (2, 3)
    for stage, (side, width) in enumerate(zip(HAND_STAGE_SIDES[224], PAPER_WIDTHS), start=1):
        assert features[f"stage{stage}"].shape == (2, side, side, width)
    assert features["pooled"].shape == (2, 256)


@pytest.mark.parametrize("px", sorted(HAND_STAGE_SIDES))
def test_stage_sizes_match_hand_values(px):
    assert models.stage_sizes(px, 4) == list(HAND_STAGE_SIDES[px])


def test_forward_pass_pooled_is_mean_of_last_stage_and_logits_are_dense_head():
    model = models.ResNetGN(num_classes=4, **TINY)
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 28, 28, 3)).astype(np.float32)
    params = numpy_params(model, 28, seed=1)
    logits, features = jax.jit(model.apply)({"params": params}, x)
    stage4 = np.asarray(features["stage4"], np.float64)
    pooled = stage4.mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(features["pooled"]), pooled, rtol=1e-5, atol=1e-6)
    head = params["head"]
    np.testing.assert_allclose(
        np.asarray(logits), pooled @ np.asarray(head["kernel"]) + np.asarray(head["bias"]), rtol=1e-4, atol=1e-5
    )
    assert np.all(stage4 >= 0)  # every block ends in a ReLU
    assert models.last_stage(features) is features["stage4"]


def test_paper_parameter_count_by_hand():
    classes = 3

    def gn(c):  # GroupNorm: scale + bias per channel
        return 2 * c

    stem = 7 * 7 * 3 * 32 + gn(32)  # 7x7 conv, no bias, then GroupNorm
    # stage1: 32 -> 32, stride 1: no projection
    stage1 = (3 * 3 * 32 * 32 + gn(32)) + (3 * 3 * 32 * 32 + gn(32))
    # stages 2..4: channels double and stride is 2 -> 1x1 projection conv + GroupNorm
    stage2 = (3 * 3 * 32 * 64 + gn(64)) + (3 * 3 * 64 * 64 + gn(64)) + (1 * 1 * 32 * 64 + gn(64))
    stage3 = (3 * 3 * 64 * 128 + gn(128)) + (3 * 3 * 128 * 128 + gn(128)) + (1 * 1 * 64 * 128 + gn(128))
    stage4 = (3 * 3 * 128 * 256 + gn(256)) + (3 * 3 * 256 * 256 + gn(256)) + (1 * 1 * 128 * 256 + gn(256))
    head = 256 * classes + classes
    expected = stem + stage1 + stage2 + stage3 + stage4 + head

    model = models.ResNetGN(num_classes=classes, widths=PAPER_WIDTHS, blocks_per_stage=(1, 1, 1, 1), num_groups=32)
    variables, _ = _shapes(model, 64, batch=1)
    params = variables["params"]
    assert int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))) == expected
    assert count_params(params) == expected
    # projection exists exactly where channels or stride change
    assert "proj_conv" not in params["stage1_block0"]
    for stage in (2, 3, 4):
        assert "proj_conv" in params[f"stage{stage}_block0"]


def test_projection_when_only_stride_changes():
    # equal widths in stages 2 and 3 (16 -> 16): the stride-2 block still needs a projection
    model = models.ResNetGN(num_classes=2, **TINY)
    params = _shapes(model, 32)[0]["params"]
    assert params["stage3_block0"]["proj_conv"]["kernel"].shape == (1, 1, 16, 16)
    assert "proj_conv" not in params["stage1_block0"]  # 8 -> 8 at stride 1


# ---------------------------------------------------------------- GroupNorm guards


def _hand_rule_fails(px, widths, groups):
    """The docstring rule, recomputed: (channels per group) x side^2 < 4 at some stage."""
    side = -(-px // 2)
    side = -(-side // 2)
    for stage, width in enumerate(widths):
        if stage:
            side = -(-side // 2)
        g = max(d for d in range(1, min(groups, width) + 1) if width % d == 0)  # largest divisor <= groups
        if (width // g) * side * side < 4:
            return True
    return False


def test_check_groupnorm_rejects_8px_with_32_groups():
    # 8 px: 8 -> 4 -> 2, stages 2,1,1,1; stage2 has 64/32 = 2 channels per group x 1x1 = 2 values < 4
    with pytest.raises(ValueError, match="stage 2"):
        models.check_groupnorm(input_px=8, widths=PAPER_WIDTHS, num_groups=32)


def test_check_groupnorm_passes_at_16px():
    # 16 px: stages 4,2,1,1 -> per group 1*16, 2*4, 4*1, 8*1: all >= 4
    models.check_groupnorm(input_px=16, widths=PAPER_WIDTHS, num_groups=32)


def test_check_groupnorm_8px_threshold():
    # 8 px, stages 2,1,1,1: need 32//g*4 >= 4 (g <= 32), 64//g >= 4 (g <= 16), 128//g >= 4, 256//g >= 4
    # -> 16 groups is the largest that passes; 17..31 also pass, because a layer uses the largest
    # divisor of its width not above num_groups (16 for 64 channels); 32 fails.
    models.check_groupnorm(input_px=8, widths=PAPER_WIDTHS, num_groups=16)
    models.check_groupnorm(input_px=8, widths=PAPER_WIDTHS, num_groups=8)
    models.check_groupnorm(input_px=8, widths=PAPER_WIDTHS, num_groups=17)
    with pytest.raises(ValueError):
        models.check_groupnorm(input_px=8, widths=PAPER_WIDTHS, num_groups=32)


@pytest.mark.parametrize("channels", [1, 12, 32, 48, 100, 256])
def test_groups_for_always_divides_the_channels(channels):
    for num_groups in range(1, 70):
        g = models.groups_for(channels, num_groups)
        assert 1 <= g <= min(num_groups, channels) and channels % g == 0
        # and it is the largest such divisor
        assert not any(channels % d == 0 for d in range(g + 1, min(num_groups, channels) + 1))


@pytest.mark.parametrize("px", [4, 8, 12, 16, 32])
def test_check_groupnorm_agrees_with_rule_for_all_group_counts(px):
    for groups in range(1, 65):
        fails = _hand_rule_fails(px, PAPER_WIDTHS, groups)
        if fails:
            with pytest.raises(ValueError):
                models.check_groupnorm(input_px=px, widths=PAPER_WIDTHS, num_groups=groups)
        else:
            models.check_groupnorm(input_px=px, widths=PAPER_WIDTHS, num_groups=groups)


def test_check_groupnorm_suggested_group_count_fixes_8px():
    with pytest.raises(ValueError) as err:
        models.check_groupnorm(input_px=8, widths=PAPER_WIDTHS, num_groups=32)
    assert "e.g. 16" in str(err.value)  # 64 channels * 1x1 / 4 values per group
    models.check_groupnorm(input_px=8, widths=PAPER_WIDTHS, num_groups=16)


def test_model_accepted_by_check_runs_at_8px():
    models.check_groupnorm(input_px=8, widths=PAPER_WIDTHS, num_groups=16)
    model = models.ResNetGN(num_classes=3, num_groups=16)
    _, (logits, features) = _shapes(model, 8)
    assert logits.shape == (2, 3)
    assert features["stage4"].shape == (2, 1, 1, 256)


def test_groups_for_never_exceeds_channels():
    for channels in range(1, 80):
        for num_groups in range(1, 80):
            g = models.groups_for(channels, num_groups)
            assert 1 <= g <= channels
            assert g <= num_groups
            if num_groups <= channels and channels % num_groups == 0:
                assert g == num_groups
    assert models.groups_for(8, 32) == 8
    assert models.groups_for(48, 32) == 24
    assert models.groups_for(256, 32) == 32


def test_normalize_images_per_channel():
    img = np.zeros((1, 1, 2, 3), np.uint8)
    img[0, 0, 1] = 255
    out = np.asarray(models.normalize_images(jnp.asarray(img)))
    mean, std = np.asarray(models.PIXEL_MEAN), np.asarray(models.PIXEL_STD)
    np.testing.assert_allclose(out[0, 0, 0], (0.0 - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(out[0, 0, 1], (1.0 - mean) / std, rtol=1e-6)
    assert out.dtype == np.float32


@pytest.mark.parametrize("px,padding", [(32, "same"), (20, "same"), (20, "symmetric")])
def test_matmul_lowering_matches_xla_convolutions(px, padding):
    """Small-output convolutions run as patches @ kernel ("auto"); logits, every feature map and the
    parameter gradients must equal the plain XLA-convolution model ("xla") to float tolerance."""
    import dataclasses

    fast = models.ResNetGN(num_classes=3, widths=(32, 64, 128, 256), num_groups=8, padding=padding)
    plain = dataclasses.replace(fast, conv_lowering="xla")
    params = jax.jit(fast.init)(jax.random.key(0), jnp.zeros((1, px, px, 3)))["params"]
    x = jax.random.normal(jax.random.key(1), (4, px, px, 3))
    (lf, ff), (lp, fp) = fast.apply({"params": params}, x), plain.apply({"params": params}, x)
    np.testing.assert_allclose(lf, lp, rtol=1e-4, atol=1e-4)
    for name in ff:
        np.testing.assert_allclose(ff[name], fp[name], rtol=1e-4, atol=1e-4, err_msg=name)
    loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, x)[0] ** 2)  # noqa: E731
    gf, gp = jax.grad(loss(fast))(params), jax.grad(loss(plain))(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gf), jax.tree.leaves(gp)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4 * float(jnp.max(jnp.abs(b))), err_msg=str(path))


def test_conv_as_matmul_equals_lax_conv_by_shape():
    rng = np.random.default_rng(0)
    for h, k, s, cin, cout in [(1, 3, 1, 5, 4), (2, 3, 2, 3, 6), (3, 3, 1, 4, 2), (4, 1, 2, 6, 3), (5, 7, 2, 3, 4)]:
        x = jnp.asarray(rng.normal(size=(2, h, h, cin)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
        ref = jax.lax.conv_general_dilated(x, w, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        np.testing.assert_allclose(models.conv_as_matmul(x, w, s), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", [8, 9, 16])
def test_max_pool_and_its_gradient_equal_flax_max_pool(side):
    """Forward equals nn.max_pool; the gradient goes to the first maximum of each window, exactly as
    XLA's select_and_scatter, ties included (ReLU outputs have many zeros)."""
    import flax.linen as nn

    x = jax.nn.relu(jax.random.normal(jax.random.key(side), (2, side, side, 3)))
    x = jnp.round(x * 4) / 4  # many exact ties
    g = jax.random.normal(jax.random.key(1), (2, -(-side // 2), -(-side // 2), 3))
    ref_y, ref_vjp = jax.vjp(lambda v: nn.max_pool(v, (3, 3), strides=(2, 2), padding="SAME"), x)
    y, vjp = jax.vjp(models.max_pool_3x3_s2, x)
    np.testing.assert_array_equal(y, ref_y)
    got, ref = vjp(g)[0], ref_vjp(g)[0]
    np.testing.assert_array_equal(got != 0, ref != 0)  # the same elements receive gradient
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)  # sums over overlapping windows may reorder


def test_forward_flops_of_the_paper_model_by_hand():
    # 256 px, widths 32/64/128/256, 3 classes; 2 x multiply-adds, every tap of every kernel:
    #   stem 7x7/2: 128^2 * 49 * 3 * 32                       =  77,070,336 MACs
    #   stage1 (64x64): 2 x 3x3 32->32: 2 * 64^2 * 9 * 32 * 32  =  75,497,472
    #   stage2 (32x32): 3x3 32->64 + 3x3 64->64 + 1x1 32->64:
    #       32^2 * 9 * (32*64 + 64*64) + 32^2 * 32 * 64         =  58,720,256
    #   stage3 (16x16): 16^2 * 9 * (64*128 + 128*128) + 16^2 * 64 * 128 = 58,720,256
    #   stage4 (8x8):   8^2 * 9 * (128*256 + 256*256) + 8^2 * 128 * 256  = 58,720,256
    #   head: 256 * 3                                           =         768
    macs = 77_070_336 + 75_497_472 + 3 * 58_720_256 + 768
    assert models.forward_flops(input_px=256) == 2 * macs == 657_458_688
    # a second block per stage adds two 3x3 width->width convolutions at that stage's size
    extra = 2 * 2 * (64**2 * 9 * 32 * 32 + 32**2 * 9 * 64 * 64 + 16**2 * 9 * 128 * 128 + 8**2 * 9 * 256 * 256)
    assert models.forward_flops(input_px=256, blocks_per_stage=(2, 2, 2, 2)) == 2 * macs + extra


# (side, kernel, stride, cin, cout): even and odd sides with stride 2, where SAME pads asymmetrically.
SYMMETRIC_CASES = [(1, 3, 1, 5, 4), (2, 3, 2, 3, 6), (4, 1, 2, 6, 3), (6, 3, 2, 4, 5), (7, 3, 2, 2, 3), (8, 7, 2, 3, 4),
                   (9, 7, 2, 3, 4)]


def _torch_style_conv(x, w, s):
    """The reference: XLA's convolution with PyTorch's padding k // 2 on both sides."""
    k = w.shape[0]
    pads = [(k // 2, k // 2)] * 2
    return jax.lax.conv_general_dilated(x, w, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("h,k,s,cin,cout", SYMMETRIC_CASES)
def test_symmetric_conv_lowerings_equal_explicit_padding(h, k, s, cin, cout):
    """Every lowering of a "symmetric" convolution (matmul, the custom-gradient stem conv, XLA) equals
    lax.conv with padding k // 2 on both sides, and so do the custom kernel and input gradients."""
    rng = np.random.default_rng(h * 100 + k)
    x = jnp.asarray(rng.normal(size=(2, h, h, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, -(-h // s), -(-h // s), cout)), jnp.float32)  # SAME's output size

    def value_and_grads(conv):
        out, vjp = jax.vjp(conv, x, w)
        return out, vjp(g)

    ref, ref_grads = jax.jit(value_and_grads, static_argnums=0)(lambda a, b: _torch_style_conv(a, b, s))
    for name, fn in [("matmul", models.conv_as_matmul), ("xla", models._lax_conv), ("few", models.conv_few_inputs)]:
        out, grads = jax.jit(value_and_grads, static_argnums=0)(lambda a, b: fn(a, b, s, "symmetric"))  # noqa: B023
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4, err_msg=name)
        for got, want, what in zip(grads, ref_grads, ("d_x", "d_kernel")):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{name} {what}")


def test_symmetric_and_same_padding_differ_where_a_stride_meets_an_even_side():
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    same, symmetric = models._lax_conv(x, w, 2), models._lax_conv(x, w, 2, "symmetric")
    assert same.shape == symmetric.shape
    assert not np.allclose(same, symmetric, atol=1e-3)


def _numpy_max_pool_symmetric(x):
    """3x3 / stride 2 max-pool with one -inf row/column on each side (torch's MaxPool2d(3, 2, padding=1)),
    and the gradient of sum(pool * g) routed to the first maximum of each window in row-major order."""
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    y = np.empty((n, oh, ow, c), x.dtype)
    first = np.empty((n, oh, ow, c, 2), int)
    for i in range(oh):
        for j in range(ow):
            window = xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :].reshape(n, 9, c)
            arg = window.argmax(axis=1)  # the first maximum
            y[:, i, j] = window.max(axis=1)
            first[:, i, j, :, 0], first[:, i, j, :, 1] = 2 * i + arg // 3, 2 * j + arg % 3
    return y, first


@pytest.mark.parametrize("side", [7, 8, 9, 16])
def test_symmetric_max_pool_and_its_gradient_equal_numpy(side):
    x = jax.nn.relu(jax.random.normal(jax.random.key(side), (2, side, side, 3)))
    x = np.asarray(jnp.round(x * 4) / 4)  # many exact ties
    ref, first = _numpy_max_pool_symmetric(x)
    g = np.random.default_rng(side).normal(size=ref.shape).astype(np.float32)

    @jax.jit
    def pool_and_grad(v, cotangent):
        y, vjp = jax.vjp(lambda a: models.max_pool_3x3_s2(a, "symmetric"), v)
        return y, vjp(cotangent)[0]

    y, grad = pool_and_grad(jnp.asarray(x), jnp.asarray(g))
    np.testing.assert_array_equal(y, ref)
    want = np.zeros((2, side + 2, side + 2, 3), np.float64)
    for idx in np.ndindex(ref.shape):
        r, q = first[idx]
        want[idx[0], r, q, idx[3]] += g[idx]
    np.testing.assert_allclose(grad, want[:, 1:-1, 1:-1, :], rtol=1e-6, atol=1e-6)


def test_unknown_padding_is_refused():
    model = models.ResNetGN(num_classes=3, **TINY, padding="valid")
    with pytest.raises(ValueError, match="padding must be one of"):
        _shapes(model, 16)


def test_num_microbatches_by_hand():
    # 256 px, 32 stem channels, float32: a 128 x 128 x 32 stem output is 2 MiB per image
    assert models.num_microbatches(batch=32, input_px=256, stem_width=32, max_bytes=16 * 2**20) == 4
    assert models.num_microbatches(batch=8, input_px=256, stem_width=32, max_bytes=16 * 2**20) == 1
    assert models.num_microbatches(batch=12, input_px=256, stem_width=32, max_bytes=5 * 2**20) == 6  # 5 -> divisor 6
    assert models.num_microbatches(batch=7, input_px=256, stem_width=32, max_bytes=4 * 2**20) == 7  # prime batch


def test_microbatched_forward_equals_the_plain_forward_in_order():
    """Three strided microbatches give every image its own logits and feature maps, in batch order."""
    m = models.ResNetGN(num_classes=3, widths=(8, 16), blocks_per_stage=(1, 1), num_groups=4)
    x = jax.random.normal(jax.random.key(0), (12, 32, 32, 3))
    variables = m.init(jax.random.key(1), x)
    per_image = 16 * 16 * 8 * 4
    assert models.num_microbatches(batch=12, input_px=32, stem_width=8, max_bytes=per_image * 4) == 3
    got = jax.jit(lambda v, x: models.apply_in_microbatches(m, v, x, max_bytes=per_image * 4))(variables, x)
    want = m.apply(variables, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


MICROBATCHES_ON_8_DEVICES = """
import jax, numpy as np
from histokd_jax import models, parallel
assert jax.device_count() == 8
m = models.ResNetGN(num_classes=3, widths=(8, 16), blocks_per_stage=(1, 1), num_groups=4)
x = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
v = m.init(jax.random.key(1), x)
mesh = parallel.make_mesh()
budget = 16 * 16 * 8 * 4 * 8  # 8 images per microbatch: 2 microbatches, each spread over all 8 devices
assert models.num_microbatches(batch=16, input_px=32, stem_width=8, max_bytes=budget) == 2
fn = jax.jit(lambda v, x: models.apply_in_microbatches(m, v, x, max_bytes=budget),
             in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)))
got, want = fn(v, jax.device_put(x, parallel.batch_sharding(mesh))), m.apply(v, x)
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_microbatched_forward_on_a_batch_sharded_over_8_devices():
    """The strided microbatches of a batch split across devices give the plain forward's outputs, in order."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", MICROBATCHES_ON_8_DEVICES], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
