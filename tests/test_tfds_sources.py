"""TFDS array_record sources: built and read without TensorFlow, and without any network."""

import pickle
import re
import socket
import sys

import grain
import ml_collections
import numpy as np
import pytest
from PIL import Image

from histokd_jax.data import sources, tfds_sources
from histokd_jax.data import splits as data_splits
from histokd_jax.data.splits import resolve_downsample

CLASSES = ("adipose", "lympho", "tumor")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tile folder of distinct 32 px tiles (one RGBA, one grayscale) and its array_record dataset."""
    root = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)).save(root / "train" / "tumor" / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / "val" / "lympho" / "grey.png")
    (root / "unlabeled").mkdir()  # not a labelled split: skipped
    data_dir = tmp_path_factory.mktemp("tfds")
    folder = tfds_sources.build_array_record(root, data_dir, name="toy_tiles", class_names=CLASSES)
    return root, data_dir, folder


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_round_trip_exact_pixels_and_labels(built, split):
    root, data_dir, folder = built
    assert folder.is_dir() and any(folder.glob(f"toy_tiles-{split}.array_record*"))
    ref = sources.TileSource(sources.scan_split(root, split, class_names=CLASSES))
    got = tfds_sources.tfds_split("toy_tiles", split=split, data_dir=data_dir)
    assert len(got) == len(ref)
    key = lambda e: (int(e["label"]), e["image"].tobytes())  # noqa: E731
    expected = sorted(key(ref[i]) for i in range(len(ref)))
    assert sorted(key(got[i]) for i in range(len(got))) == expected  # PNG is lossless: exact pixels
    element = got[0]
    assert element["image"].dtype == np.uint8 and element["image"].shape == (32, 32, 3)
    assert element["label"].dtype == np.int32 and element["has_label"]
    assert sorted(got.labels().tolist()) == sorted(ref.labels().tolist())
    assert got.labels().dtype == np.int32
    assert "tensorflow" not in sys.modules


def test_grain_reads_the_built_dataset(built):
    _, data_dir, _ = built
    source = tfds_sources.tfds_split("toy_tiles", split="train[:50%]", data_dir=data_dir)
    source = pickle.loads(pickle.dumps(source))  # what grain worker processes receive
    loader = grain.DataLoader(
        data_source=source,
        sampler=grain.samplers.IndexSampler(num_records=len(source), shuffle=False, num_epochs=1, seed=0),
        worker_count=0,
    )
    elements = list(loader)
    assert len(elements) == len(source) == 5  # TFDS slicing: half of 10 records
    assert all(e["image"].shape == (32, 32, 3) for e in elements)
    batch = grain.MapDataset.source(source).batch(5)[0]
    assert batch["image"].shape == (5, 32, 32, 3) and batch["label"].dtype == np.int32


def _tfds_data(data_dir, **overrides) -> ml_collections.ConfigDict:
    from histokd_jax.configs import common

    data = common.get_config().data
    data.update({**dict(kind="tfds", tfds_name="toy_tiles", tfds_data_dir=str(data_dir), class_names=(),
                        train_split="train", val_split="val", test_split="test"), **overrides})
    return data


def test_load_tfds_splits_from_a_config(built):
    _, data_dir, _ = built
    from histokd_jax.data.splits import DataSplits

    data = _tfds_data(data_dir)
    splits = data_splits.load_tfds_splits(data)
    assert isinstance(splits, DataSplits) and splits.class_names == CLASSES
    assert splits.counts == {"train": 10, "unlabeled": 0, "val": 7, "test": 6}
    data.class_names = ("a", "b")
    with pytest.raises(ValueError, match="do not match the labels of toy_tiles"):
        data_splits.load_tfds_splits(data)


def test_class_names_are_checked_by_name_and_order(built):
    _, data_dir, _ = built
    assert data_splits.load_tfds_splits(_tfds_data(data_dir, class_names=CLASSES)).class_names == CLASSES
    swapped = (CLASSES[1], CLASSES[0], CLASSES[2])  # the right names, the wrong order: labels 0 and 1 swapped
    with pytest.raises(ValueError, match=r"label i is the i-th name.*class_names=.*adipose.*lympho.*tumor"):
        data_splits.load_tfds_splits(_tfds_data(data_dir, class_names=swapped))
    # datasets whose labels are only numbers (e.g. patch_camelyon's "0", "1") take any names of that count
    assert tfds_sources.check_class_names(("normal", "tumor"), ("0", "1"), dataset="x") == ("normal", "tumor")
    with pytest.raises(ValueError):
        tfds_sources.check_class_names(("normal",), ("0", "1"), dataset="x")


def test_the_pool_honours_unlabeled_split_use_unlabeled_and_fraction(built):
    _, data_dir, _ = built
    labelled = tfds_sources.tfds_split("toy_tiles", split="train[:60%]", data_dir=data_dir)
    rest = tfds_sources.tfds_split("toy_tiles", split="train[60%:]", data_dir=data_dir)
    assert (len(labelled), len(rest)) == (6, 4)
    pool_of = lambda **kw: data_splits.load_tfds_splits(_tfds_data(  # noqa: E731
        data_dir, train_split="train[:60%]", unlabeled_split="train[60%:]", **kw)).pool
    pool = pool_of()
    assert len(pool) == 10
    got = [pool[i] for i in range(len(pool))]
    assert [bool(e["has_label"]) for e in got] == [True] * 6 + [False] * 4  # the pool's labels are never read
    np.testing.assert_array_equal(got[7]["image"], rest[1]["image"])
    np.testing.assert_array_equal(pool.labels(), [*labelled.labels(), -1, -1, -1, -1])
    half = pool_of(unlabeled_fraction=0.5)
    assert len(half) == 6 + 2 and not half[7]["has_label"]
    without = lambda **kw: data_splits.load_tfds_splits(_tfds_data(  # noqa: E731
        data_dir, train_split="train[:60%]", use_unlabeled=False, **kw)).pool
    assert len(without()) == 6
    with pytest.raises(ValueError, match="no unlabelled pool"):  # 25% of nothing is not a pool-size experiment
        without(unlabeled_fraction=0.25)
    assert repr(half) != repr(pool) and repr(pool_of()) == repr(pool)  # named by content, for resuming


def test_unlabeled_split_without_use_unlabeled_is_an_error(built):
    _, data_dir, _ = built
    data = _tfds_data(data_dir, train_split="train[:60%]", unlabeled_split="train[60%:]", use_unlabeled=False)
    with pytest.raises(ValueError, match=r"data\.unlabeled_split.*data\.use_unlabeled.*--config\.data\.use_unlabeled=True"):
        data_splits.load_tfds_splits(data)


@pytest.mark.parametrize("split, unlabeled, overlaps", [
    ("train[:60%]", "train[50%:]", "train"),  # the last 10% of the labelled split
    ("train", "val[:1]", "val"),  # one record of val
    ("train", "val[:50%]+test[-1:]", "val"),
    ("train", "train[:-1]+test[-1:]", "train"),
    ("train[:60%]", "train[60%:]+test[-1:]", "test"),  # only the last record of test
    ("train", "all", "train"),
])
def test_an_unlabeled_split_overlapping_train_val_or_test_is_refused(built, split, unlabeled, overlaps):
    _, data_dir, _ = built
    data = _tfds_data(data_dir, train_split=split, unlabeled_split=unlabeled)
    with pytest.raises(ValueError, match=rf"unlabeled_split='{re.escape(unlabeled)}' overlaps the "
                                         rf"'{re.escape(overlaps)}.*would leak into distillation"):
        data_splits.load_tfds_splits(data)


def test_a_disjoint_unlabeled_split_is_accepted(built):
    _, data_dir, _ = built
    splits = data_splits.load_tfds_splits(_tfds_data(data_dir, train_split="train[:60%]",
                                                      unlabeled_split="train[60%:]"))
    assert splits.counts == {"train": 6, "unlabeled": 4, "val": 7, "test": 6}
    # the same data cut the other way round, val and test sliced too: still disjoint
    splits = data_splits.load_tfds_splits(_tfds_data(
        data_dir, train_split="train[3:]", val_split="val[:4]", test_split="test[:-1]",
        unlabeled_split="train[:3]+val[4:]+test[-1:]"))
    assert splits.counts == {"train": 7, "unlabeled": 3 + 3 + 1, "val": 4, "test": 5}


def test_crc_cuts_its_unlabeled_split_from_train_only_where_val_and_test_are_not():
    from types import SimpleNamespace

    from histokd_jax.configs import crc

    data = crc.get_config().data
    labelled = {k: data[k] for k in ("train_split", "val_split", "test_split")}
    infos = {"train": SimpleNamespace(num_examples=5000)}  # colorectal_histology: one split of 5000 tiles
    with pytest.raises(ValueError, match=r"'train\[50%:\]' overlaps the 'train\[:70%\]' split"):
        tfds_sources.check_unlabeled_disjoint("train[50%:]", labelled, split_infos=infos)
    with pytest.raises(ValueError, match=r"overlaps the 'train\[70%:85%\]' split \(data.val_split\)"):
        tfds_sources.check_unlabeled_disjoint("train[70%:71%]", labelled, split_infos=infos)
    with pytest.raises(ValueError, match=r"overlaps the 'train\[85%:\]' split \(data.test_split\)"):
        tfds_sources.check_unlabeled_disjoint("train[-1:]", labelled, split_infos=infos)
    readme = {**labelled, "train_split": "train[:20%]"}  # the README's example
    tfds_sources.check_unlabeled_disjoint("train[20%:70%]", readme, split_infos=infos)
    assert tfds_sources.absolute_ranges("train[20%:70%]", split_infos=infos) == [("train", 1000, 3500)]


@pytest.fixture(scope="module")
def rebuilt(built, tmp_path_factory):
    """The toy dataset written again under the same name into two other data_dirs: once identical,
    once with one train label changed (adipose -> lympho; same record count and images)."""
    root, _, _ = built
    same_dir, changed_dir = tmp_path_factory.mktemp("same"), tmp_path_factory.mktemp("changed")
    tfds_sources.build_array_record(root, same_dir, name="toy_tiles", class_names=CLASSES)
    split_sources = {s: sources.TileSource(sources.scan_split(root, s, class_names=CLASSES))
                     for s in ("test", "train", "val")}
    labels = split_sources["train"].labels().copy()
    first = int(np.flatnonzero(labels == 0)[0])
    labels[first] = 1
    split_sources["train"] = sources.RelabelledSource(split_sources["train"], labels)
    tfds_sources.build_array_record(split_sources, changed_dir, name="toy_tiles", class_names=CLASSES)
    return same_dir, changed_dir


def _split_bytes(data_dir, split="train") -> int:
    return int(tfds_sources.prepared_builder("toy_tiles", data_dir=data_dir).info.splits[split].num_bytes)


def test_a_rebuilt_dataset_with_one_label_changed_has_another_identity(built, rebuilt):
    _, data_dir, _ = built
    same_dir, changed_dir = rebuilt
    read = lambda d, split="train": tfds_sources.tfds_split("toy_tiles", split=split, data_dir=d)  # noqa: E731
    original, same, changed = read(data_dir), read(same_dir), read(changed_dir)
    # the facts the old identity looked at agree: name, version, split, record count and stored bytes
    assert len(original) == len(changed) and _split_bytes(data_dir) == _split_bytes(changed_dir)
    assert (original.labels() != changed.labels()).sum() == 1
    assert repr(changed) != repr(original)
    assert repr(same) == repr(original) and f"'train' {_split_bytes(data_dir)} bytes" in repr(original)
    assert f"{len(original)} records" in repr(original) and "toy_tiles/1.0.0 'train'" in repr(original)
    assert repr(read(changed_dir, "val")) == repr(read(data_dir, "val"))  # the untouched split keeps its name
    at = int(np.flatnonzero(original.labels() != changed.labels())[0])
    assert repr(read(changed_dir, f"train[{at + 1}:]")) == repr(read(data_dir, f"train[{at + 1}:]"))
    assert repr(read(changed_dir, f"train[{at}:]")) != repr(read(data_dir, f"train[{at}:]"))  # slices: own labels


def test_the_identity_is_stable_across_processes_and_survives_pickling(built):
    import subprocess

    _, data_dir, _ = built
    source = tfds_sources.tfds_split("toy_tiles", split="train[:50%]", data_dir=data_dir)
    before = pickle.loads(pickle.dumps(source))  # pickled before its identity was computed
    name = repr(source)
    after = pickle.loads(pickle.dumps(source))  # and after: the cached identity travels
    assert repr(before) == repr(after) == name
    assert after[0]["image"].shape == (32, 32, 3)
    code = ("from histokd_jax.data import tfds_sources; "
            f"print(repr(tfds_sources.tfds_split('toy_tiles', split='train[:50%]', data_dir={str(data_dir)!r})))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert other == name and "0x" not in name


@pytest.mark.parametrize("name", ["colorectal_histology", "no_such_dataset_xyz"])
def test_unprepared_dataset_is_a_clear_error_without_download(tmp_path, monkeypatch, name):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        tfds_sources.tfds_split(name, split="train[:70%]", data_dir=tmp_path / "tfds")
    message = str(info.value)
    assert name in message and str(tmp_path / "tfds") in message and f"tfds build {name}" in message
    assert "prepare it beforehand" in message
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):  # no data_dir: $TFDS_DATA_DIR
        tfds_sources.tfds_split(name, split="train")
    assert not any(tmp_path.rglob("*.array_record*"))  # nothing was downloaded or built


def test_unknown_split_is_a_clear_error(built):
    _, data_dir, _ = built
    with pytest.raises(ValueError, match="no split 'validation'"):
        tfds_sources.tfds_split("toy_tiles", split="validation", data_dir=data_dir)


def test_tfds_source_over_plain_dicts():
    grey = np.arange(16, dtype=np.uint8).reshape(4, 4)
    records = [
        {"image": grey, "label": 1},
        {"image": grey[:, :, None], "label": np.int64(0)},
        {"img": np.zeros((4, 4, 3), np.uint8), "y": 2},
    ]
    source = tfds_sources.TfdsSource(records[:2])
    assert len(source) == 2
    for i in range(2):
        element = source[i]
        assert element["image"].shape == (4, 4, 3) and element["image"].dtype == np.uint8
        np.testing.assert_array_equal(element["image"][..., 2], grey)
        assert element["label"].dtype == np.int32 and element["has_label"].dtype == np.bool_ and element["has_label"]
    np.testing.assert_array_equal(source.labels(), np.array([1, 0], np.int32))
    other = tfds_sources.TfdsSource(records[2:], image_key="img", label_key="y")
    assert int(other[0]["label"]) == 2 and other.labels().dtype == np.int32


@pytest.mark.parametrize("module", ["crc", "pcam"])
def test_configs_load_locked_with_a_divisible_teacher_crop(module):
    import importlib

    config = importlib.import_module(f"configs.{module}").get_config()
    assert config.is_locked and config.data.kind == "tfds" and config.data.tfds_name
    factor = resolve_downsample(config.data)
    assert factor == 4 and config.data.teacher_px % factor == 0
    with pytest.raises(AttributeError):
        config.data.not_a_field = 1
    n_classes = {"crc": 8, "pcam": 2}[module]
    assert len(config.data.class_names) == n_classes
