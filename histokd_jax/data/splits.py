"""From a config to the sources of each split, and the view settings of each resolution."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import ml_collections
import numpy as np

from histokd_jax.data import sources, tfds_sources
from histokd_jax.data.manifest import SPLITS, read_manifest
from histokd_jax.data.views import ViewSpec
from histokd_jax.messages import listed
from histokd_jax.units import downsample_between, resolution_to_mpp


@dataclasses.dataclass
class DataSplits:
    """Sources of each split; ``pool`` (labelled train + unlabelled) is what distillation reads."""

    class_names: tuple[str, ...]
    train: Any  # labelled
    pool: Any
    val: Any
    test: Any
    root: pathlib.Path
    counts: dict[str, int]  # tiles per split, for run.json
    pool_truth: Any = None  # the pool with true labels for every record, where the data knows them (synthetic)


def resolve_downsample(data: ml_collections.ConfigDict) -> int:
    """The student downsample factor: from the magnifications when given, else ``data.downsample``."""
    if data.teacher_magnification and data.student_magnification:
        factor = downsample_between(data.teacher_magnification, data.student_magnification)
        if data.downsample and data.downsample != factor:
            raise ValueError(
                f"data.downsample={data.downsample} contradicts {data.teacher_magnification} -> "
                f"{data.student_magnification} (factor {factor}); set one or the other"
            )
        return factor
    if not data.downsample:
        raise ValueError("set data.downsample, or both data.teacher_magnification and data.student_magnification")
    return int(data.downsample)


def view_spec(data: ml_collections.ConfigDict, *, train: bool) -> ViewSpec:
    """Augmented paired views for training, plain central views for evaluation."""
    if not train:
        return ViewSpec(teacher_px=data.teacher_px, downsample=resolve_downsample(data), flips=False, rot90=False)
    return ViewSpec(
        teacher_px=data.teacher_px,
        downsample=resolve_downsample(data),
        flips=data.flips,
        rot90=data.rot90,
        jitter=tuple(float(x) for x in data.jitter),
        scanlike=float(data.scanlike_student_views),
    )


def data_root(data: ml_collections.ConfigDict, *, workdir: pathlib.Path, config_name: str = "this config") -> pathlib.Path:
    """Where the tiles are; for the synthetic demo they are generated there first."""
    if data.kind == "synthetic":
        from histokd_jax.data import synthetic  # numpy/PIL only, but only the demo needs it

        root = pathlib.Path(data.root) if data.root else workdir / "data"
        synthetic.write_tile_folder(
            root,
            seed=data.seed,
            tile_px=data.tile_px,
            n_train=data.n_train,
            n_unlabeled=data.n_unlabeled,
            n_val=data.n_val,
            n_test=data.n_test,
            generator=data.generator,
            evidence=data.evidence,
            show_progress=True,
        )
        return root
    if data.kind != "folder":
        raise ValueError(
            f"data.kind must be 'folder', 'slides', 'tfds', 'synthetic' or 'synthetic_slides', got {data.kind!r}"
        )
    if not data.root:
        raise ValueError(
            f"{config_name} needs its data: add --config.data.root=/path/to/tiles (laid out as "
            "root/<split>/<class>/*.png, optional root/unlabeled/) or --config.data.manifest=/path/to/manifest.csv "
            "(whole slides: slide,label,split[,mpp])"
        )
    root = pathlib.Path(data.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={data.root} does not exist or is not a folder")
    return root


def check_not_empty(splits: DataSplits) -> DataSplits:
    """An empty split is an error here, naming it, not an empty concatenation when it is evaluated."""
    empty = [name for name in ("train", "val", "test") if len(getattr(splits, name)) == 0]
    if empty:
        raise ValueError(f"split(s) {empty} of the data in {splits.root} have no records: every one of train, "
                         "val and test needs tiles")
    return splits


def load_splits(data: ml_collections.ConfigDict, *, workdir: pathlib.Path, config_name: str = "this config") -> DataSplits:
    """The sources of every split, whatever ``data.kind``; an empty split is an error naming it."""
    if data.kind in ("slides", "synthetic_slides") or (data.kind == "folder" and data.manifest):
        return check_not_empty(load_slide_splits(data, workdir=workdir, config_name=config_name))  # manifest: slides
    if data.kind == "tfds":  # a TFDS dataset prepared as array_record (read without TensorFlow)
        return check_not_empty(load_tfds_splits(data, config_name=config_name))
    return check_not_empty(load_tile_splits(data, workdir=workdir, config_name=config_name))


def load_tile_splits(data: ml_collections.ConfigDict, *, workdir: pathlib.Path,
                     config_name: str = "this config") -> DataSplits:
    """Tile folders (or the synthetic demo's): every tile's header is checked against the teacher crop
    (``data.teacher_px``) when its folder is scanned."""
    root = data_root(data, workdir=workdir, config_name=config_name)
    names = tuple(data.class_names) or sources.find_class_names(root, split=data.train_split)
    min_px = int(data.teacher_px)
    scan = lambda split: sources.TileSource(  # noqa: E731
        sources.scan_split(root, split, class_names=names, min_px=min_px), min_px=min_px)
    unlabeled = []
    if data.use_unlabeled:
        pool = (root / data.unlabeled_folder).resolve()
        for split in (data.train_split, data.val_split, data.test_split):
            labelled = (root / split).resolve()
            if pool == labelled or pool in labelled.parents or labelled in pool.parents:
                raise ValueError(
                    f"data.unlabeled_folder={data.unlabeled_folder!r} overlaps the {split!r} split: evaluation "
                    "tiles would leak into distillation. Point it at a folder of its own."
                )
        unlabeled = sources.scan_unlabeled(root, folder=data.unlabeled_folder, min_px=min_px)
    train, val, test = scan(data.train_split), scan(data.val_split), scan(data.test_split)
    full_pool = sources.TileSource(train.records + unlabeled, min_px=min_px)
    pool, pool_truth = distillation_pools(data, full_pool, n_labelled=len(train),
                              truth=_synthetic_tile_truth(root, train, unlabeled, names) if data.kind == "synthetic" else None)
    return DataSplits(
        class_names=names,
        train=train,
        pool=pool,
        pool_truth=pool_truth,
        val=val,
        test=test,
        root=root,
        counts={"train": len(train), "unlabeled": len(pool) - len(train), "val": len(val), "test": len(test)},
    )


def manifest_path(data: ml_collections.ConfigDict, *, workdir: pathlib.Path, config_name: str) -> pathlib.Path:
    """The slide manifest; for the synthetic-slide demo the slides are written there first."""
    if data.kind == "synthetic_slides":
        from histokd_jax.data import synthetic_slides

        root = pathlib.Path(data.root) if data.root else workdir / "slides"
        return synthetic_slides.write_slide_set(
            root, seed=data.seed, n_per_class=data.slides_per_class, n_unlabeled=data.n_unlabeled_slides,
            tile_grid=(data.slide_tiles, data.slide_tiles), tile_px=data.tile_px, generator=data.generator,
            evidence=data.evidence, n_test_per_class=data.test_slides_per_class, show_progress=True,
        )
    if not data.manifest:
        raise ValueError(f"{config_name} needs a slide manifest: add --config.data.manifest=/path/to/manifest.csv "
                         "(columns slide,label,split[,mpp])")
    return pathlib.Path(data.manifest).expanduser()


def load_slide_splits(data: ml_collections.ConfigDict, *, workdir: pathlib.Path, config_name: str) -> DataSplits:
    """Index every slide of the manifest (cached under workdir/slide_index) and build one source per split.

    Bad slides are skipped (see slide_index); training refuses to start only when a
    split it needs has no usable slide left.
    """
    from histokd_jax.data import slide_index

    if not data.class_names:
        raise ValueError("slide data needs data.class_names (the label order)")
    if not data.teacher_magnification:
        raise ValueError("slide data needs data.teacher_magnification, e.g. '10x' or a µm/px number like '1.0'")
    names = tuple(data.class_names)
    path = manifest_path(data, workdir=workdir, config_name=config_name)
    entries = read_manifest(path, class_names=names)
    teacher_mpp = resolution_to_mpp(data.teacher_magnification)
    settings = slide_index.IndexSettings(teacher_mpp=teacher_mpp, tile_px=data.teacher_px,
                                         min_tissue=data.min_tissue, overlap=data.tile_overlap)
    cache_dir = pathlib.Path(data.slide_index_dir) if data.slide_index_dir else workdir / "slide_index"
    skipped_csv = cache_dir / "skipped_slides.csv"
    usable, skipped = slide_index.index_slides(entries, settings=settings, cache_dir=cache_dir)
    if skipped:
        logging.getLogger(__name__).warning("%d slide(s) skipped; see %s", len(skipped), skipped_csv)
    labelled = {split: [t for t in usable if t.entry.split == split and t.entry.label] for split in SPLITS}
    unlabeled = [t for t in usable if not t.entry.label] if data.use_unlabeled else []
    missing = [split for split in SPLITS if not labelled[split]]
    if missing:
        raise ValueError(f"no usable labelled slide left in split(s) {missing} of {path}"
                         f"{_skipped_in(skipped, missing)}; all skipped slides, with reasons: {skipped_csv}")
    # Training sources replace a slide that breaks after indexing; evaluation sources refuse it, so that
    # the evaluation drops the slide rather than score another slide's tile under its label.
    make = lambda tiles, substitute: slide_index.SlideTileSource(  # noqa: E731
        tiles, class_names=names, teacher_mpp=teacher_mpp, tile_px=data.teacher_px, substitute=substitute,
        skipped_csv=skipped_csv)
    train, val, test = (make(labelled[split], substitute=split == "train") for split in SPLITS)
    full_pool = make(labelled["train"] + unlabeled, substitute=True)
    truth = _synthetic_slide_truth(path.parent, full_pool, names) if data.kind == "synthetic_slides" else None
    pool, pool_truth = distillation_pools(data, full_pool, n_labelled=len(train), truth=truth)
    return DataSplits(
        class_names=names, train=train, pool=pool, pool_truth=pool_truth, val=val, test=test, root=path.parent,
        counts={"train": len(train), "unlabeled": len(pool) - len(train), "val": len(val), "test": len(test),
                "slides_used": len(usable), "slides_skipped": len(skipped)},
    )


def _skipped_in(skipped: list, splits: list[str]) -> str:
    """The skipped slides of ``splits`` with their reasons, for an error message."""
    slides = [f"{entry.path} ({reason})" for entry, reason in skipped if entry.split in splits]
    return ": skipped " + listed(slides) if slides else " (the manifest lists no labelled slide there)"


def distillation_pools(data: ml_collections.ConfigDict, full_pool, *, n_labelled: int, truth) -> tuple[Any, Any]:
    """(distillation pool, the same pool with true labels or None), keeping ``data.unlabeled_fraction``
    of the unlabelled records (a seeded choice, nested as the fraction grows)."""
    keep = lambda source: sources.pool_subset(source, n_labelled=n_labelled,  # noqa: E731
                                              fraction=float(data.unlabeled_fraction), seed=data.seed)
    return keep(full_pool), None if truth is None else keep(sources.RelabelledSource(full_pool, truth))


def _synthetic_tile_truth(root: pathlib.Path, train, unlabeled: list, class_names: tuple[str, ...]) -> Any:
    """True classes of the demo's unlabelled tiles (``unlabeled/<i>.png``), from its ``synthetic.json``."""
    import json

    meta = json.loads((root / "synthetic.json").read_text())
    to_config = [class_names.index(name) for name in meta["params"]["class_names"]]
    return [*train.labels(), *(to_config[meta["unlabeled_labels"][int(pathlib.Path(r.path).stem)]] for r in unlabeled)]


def _synthetic_slide_truth(root: pathlib.Path, pool, class_names: tuple[str, ...]) -> Any:
    """True class at the centre of each pool tile of a synthetic slide set (mixed slides included)."""
    import json

    from histokd_jax.data import synthetic_slides

    meta = json.loads((root / "synthetic_slides.json").read_text())
    by_path = {str((root / s["slide"]).resolve()): s for s in meta["slides"]}
    params, names = meta["params"], meta["params"]["class_names"]
    to_config = np.asarray([class_names.index(name) for name in names])
    truth = np.asarray(pool.labels()).copy()
    side = pool.tile_px * pool.teacher_mpp / pool.mpps  # tile side in level-0 px, per slide
    for s, path in enumerate(pool.paths):
        info = by_path[str(pathlib.Path(path).resolve())]
        rows = pool.slide_of == s
        centre = pool.coords[rows] + side[s] / 2
        truth[rows] = to_config[synthetic_slides.true_classes(
            label=names.index(info["label"]) if info["label"] else None, seed=info["seed"],
            tile_grid=tuple(params["tile_grid"]), tile_px=params["tile_px"], x=centre[:, 0], y=centre[:, 1])]
    return truth


def load_tfds_splits(data, *, config_name: str = "this config"):
    """DataSplits of a ``data.kind == "tfds"`` config; ``data.unlabeled_split`` (read without its labels) is
    the unlabelled pool that distillation reads beside train, cut to ``data.unlabeled_fraction``."""
    if not data.tfds_name:
        raise ValueError(f"{config_name} needs data.tfds_name (a TFDS dataset prepared as array_record)")
    unlabeled_split = data.get("unlabeled_split") or ""
    if unlabeled_split and not data.use_unlabeled:
        raise ValueError(f"data.unlabeled_split={unlabeled_split!r} is set but data.use_unlabeled is False, so "
                         "no unlabelled pool would be read: set --config.data.use_unlabeled=True to distil on it "
                         "(or --config.data.unlabeled_split=\"\" for none)")
    data_dir = data.tfds_data_dir or None
    builder = tfds_sources.prepared_builder(data.tfds_name, data_dir=data_dir)
    names = tfds_sources.check_class_names(data.class_names, builder.info.features["label"].names, dataset=data.tfds_name)
    train, val, test = (tfds_sources.tfds_split(data.tfds_name, split=s, data_dir=data_dir)
                        for s in (data.train_split, data.val_split, data.test_split))
    pool = train
    if unlabeled_split:
        unlabeled = tfds_sources.tfds_split(data.tfds_name, split=unlabeled_split, data_dir=data_dir)
        tfds_sources.check_unlabeled_disjoint(unlabeled_split, {k: data[k] for k in ("train_split", "val_split", "test_split")},
                                 split_infos=builder.info.splits)
        hidden = sources.RelabelledSource(unlabeled, np.full(len(unlabeled), sources.UNLABELED, np.int32))
        pool = sources.ConcatSource([train, hidden])
    pool, _ = distillation_pools(data, pool, n_labelled=len(train), truth=None)
    return DataSplits(class_names=names, train=train, pool=pool, val=val, test=test,
                      root=pathlib.Path(builder.data_dir),
                      counts={"train": len(train), "unlabeled": len(pool) - len(train), "val": len(val),
                              "test": len(test)})
