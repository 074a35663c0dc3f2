"""Tile folders -> records -> grain loaders, on a small folder of identifiable PNG tiles."""

from __future__ import annotations

import itertools
import pathlib

import numpy as np
import pytest
from PIL import Image

from histokd_jax.data import sources, tile_images
from histokd_jax.data.pipeline import eval_batches, make_train_loader
from histokd_jax.data.views import ViewSpec, area_downsample

TILE_PX = 32
PER_CLASS = 8
N_UNLABELED = 6
# created in this (unsorted) order; labels follow the sorted names: normal = 0, tumor = 1
CLASS_FOLDERS = ("tumor", "normal")
SPEC = ViewSpec(teacher_px=24, downsample=4)  # random 24 px crop, flips, rot90; no colour jitter
N_RECORDS = 2 * PER_CLASS + N_UNLABELED  # 22


def tile_pixels(tile_id: int) -> np.ndarray:
    """Red channel = an id code, constant over the tile (survives crops, flips, rotations);
    green/blue = noise, so downsampling has something to average."""
    rng = np.random.default_rng(1000 + tile_id)
    pixels = rng.integers(0, 256, size=(TILE_PX, TILE_PX, 3), dtype=np.uint8)
    pixels[..., 0] = red_code(tile_id)
    return pixels


def red_code(tile_id: int) -> int:
    return 10 + 10 * tile_id


def identify(image: np.ndarray) -> int:
    red = np.unique(image[..., 0])
    assert len(red) == 1, "a view mixes tiles"
    return (int(red[0]) - 10) // 10


def build_tree(root: pathlib.Path) -> dict[str, tuple[int, int]]:
    """root/train/<class>/*.png and root/unlabeled/**/*.png; returns path -> (tile id, expected label)."""
    truth = {}
    tile_id = 0
    for name in CLASS_FOLDERS:
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            path = folder / f"tile_{i:02d}.png"
            Image.fromarray(tile_pixels(tile_id)).save(path)
            truth[str(path)] = (tile_id, sorted(CLASS_FOLDERS).index(name))
            tile_id += 1
    for i in range(N_UNLABELED):
        folder = root / "unlabeled" / ("slide_a" if i % 2 else "slide_b" / pathlib.Path("deeper"))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"u_{i}.png"
        Image.fromarray(tile_pixels(tile_id)).save(path)
        truth[str(path)] = (tile_id, -1)
        tile_id += 1
    (root / "unlabeled" / "notes.txt").write_text("not an image")
    return truth


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles")
    return root, build_tree(root)


@pytest.fixture(scope="module")
def source(tree):
    root, _ = tree
    names = sources.find_class_names(root)
    return sources.TileSource(sources.scan_split(root, "train", class_names=names) + sources.scan_unlabeled(root))


@pytest.fixture(scope="module")
def id_to_label(tree):
    _, truth = tree
    return {tile_id: label for tile_id, label in truth.values()}


# ---------------------------------------------------------------- sources


def test_class_names_are_sorted_folder_names(tree):
    root, _ = tree
    assert sources.find_class_names(root) == ("normal", "tumor")


def test_scan_labels_from_folders_and_unlabelled_pool(tree):
    root, truth = tree
    labelled = sources.scan_split(root, "train", class_names=("normal", "tumor"))
    unlabelled = sources.scan_unlabeled(root)
    assert len(labelled) == 2 * PER_CLASS and len(unlabelled) == N_UNLABELED  # notes.txt is not a tile
    for record in labelled + unlabelled:
        assert record.label == truth[record.path][1]
    assert {r.path for r in labelled + unlabelled} == set(truth)
    assert sources.scan_unlabeled(root, folder="absent") == []


def test_source_items(source, tree):
    _, truth = tree
    assert len(source) == N_RECORDS
    for i in range(len(source)):
        item = source[i]
        tile_id, label = truth[source.records[i].path]
        np.testing.assert_array_equal(item["image"], tile_pixels(tile_id))  # PNG is lossless
        assert item["image"].dtype == np.uint8 and item["image"].shape == (TILE_PX, TILE_PX, 3)
        assert item["label"] == label
        assert bool(item["has_label"]) == (label != -1)
    np.testing.assert_array_equal(source.labels(), [truth[r.path][1] for r in source.records])


