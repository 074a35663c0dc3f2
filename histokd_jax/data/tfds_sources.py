"""TFDS datasets as grain sources, read from array_record files WITHOUT TensorFlow.

Reading: ``tfds.data_source`` opens a dataset prepared in the ``array_record`` format
and decodes its PNG/JPEG images with PIL, no TensorFlow involved. Nothing is ever
downloaded here: prepare official datasets beforehand, on a machine with network::

    tfds build colorectal_histology --file_format=array_record --data_dir=/data/tfds

(``tfds build`` itself needs TensorFlow for most official datasets; the files it
writes are then read here without it.)

Writing: ``build_array_record`` turns a tile folder (``root/<split>/<class>/*.png``)
or any of our sources into such a dataset, for fast repeated epochs (one file per
split instead of thousands of small images). Images are handed to TFDS already
PNG-encoded (by PIL), which is the TF-free path; numpy images would need TF to encode.
"""

from __future__ import annotations

import functools
import io
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from histokd_jax.data import sources, tile_images

SKIP_SPLITS = ("unlabeled",)  # folders of a tile root that are not labelled splits


def _to_rgb(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an HWC image with 1, 3 or 4 channels, got shape {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
        image = tile_images.composite_on_white(image)
    return np.ascontiguousarray(image, dtype=np.uint8)


class TfdsSource:
    """A random-access sequence of dicts (e.g. a ``tfds.data_source`` split) as our source contract."""

    def __init__(self, data_source, *, image_key: str = "image", label_key: str = "label", labels=None,
                 identity: str = ""):
        self.data_source, self.identity = data_source, identity  # identity: dataset, version, split, counts
        self.image_key, self.label_key = image_key, label_key
        self._labels = None if labels is None else labels  # array, or a callable giving it (read lazily)
        self._name = None  # repr, computed once: grain asks for it at every checkpoint save

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> dict:
        record = self.data_source[int(index)]
        return {"image": _to_rgb(record[self.image_key]), "label": np.int32(record[self.label_key]),
                "has_label": np.bool_(True)}

    def labels(self) -> np.ndarray:
        if callable(self._labels):
            self._labels = self._labels()
        if self._labels is None:
            self._labels = [self.data_source[i][self.label_key] for i in range(len(self))]
        return np.asarray(self._labels, np.int32)

    def __repr__(self) -> str:
        """Named by content (checkpoints and the teacher-target cache compare it): a prepared split by
        dataset, version, split, record count and stored bytes, and any source by a digest of its labels,
        so that a dataset rebuilt under the same name with a label changed is told apart."""
        if self._name is None:
            named = self.identity or f"{len(self)} records"
            self._name = f"TfdsSource({named}, labels {sources.digest(self.labels())})"
        return self._name


def prepared_builder(name: str, *, data_dir: str | os.PathLike | None = None):
    """The TFDS builder of a dataset already prepared as array_record under ``data_dir``; never downloads."""
    import tensorflow_datasets as tfds  # a heavy import: only where TFDS data is used

    data_dir = os.fspath(data_dir) if data_dir else None
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "the default TFDS data_dir (~/tensorflow_datasets)"
    how = (f"prepare it beforehand, on a machine with network, e.g. `tfds build {name} --file_format=array_record"
           f"{' --data_dir=' + data_dir if data_dir else ''}`, and copy the folder here")
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
        prepared = builder.is_prepared()
    except tfds.core.registered.DatasetNotFoundError:
        builder, prepared = None, False
    if not prepared:
        raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared in {where}: {how}")
    file_format = builder.info.file_format
    if file_format is None or file_format.value not in ("array_record", "parquet"):
        raise ValueError(f"TFDS dataset {name!r} in {where} is stored as {file_format}, which has no random "
                         f"access: rebuild it with --file_format=array_record (`tfds build {name} ...`)")
    return builder


def tfds_split(name: str, *, split: str, data_dir: str | os.PathLike | None = None,
               image_key: str = "image", label_key: str = "label") -> TfdsSource:
    """One split (TFDS slicing allowed: ``"train[:70%]"``) of a prepared dataset as a TfdsSource."""
    builder = prepared_builder(name, data_dir=data_dir)
    try:
        data = builder.as_data_source(split=split)
    except (ValueError, KeyError) as err:
        raise ValueError(f"TFDS dataset {name!r} has no split {split!r} (it has {list(builder.info.splits)}): "
                         f"{err}") from err
    read = functools.partial(_read_labels, name, split, data_dir, image_key, label_key)  # picklable, for workers
    return TfdsSource(data, image_key=image_key, label_key=label_key, labels=read,
                      identity=_split_identity(builder, split))


def _split_identity(builder, split: str) -> str:
    """``name/config/version``, the split spec, its record count and the exact stored bytes of each split it
    reads (``num_bytes`` prints rounded, "31.33 KiB"); the labels' digest is added by ``TfdsSource``."""
    ranges = absolute_ranges(split, split_infos=builder.info.splits)
    stored = ", ".join(f"{name!r} {int(builder.info.splits[name].num_bytes)} bytes"
                       for name in sorted({name for name, _, _ in ranges}))
    return f"{builder.info.full_name} {split!r}, {sum(to - start for _, start, to in ranges)} records, {stored}"


def absolute_ranges(split: str, *, split_infos) -> list[tuple[str, int, int]]:
    """The records a split spec reads, as TFDS itself resolves slices, percentages and ``+``:
    ``(split name, from, to)`` ranges, ``to`` excluded (TFDS leaves an open end as None)."""
    import tensorflow_datasets as tfds

    ranges = []
    for i in tfds.core.ReadInstruction.from_spec(split).to_absolute(split_infos):
        name = str(i.splitname)
        start = 0 if i.from_ is None else int(i.from_)
        ranges.append((name, start, max(start, split_infos[name].num_examples if i.to is None else int(i.to))))
    return ranges


def ranges_overlap(a: Sequence[tuple[str, int, int]], b: Sequence[tuple[str, int, int]]) -> bool:
    """Whether two lists of ``absolute_ranges`` share a record."""
    return any(name_a == name_b and max(from_a, from_b) < min(to_a, to_b)
               for name_a, from_a, to_a in a for name_b, from_b, to_b in b)


def check_unlabeled_disjoint(unlabeled_split: str, labelled: Mapping[str, str], *, split_infos) -> None:
    """Refuse an unlabelled split sharing records with a labelled one (``{config key: spec}``): val/test
    tiles distilled on would inflate the evaluation, train tiles would be read twice per epoch."""
    pool = absolute_ranges(unlabeled_split, split_infos=split_infos)
    for key, spec in labelled.items():
        if ranges_overlap(pool, absolute_ranges(spec, split_infos=split_infos)):
            raise ValueError(f"data.unlabeled_split={unlabeled_split!r} overlaps the {spec!r} split "
                             f"(data.{key}): its tiles would leak into distillation. Point it at records of "
                             "its own, e.g. train_split=\"train[:60%]\" and unlabeled_split=\"train[60%:]\".")


def _read_labels(name, split, data_dir, image_key, label_key) -> list[int]:
    """The labels of a split, reading labels only: the images stay undecoded bytes."""
    import tensorflow_datasets as tfds

    builder = prepared_builder(name, data_dir=data_dir)
    skip = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    return [skip[i][label_key] for i in range(len(skip))]


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_to_rgb(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def build_array_record(source_or_folder, out_dir: str | os.PathLike, *, name: str,
                       class_names: Sequence[str], splits: Sequence[str] | None = None) -> pathlib.Path:
    """Write labelled tiles as a TFDS array_record dataset ``name`` under ``out_dir``; returns its folder.

    ``source_or_folder``: a tile root (``root/<split>/<class>/*.png``; every split folder but
    ``unlabeled`` unless ``splits`` is given) or a mapping ``{split: source}`` of our sources.
    Read it back with ``tfds_split(name, split=..., data_dir=out_dir)``.
    An existing ``out_dir/name/1.0.0`` is reused as is (TFDS semantics): delete it to rebuild.
    """
    import tensorflow_datasets as tfds

    names = list(class_names)
    if isinstance(source_or_folder, Mapping):
        split_sources = dict(source_or_folder)
    else:
        root = pathlib.Path(source_or_folder)
        if splits is None:
            splits = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in SKIP_SPLITS)
        split_sources = {s: sources.TileSource(sources.scan_split(root, s, class_names=names)) for s in splits}

    def examples(source):
        for i in range(len(source)):
            element = source[i]
            if not element["has_label"]:
                raise ValueError(f"record {i} of {source!r} is unlabelled; only labelled tiles can be written")
            yield i, {"image": _png(element["image"]), "label": int(element["label"])}

    dataset_name = name

    class TileBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, disable_shuffling=True, description="tiles written by histokd_jax",
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=names)}),
                supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(source) for split, source in split_sources.items()}

        def _generate_examples(self, source):
            return examples(source)

    builder = TileBuilder(data_dir=os.fspath(out_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return pathlib.Path(builder.data_dir)


def check_class_names(wanted: Sequence[str], official: Sequence[str], *, dataset: str) -> tuple[str, ...]:
    """The label order: ``data.class_names`` must be the dataset's own names in its order (label i means
    ``official[i]``); datasets whose labels carry only numbers ("0", "1", ...) take any names, counted."""
    official, wanted = tuple(official), tuple(wanted) or tuple(official)
    numbered = official == tuple(str(i) for i in range(len(official)))
    if len(wanted) != len(official) or (not numbered and wanted != official):
        raise ValueError(f"data.class_names {list(wanted)} do not match the labels of {dataset}, {list(official)} "
                         f"(label i is the i-th name); set --config.data.class_names=\"{tuple(official)}\"")
    return wanted
