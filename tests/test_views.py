"""Paired views: block-mean downsampling, shared augmentation, colour jitter, ViewSpec guards."""

from __future__ import annotations

import numpy as np
import pytest

from histokd_jax.data import views
from histokd_jax.symmetry import DIHEDRAL as DIHEDRAL_ELEMENTS  # (mirror, quarter turns) of each index

LUMA = np.asarray([0.299, 0.587, 0.114])  # Y row of YIQ (BT.601)


def np_block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Exact block means, one output pixel per factor x factor block, in float64."""
    h, w, c = image.shape
    out = np.zeros((h // factor, w // factor, c), np.float64)
    for i in range(h // factor):
        for j in range(w // factor):
            block = image[i * factor : (i + 1) * factor, j * factor : (j + 1) * factor].astype(np.float64)
            out[i, j] = block.reshape(-1, c).mean(axis=0)
    return out


DIHEDRAL = {
    f"rot{k}{'_flip' if flip else ''}": (lambda im, k=k, flip=flip: np.rot90(im[:, ::-1] if flip else im, k))
    for flip in (False, True)
    for k in range(4)
}


def which_transform(original: np.ndarray, seen: np.ndarray) -> str:
    matches = [name for name, fn in DIHEDRAL.items() if np.array_equal(fn(original), seen)]
    assert len(matches) == 1, matches  # the test pattern is asymmetric: exactly one transform fits
    return matches[0]


def asymmetric_tile(px: int) -> np.ndarray:
    """A tile whose 8 flips/rotations all differ: coloured marks at two adjacent corners, plus noise."""
    rng = np.random.default_rng(123)
    tile = rng.integers(60, 120, size=(px, px, 3), dtype=np.uint8)
    q = px // 4
    tile[:q, :q] = (250, 10, 10)  # top-left red
    tile[:q, -q:] = (10, 250, 10)  # top-right green
    return tile


# ---------------------------------------------------------------- area_downsample


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_area_downsample_uint8_is_rounded_block_mean(factor):
    image = np.random.default_rng(factor).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    out = views.area_downsample(image, factor)
    assert out.dtype == np.uint8
    assert out.shape == (32 // factor, 48 // factor, 3)
    exact = np_block_mean(image, factor)
    assert np.max(np.abs(out.astype(np.float64) - exact)) <= 0.5
    # off the ties (x.5) the rounding is unambiguous
    not_tie = np.abs(exact - np.floor(exact) - 0.5) > 1e-9
    np.testing.assert_array_equal(out[not_tie], np.floor(exact[not_tie] + 0.5))


@pytest.mark.parametrize("factor", [2, 3, 4, 6, 8, 16, 17, 32])
def test_area_downsample_uint8_ties_round_half_to_even_at_every_factor(factor):
    """Two-valued and near-constant images put many block means on x.5 exactly: they go to the even
    neighbour, as numpy's rint of the float mean (the slides' thumbnails use factors up to 32)."""
    rng = np.random.default_rng(factor)
    for image in (rng.integers(0, 2, (2 * factor, 3 * factor, 3)).astype(np.uint8) * 255,
                  rng.integers(100, 102, (2 * factor, 3 * factor, 3)).astype(np.uint8),
                  rng.integers(0, 256, (2 * factor, 3 * factor, 3)).astype(np.uint8)):
        np.testing.assert_array_equal(views.area_downsample(image, factor), np.rint(np_block_mean(image, factor)))


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_area_downsample_float_is_exact_block_mean(factor):
    image = np.random.default_rng(10 + factor).uniform(size=(16, 24, 3)).astype(np.float32)
    out = views.area_downsample(image, factor)
    np.testing.assert_allclose(out, np_block_mean(image, factor), rtol=1e-6, atol=1e-6)


def test_area_downsample_hand_example():
    image = np.asarray([[0, 2, 10, 10], [4, 6, 10, 10]], np.uint8)[..., None]  # 2x4, one channel
    np.testing.assert_array_equal(views.area_downsample(image, 2)[..., 0], [[3, 10]])


def test_area_downsample_factor_one_is_identity():
    image = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(views.area_downsample(image, 1), image)


@pytest.mark.parametrize("shape,factor", [((30, 32, 3), 4), ((32, 30, 3), 4), ((9, 9, 3), 2), ((24, 24, 3), 16)])
def test_area_downsample_rejects_non_divisible(shape, factor):
    with pytest.raises(ValueError):
        views.area_downsample(np.zeros(shape, np.uint8), factor)


# ---------------------------------------------------------------- make_views


@pytest.mark.parametrize("factor", [1, 2, 4, 8, 16])
def test_student_view_is_downsample_of_teacher_view(factor):
    spec = views.ViewSpec(teacher_px=32, downsample=factor, jitter=(0.3, 0.3, 0.3, 0.1))
    tile = np.random.default_rng(1).integers(0, 256, size=(40, 44, 3), dtype=np.uint8)
    for seed in range(6):
        out = views.make_views({"image": tile, "label": 1, "has_label": True}, spec=spec, rng=np.random.default_rng(seed))
        assert out["teacher_image"].shape == (32, 32, 3) and out["teacher_image"].dtype == np.uint8
        assert out["student_image"].shape == (32 // factor, 32 // factor, 3)
        assert out["student_image"].dtype == np.uint8
        exact = np_block_mean(out["teacher_image"], factor)
        assert np.max(np.abs(out["student_image"].astype(np.float64) - exact)) <= 0.5
        np.testing.assert_array_equal(out["student_image"], views.area_downsample(out["teacher_image"], factor))


def test_random_crop_lies_inside_the_tile():
    # with no augmentation the teacher view must be some window of the tile
    spec = views.ViewSpec(teacher_px=16, downsample=2, flips=False, rot90=False)
    tile = np.random.default_rng(2).integers(0, 256, size=(24, 20, 3), dtype=np.uint8)
    offsets = set()
    for seed in range(30):
        teacher = views.make_views({"image": tile, "label": 0, "has_label": True}, spec=spec, rng=np.random.default_rng(seed))[
            "teacher_image"
        ]
        found = [(y, x) for y in range(24 - 16 + 1) for x in range(20 - 16 + 1) if np.array_equal(tile[y : y + 16, x : x + 16], teacher)]
        assert len(found) == 1
        offsets |= set(found)
    assert len(offsets) > 1  # the crop position is random


def test_eval_view_is_central_crop_unaugmented():
    spec = views.ViewSpec(teacher_px=32, downsample=4, jitter=(0.4, 0.4, 0.4, 0.2))
    tile = asymmetric_tile(40)
    out = views.make_views({"image": tile, "label": 2, "has_label": False}, spec=spec, rng=None)
    np.testing.assert_array_equal(out["teacher_image"], tile[4:36, 4:36])  # (40 - 32) / 2 = 4
    np.testing.assert_array_equal(out["student_image"], views.area_downsample(tile[4:36, 4:36], 4))
    assert out["label"] == 2 and out["label"].dtype == np.int32
    assert out["has_label"] == np.False_ and out["has_label"].dtype == np.bool_


def test_eval_view_odd_margin_crop():
    spec = views.ViewSpec(teacher_px=8, downsample=2)
    tile = np.arange(11 * 13 * 3, dtype=np.int64).reshape(11, 13, 3).astype(np.uint8)
    out = views.make_views({"image": tile, "label": 0, "has_label": True}, spec=spec, rng=None)
    np.testing.assert_array_equal(out["teacher_image"], tile[1:9, 2:10])  # floor((11-8)/2)=1, floor((13-8)/2)=2


def test_both_views_get_the_same_flip_and_rotation():
    spec = views.ViewSpec(teacher_px=32, downsample=4)  # flips and rot90 on, no colour jitter
    tile = asymmetric_tile(32)
    small = views.area_downsample(tile, 4)
    assert len({name for name, fn in DIHEDRAL.items() if np.array_equal(fn(small), small)}) == 1  # still asymmetric
    seen = set()
    for seed in range(200):
        out = views.make_views({"image": tile, "label": 0, "has_label": True}, spec=spec, rng=np.random.default_rng(seed))
        name = which_transform(tile, out["teacher_image"])
        assert which_transform(small, out["student_image"]) == name
        seen.add(name)
    assert seen == set(DIHEDRAL)  # all 8 symmetries of the square occur


def test_augmentation_flags_are_respected():
    tile = asymmetric_tile(16)
    element = {"image": tile, "label": 0, "has_label": True}
    none = views.ViewSpec(teacher_px=16, downsample=2, flips=False, rot90=False)
    rot_only = views.ViewSpec(teacher_px=16, downsample=2, flips=False, rot90=True)
    seen_none, seen_rot = set(), set()
    for seed in range(60):
        seen_none.add(which_transform(tile, views.make_views(element, spec=none, rng=np.random.default_rng(seed))["teacher_image"]))
        seen_rot.add(which_transform(tile, views.make_views(element, spec=rot_only, rng=np.random.default_rng(seed))["teacher_image"]))
    assert seen_none == {"rot0"}
    assert seen_rot == {"rot0", "rot1", "rot2", "rot3"}


def test_make_views_is_deterministic_given_the_rng_seed():
    spec = views.ViewSpec(teacher_px=24, downsample=2, jitter=(0.3, 0.3, 0.3, 0.1))
    tile = np.random.default_rng(3).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    element = {"image": tile, "label": 0, "has_label": True}
    a = views.make_views(element, spec=spec, rng=np.random.default_rng(7))
    b = views.make_views(element, spec=spec, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a["teacher_image"], b["teacher_image"])
    outs = [views.make_views(element, spec=spec, rng=np.random.default_rng(s))["teacher_image"] for s in range(5)]
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])


def test_crop_rejects_small_tiles():
    spec = views.ViewSpec(teacher_px=32, downsample=2)
    with pytest.raises(ValueError):
        views.make_views({"image": np.zeros((30, 40, 3), np.uint8), "label": 0, "has_label": True}, spec=spec, rng=None)


# ---------------------------------------------------------------- color_jitter


def _greyish(seed, shape=(12, 10, 3)):
    """Low-saturation colours around mid-grey: no jitter below pushes them out of [0, 1]."""
    return (0.5 + np.random.default_rng(seed).uniform(-0.1, 0.1, size=shape)).astype(np.float32)


def test_color_jitter_zero_strength_is_identity():
    image = np.random.default_rng(0).uniform(size=(8, 8, 3)).astype(np.float32)
    out = views.color_jitter(image, np.random.default_rng(0), brightness=0, contrast=0, saturation=0, hue=0)
    np.testing.assert_array_equal(out, image)


def test_hue_rotation_keeps_luma_and_changes_colour():
    image = _greyish(1)
    changed = False
    for seed in range(5):
        out = views.color_jitter(image, np.random.default_rng(seed), brightness=0, contrast=0, saturation=0, hue=0.5)
        np.testing.assert_allclose(out @ LUMA, image @ LUMA, atol=1e-5)
        # the chroma magnitude is kept too (a rotation of the I, Q plane)
        yiq = np.asarray(views._RGB_TO_YIQ, np.float64)
        chroma = lambda im: np.hypot(*(im.astype(np.float64) @ yiq[1:].T).transpose(2, 0, 1))  # noqa: E731
        np.testing.assert_allclose(chroma(out), chroma(image), atol=1e-5)
        changed |= not np.allclose(out, image, atol=1e-3)
    assert changed


def test_saturation_keeps_per_pixel_luma():
    image = _greyish(2)
    out = views.color_jitter(image, np.random.default_rng(3), brightness=0, contrast=0, saturation=0.5, hue=0)
    np.testing.assert_allclose(out @ LUMA, image @ LUMA, atol=1e-5)
    assert not np.allclose(out, image, atol=1e-4)


def test_contrast_keeps_mean_luma():
    image = _greyish(4)
    out = views.color_jitter(image, np.random.default_rng(5), brightness=0, contrast=0.5, saturation=0, hue=0)
    np.testing.assert_allclose((out @ LUMA).mean(), (image @ LUMA).mean(), atol=1e-5)
    assert not np.allclose(out, image, atol=1e-4)


def test_brightness_scales_every_value_by_one_factor_in_range():
    image = _greyish(6)
    out = views.color_jitter(image, np.random.default_rng(7), brightness=0.4, contrast=0, saturation=0, hue=0)
    ratio = out / image
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)
    assert 0.6 <= ratio.flat[0] <= 1.4


def test_color_jitter_output_stays_in_unit_range():
    rng = np.random.default_rng(8)
    for seed in range(10):
        image = rng.uniform(size=(6, 6, 3)).astype(np.float32)
        out = views.color_jitter(image, np.random.default_rng(seed), brightness=0.9, contrast=0.9, saturation=0.9, hue=0.5)
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert out.shape == image.shape


# ---------------------------------------------------------------- ViewSpec


def test_viewspec_guards():
    with pytest.raises(ValueError):
        views.ViewSpec(teacher_px=48, downsample=3)
    with pytest.raises(ValueError):
        views.ViewSpec(teacher_px=30, downsample=4)
    with pytest.raises(ValueError):
        views.ViewSpec(teacher_px=36, downsample=8)
    spec = views.ViewSpec(teacher_px=32, downsample=8)
    assert spec.student_px == 4
    assert views.ViewSpec(teacher_px=30, downsample=2).student_px == 15


def _jitter_one_by_one(image, rng, brightness, contrast, saturation, hue):
    """Reference: the four colour operations applied sequentially, as torchvision describes them."""
    yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    if brightness:
        image = image * rng.uniform(1 - brightness, 1 + brightness)
    if contrast:
        grey = image @ yiq[0]
        image = (image - grey.mean()) * rng.uniform(1 - contrast, 1 + contrast) + grey.mean()
    if saturation:
        grey = (image @ yiq[0])[..., None]
        image = (image - grey) * rng.uniform(1 - saturation, 1 + saturation) + grey
    if hue:
        angle = 2 * np.pi * rng.uniform(-hue, hue)
        rotate = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
        image = image @ (np.linalg.inv(yiq) @ rotate @ yiq).T
    return np.clip(image, 0, 1)


@pytest.mark.parametrize("strengths", [(0.5, 0.5, 0.5, 0.2), (0.1, 0.0, 0.3, 0.0), (0.0, 0.4, 0.0, 0.1)])
def test_fused_color_jitter_equals_the_operations_one_by_one(strengths):
    image = np.random.default_rng(1).random((32, 32, 3)).astype(np.float32)
    b, c, s, h = strengths
    expected = _jitter_one_by_one(image.astype(np.float64), np.random.default_rng(5), b, c, s, h)
    got = views.color_jitter(image, np.random.default_rng(5), brightness=b, contrast=c, saturation=s, hue=h)
    np.testing.assert_allclose(got, expected, atol=1e-5)


# ---------------------------------------------------------------- scanner-like student views


def smooth_tile(px: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus mild noise: JPEG and any smoothing filter keep its block means close."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:px, 0:px] / px
    base = np.stack([150 + 60 * np.sin(3 * xx + 1), 90 + 50 * yy, 170 - 40 * xx * yy], -1)
    return np.clip(np.rint(base + rng.normal(0, 4, base.shape)), 0, 255).astype(np.uint8)


def pil_level(image: np.ndarray, factor: int, resample, quality: int) -> np.ndarray:
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(image).resize((image.shape[1] // factor, image.shape[0] // factor), resample).save(
        buffer, format="JPEG", quality=quality, subsampling="4:2:0")
    return np.asarray(Image.open(buffer).convert("RGB"))


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_a_scanlike_view_is_one_filter_and_one_jpeg_quality_of_the_drawn_range(factor):
    tile = smooth_tile(64, seed=factor)
    from PIL import Image
    candidates = {(f, q): pil_level(tile, factor, f, q) for f in (Image.Resampling.LANCZOS, Image.Resampling.BICUBIC)
                  for q in range(70, 96)}
    seen = set()
    for seed in range(40):
        out = views.scanlike_downsample(tile, factor, np.random.default_rng(seed))
        matches = [key for key, ref in candidates.items() if np.array_equal(out, ref)]
        assert matches, "not a Lanczos/bicubic resize + JPEG q70-95 of the tile"
        seen.add(matches[0][0])
        # a normalised smoothing filter and JPEG's DC terms keep the mean colour
        np.testing.assert_allclose(out.reshape(-1, 3).mean(0), tile.reshape(-1, 3).mean(0), atol=2.5)
        assert not np.array_equal(out, views.area_downsample(tile, factor))
    assert len(seen) == 2  # both filters are drawn


def test_scanlike_share_of_training_views_and_none_in_evaluation():
    tile = smooth_tile(64, seed=9)
    element = {"image": tile, "label": 0, "has_label": True}
    spec = views.ViewSpec(teacher_px=64, downsample=4, flips=False, rot90=False, scanlike=0.5)
    block_means = sum(np.array_equal(v["student_image"], views.area_downsample(v["teacher_image"], 4))
                      for v in (views.make_views(element, spec=spec, rng=np.random.default_rng(s)) for s in range(400)))
    assert 160 <= block_means <= 240  # Binomial(400, 0.5): mean 200, sd 10
    evaluation = views.make_views(element, spec=spec, rng=None)
    np.testing.assert_array_equal(evaluation["student_image"], views.area_downsample(tile, 4))
    # share 0: every training view is the block mean and the random stream is the one it always was
    plain = views.ViewSpec(teacher_px=64, downsample=4, jitter=(0.3, 0.3, 0.3, 0.1))
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    views.make_views(element, spec=plain, rng=rng_a)
    views.crop(tile, 64, rng_b), rng_b.random(), rng_b.integers(0, 4)  # crop, flip, turns; then the jitter's draws
    views.color_jitter(np.zeros((1, 1, 3), np.float32), rng_b, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1)
    assert rng_a.random() == rng_b.random()
    with pytest.raises(ValueError, match="scanlike"):
        views.ViewSpec(teacher_px=64, downsample=4, scanlike=1.5)


def _marked_tile(px: int, mark: int) -> np.ndarray:
    """``asymmetric_tile`` with record ``mark``'s own noise: no two records share pixels."""
    noise = np.random.default_rng(1000 + mark).integers(0, 40, size=(px, px, 3))
    return np.clip(asymmetric_tile(px).astype(np.int64) + noise, 0, 255).astype(np.uint8)


