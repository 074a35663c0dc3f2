"""From a config to the sources of each split, and the view settings of each resolution."""

from __future__ import annotations

import dataclasses
import pathlib

import ml_collections

from histokd_jax.data import sources
from histokd_jax.data.views import ViewSpec
from histokd_jax.units import downsample_between


@dataclasses.dataclass
class DataSplits:
    class_names: tuple[str, ...]
    train: sources.TileSource  # labelled
    unlabeled: sources.TileSource  # may be empty
    val: sources.TileSource
    test: sources.TileSource
    root: pathlib.Path


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
            show_progress=True,
        )
        return root
    if data.kind != "folder":
        raise ValueError(f"data.kind must be 'folder' or 'synthetic', got {data.kind!r}")
    if not data.root:
        raise ValueError(
            f"{config_name} needs the location of its tiles: add --config.data.root=/path/to/tiles "
            "(laid out as root/<split>/<class>/*.png, optional root/unlabeled/)"
        )
    root = pathlib.Path(data.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={data.root} does not exist or is not a folder")
    return root


def load_splits(data: ml_collections.ConfigDict, *, workdir: pathlib.Path, config_name: str = "this config") -> DataSplits:
    root = data_root(data, workdir=workdir, config_name=config_name)
    names = tuple(data.class_names) or sources.find_class_names(root, split=data.train_split)
    scan = lambda split: sources.TileSource(sources.scan_split(root, split, class_names=names))  # noqa: E731
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
        unlabeled = sources.scan_unlabeled(root, folder=data.unlabeled_folder)
    return DataSplits(
        class_names=names,
        train=scan(data.train_split),
        unlabeled=sources.TileSource(unlabeled),
        val=scan(data.val_split),
        test=scan(data.test_split),
        root=root,
    )