def test_stray_folder_is_an_error(tmp_path):
    build_tree(tmp_path)
    (tmp_path / "train" / "stroma").mkdir()
    Image.fromarray(tile_pixels(0)).save(tmp_path / "train" / "stroma" / "x.png")
    with pytest.raises(ValueError, match="stroma"):
        sources.scan_split(tmp_path, "train", class_names=("normal", "tumor"))
    # a class list missing a present folder is the same error
    with pytest.raises(ValueError, match="tumor"):
        sources.scan_split(tmp_path, "train", class_names=("normal", "stroma"))


def test_missing_split_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        sources.find_class_names(tmp_path)
    with pytest.raises(FileNotFoundError):
        sources.scan_split(tmp_path, "val", class_names=("a",))


def test_unreadable_tile_names_its_path(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png at all" * 10)
    with pytest.raises(OSError, match="broken.png"):
        tile_images.load_rgb(str(bad))
    with pytest.raises(OSError, match=str(bad).replace("\\", "\\\\")):
        sources.TileSource([sources.TileRecord(str(bad), 0)])[0]


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, ..., 3] = 255  # top half opaque red-ish, bottom half fully transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    rgb = tile_images.load_rgb(str(path))
    np.testing.assert_array_equal(rgb[:2], np.broadcast_to([200, 0, 0], (2, 4, 3)))
    np.testing.assert_array_equal(rgb[2:], np.full((2, 4, 3), 255))


# ---------------------------------------------------------------- training loader


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_train_batches_have_documented_layout(source, id_to_label):
    loader = make_train_loader(source, spec=SPEC, batch_size=4, seed=0)
    for batch in _take(iter(loader), 3):
        assert set(batch) == {"teacher_image", "student_image", "label", "has_label"}
        assert batch["teacher_image"].shape == (4, 24, 24, 3) and batch["teacher_image"].dtype == np.uint8
        assert batch["student_image"].shape == (4, 6, 6, 3) and batch["student_image"].dtype == np.uint8
        assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
        assert batch["has_label"].shape == (4,) and batch["has_label"].dtype == np.bool_
        for i in range(4):
            teacher, student = batch["teacher_image"][i], batch["student_image"][i]
            np.testing.assert_array_equal(student, area_downsample(teacher, 4))
            # the block mean, computed here
            exact = teacher.reshape(6, 4, 6, 4, 3).astype(np.float64).mean(axis=(1, 3))
            assert np.max(np.abs(student - exact)) <= 0.5
            tile_id = identify(teacher)
            assert identify(student) == tile_id
            assert batch["label"][i] == id_to_label[tile_id]
            assert bool(batch["has_label"][i]) == (id_to_label[tile_id] != -1)


def test_same_seed_same_batches_different_seed_different(source):
    a = _take(iter(make_train_loader(source, spec=SPEC, batch_size=4, seed=7)), 2)
    b = _take(iter(make_train_loader(source, spec=SPEC, batch_size=4, seed=7)), 2)
    c = _take(iter(make_train_loader(source, spec=SPEC, batch_size=4, seed=8)), 2)
    for x, y in zip(a, b):
        _assert_batches_equal(x, y)
    assert any(not np.array_equal(x["teacher_image"], z["teacher_image"]) for x, z in zip(a, c))


def test_iterator_state_resumes_exactly(source):
    iterator = iter(make_train_loader(source, spec=SPEC, batch_size=4, seed=3))
    _take(iterator, 3)
    state = iterator.get_state()
    expected = _take(iterator, 2)
    # a fresh loader, as after a restart
    resumed = iter(make_train_loader(source, spec=SPEC, batch_size=4, seed=3))
    resumed.set_state(state)
    for x, y in zip(expected, _take(resumed, 2)):
        _assert_batches_equal(x, y)
    # and the state really encodes the position: a fresh iterator gives different batches
    fresh = _take(iter(make_train_loader(source, spec=SPEC, batch_size=4, seed=3)), 2)
    assert any(not np.array_equal(x["teacher_image"], f["teacher_image"]) for x, f in zip(expected, fresh))