def test_a_batch_of_drawn_records_gets_each_records_own_flip_and_turn():
    # the loader's two halves on a batch of 48: record i must be its own crop, flipped then turned as its
    # own random stream says (decoded here by hand), and its student view the block mean of that
    spec = views.ViewSpec(teacher_px=32, downsample=4)
    tiles = [_marked_tile(32, i) for i in range(48)]
    drawn = [views.draw_train_views({"image": tiles[i], "label": i, "has_label": True}, spec=spec,
                                    rng=np.random.default_rng(100 + i)) for i in range(48)]
    batch = views.finish_train_views({k: np.stack([d[k] for d in drawn]) for k in drawn[0]}, spec=spec)
    for i in range(48):
        rng = np.random.default_rng(100 + i)
        rng.integers(0, 1), rng.integers(0, 1)  # the crop's offsets: the tile is the crop's size
        mirror, turns = rng.random() < 0.5, int(rng.integers(0, 4))
        expected = np.rot90(tiles[i][:, ::-1] if mirror else tiles[i], k=turns)
        np.testing.assert_array_equal(batch["teacher_image"][i], expected)
        assert np.max(np.abs(batch["student_image"][i] - np_block_mean(expected, 4))) <= 0.5
        assert batch["label"][i] == i
    assert len({(d["dihedral"]).item() for d in drawn}) == 8  # the batch mixes all eight elements