def test_every_record_once_per_epoch_and_reshuffled(source):
    # 22 records, batches of 2: each epoch is exactly 11 batches
    iterator = iter(make_train_loader(source, spec=SPEC, batch_size=2, seed=5))
    order = [identify(img) for batch in _take(iterator, 2 * N_RECORDS // 2) for img in batch["teacher_image"]]
    first, second = order[:N_RECORDS], order[N_RECORDS:]
    assert sorted(first) == list(range(N_RECORDS))
    assert sorted(second) == list(range(N_RECORDS))
    assert first != list(range(N_RECORDS))  # shuffled
    assert first != second  # reshuffled per epoch


def test_train_loader_needs_a_full_batch(source):
    with pytest.raises(ValueError):
        make_train_loader(source, spec=SPEC, batch_size=N_RECORDS + 1, seed=0)


@pytest.fixture(scope="module")
def batches_by_worker_count(source):
    """The first 4 batches (16 of the 22 records) with 0 and with 2 worker processes."""
    return {
        workers: _take(iter(make_train_loader(source, spec=SPEC, batch_size=4, seed=11, workers=workers)), 4)
        for workers in (0, 2)
    }


def _views_by_tile(batches):
    out = {}
    for batch in batches:
        for teacher, student in zip(batch["teacher_image"], batch["student_image"]):
            out[identify(teacher)] = (np.array(teacher), np.array(student))
    return out


@pytest.mark.slow
def test_worker_processes_give_the_same_views_per_record(batches_by_worker_count):
    """Documented: augmentation is seeded from (seed, position), so it does not depend on the worker count."""
    serial = _views_by_tile(batches_by_worker_count[0])
    parallel = _views_by_tile(batches_by_worker_count[2])
    assert sorted(serial) == sorted(parallel)  # the same 16 records (same shuffled stream)
    for tile_id, (teacher, student) in serial.items():
        np.testing.assert_array_equal(parallel[tile_id][0], teacher)
        np.testing.assert_array_equal(parallel[tile_id][1], student)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(batches_by_worker_count):
    for x, y in zip(batches_by_worker_count[0], batches_by_worker_count[2]):
        _assert_batches_equal(x, y)


# ---------------------------------------------------------------- eval batches


def test_eval_batches_cover_records_in_order_with_padding_masked(source, tree):
    _, truth = tree
    spec = ViewSpec(teacher_px=24, downsample=4, jitter=(0.5, 0.5, 0.5, 0.2))  # eval must ignore all of it
    batches = list(eval_batches(source, spec=spec, global_batch_size=8))
    assert len(batches) == 3  # ceil(22 / 8)
    seen = []
    for batch, valid in batches:
        assert batch["teacher_image"].shape == (8, 24, 24, 3)
        assert batch["student_image"].shape == (8, 6, 6, 3)
        assert batch["label"].shape == (8,) and valid.shape == (8,)
        for i in range(8):
            np.testing.assert_array_equal(batch["student_image"][i], area_downsample(batch["teacher_image"][i], 4))
        seen.append((batch, valid))

    valid_all = np.concatenate([v for _, v in seen])
    np.testing.assert_array_equal(valid_all, np.arange(24) < N_RECORDS)  # the last 2 rows are padding
    teacher_all = np.concatenate([b["teacher_image"] for b, _ in seen])
    labels_all = np.concatenate([b["label"] for b, _ in seen])
    for i in range(N_RECORDS):
        tile_id, label = truth[source.records[i].path]
        np.testing.assert_array_equal(teacher_all[i], tile_pixels(tile_id)[4:28, 4:28])  # central, unaugmented
        assert labels_all[i] == label
    for i in range(N_RECORDS, 24):  # padding: copies of record 0
        np.testing.assert_array_equal(teacher_all[i], teacher_all[0])


def test_eval_batches_exact_multiple_has_no_padding(source):
    batches = list(itertools.islice(eval_batches(source, spec=SPEC, global_batch_size=11), 5))
    assert len(batches) == 2
    assert all(valid.all() for _, valid in batches)