def test_a_batch_mixing_scanner_like_and_block_mean_students_turns_each_with_its_record():
    spec = views.ViewSpec(teacher_px=32, downsample=4, scanlike=0.5)  # flips and turns on
    tiles = [_marked_tile(32, i) for i in range(32)]
    drawn = [views.draw_train_views({"image": tiles[i], "label": 0, "has_label": True}, spec=spec,
                                    rng=np.random.default_rng(200 + i)) for i in range(32)]
    batch = views.finish_train_views({k: np.stack([d[k] for d in drawn]) for k in drawn[0]}, spec=spec)
    scanned = [bool(d["scanned"]) for d in drawn]
    assert 0 < sum(scanned) < 32
    for i, d in enumerate(drawn):
        mirror, turns = DIHEDRAL_ELEMENTS[int(d["dihedral"])]
        def turn(x):
            return np.rot90(x[:, ::-1] if mirror else x, k=turns)
        np.testing.assert_array_equal(batch["teacher_image"][i], turn(tiles[i]))
        if scanned[i]:  # the scanner-like level of the unturned crop, turned with its record
            np.testing.assert_array_equal(batch["student_image"][i], turn(d["scan_student"]))
            assert not np.array_equal(batch["student_image"][i], views.area_downsample(turn(tiles[i]), 4))
        else:
            assert np.max(np.abs(batch["student_image"][i] - np_block_mean(turn(tiles[i]), 4))) <= 0.5
