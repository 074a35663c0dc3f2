"""``data.scanlike_student_views`` on every data kind and stage that trains a student.

The option replaces a share of the training student views (the block mean of the teacher crop)
by a scanner-like level of it (a smoothing filter, then JPEG). Its unit tests (tests/test_views.py)
check the views themselves; here the whole path from a config to the training loader is built for
each data kind (tile folders, the synthetic tiles, TFDS array_record, generated slides, a manifest
of slides), each stage (teacher, distillation, baseline, true-label control) and the teacher-target
cache, and the first batch is checked against a block mean computed here: with the option at 1 no
student view of a student stage is the block mean of its teacher crop (yet each is close to it),
the teacher's stage never gets scanner-like views, and at 0 every student view is the block mean.
Resume with the option is a case of tests/test_resume_matrix.py.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from histokd_jax import model_config, models, parallel, teacher_targets, trainer
from histokd_jax.data import splits as data_splits
from histokd_jax.data import synthetic, synthetic_slides, tfds_sources
from histokd_jax.data.pipeline import make_train_loader
from histokd_jax.data.synthetic import CLASS_NAMES
from histokd_jax.data.views import DIHEDRAL, dihedral
from tests.tiny import tiny_config

pytestmark = pytest.mark.slow
BATCH = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("data")
    synthetic.write_tile_folder(root / "tiles", seed=0, tile_px=64, n_train=16, n_unlabeled=16, n_val=8, n_test=8)
    manifest = synthetic_slides.write_slide_set(root / "slides", seed=0, n_per_class=3, n_unlabeled=1,
                                                tile_grid=(4, 4), tile_px=64)
    tfds_sources.build_array_record(root / "tiles", root / "tfds", name="scanlike_tiles", class_names=CLASS_NAMES,
                                    splits=("train", "val", "test"))
    return {"tiles": root / "tiles", "manifest": manifest, "tfds": root / "tfds", "work": root / "work"}


def config_for(kind: str, data: dict, *, share: float):
    config = tiny_config()
    d = config.data
    d.scanlike_student_views, d.workers = share, 0
    if kind in ("folder", "synthetic"):
        d.kind, d.root = kind, str(data["tiles"]) if kind == "folder" else ""
    elif kind == "tfds":
        d.kind, d.tfds_name, d.tfds_data_dir = "tfds", "scanlike_tiles", str(data["tfds"])
        d.train_split, d.unlabeled_split, d.val_split, d.test_split = "train[:50%]", "train[50%:]", "val", "test"
    else:  # slides at 10x -> 2.5x: "synthetic_slides" draws its own under the workdir, "slides" reads the manifest
        d.kind, d.downsample = kind, 0
        d.teacher_magnification, d.student_magnification = "10x", "2.5x"
        d.class_names, d.tile_px, d.teacher_px = CLASS_NAMES, 64, 64
        if kind == "slides":
            d.manifest = str(data["manifest"])
        else:
            d.slides_per_class, d.test_slides_per_class, d.n_unlabeled_slides, d.slide_tiles = 3, 0, 1, 4
    return config


def first_batch(kind: str, stage_name: str, data: dict, *, share: float) -> tuple[dict, int]:
    """The first training batch of a stage as the trainer builds it, and the student downsample."""
    config = config_for(kind, data, share=share)
    workdir = data["work"] / kind
    splits = data_splits.load_splits(config.data, workdir=workdir)
    model = model_config.make_model(config, num_classes=len(splits.class_names))
    stage = trainer.build_stage(stage_name, config=config, model=model, splits=splits)
    loader = make_train_loader(stage.train_source, spec=trainer._train_spec(config, stage=stage), batch_size=BATCH,
                               seed=stage.seed, workers=0)
    return next(iter(loader)), data_splits.resolve_downsample(config.data)


def block_mean(images: np.ndarray, factor: int) -> np.ndarray:
    """float64 means of factor x factor blocks of (N, H, W, C) images (a uint8 view rounds them: within 0.5)."""
    n, h, w, c = images.shape
    return images.astype(np.float64).reshape(n, h // factor, factor, w // factor, factor, c).mean((2, 4))


def distances(students: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(largest, mean) absolute difference of every student view i from every reference j: (N, M) each."""
    diff = np.abs(students[:, None].astype(np.float64) - references[None]).reshape(len(students), len(references), -1)
    return diff.max(2), diff.mean(2)


def check_scanner_like(batch: dict, factor: int, where: str) -> None:
    """No student view is its crop's block mean, and each is nearer its own crop's than any other's."""
    worst, mean = distances(batch["student_image"], block_mean(batch["teacher_image"], factor))
    assert (np.diag(worst) > 1).all(), f"{where}: a student view is still the block mean"
    assert (mean.argmin(1) == np.arange(len(mean))).all(), f"{where}: a student view is not of its own crop"


def check_block_means(batch: dict, factor: int) -> None:
    worst, _ = distances(batch["student_image"], block_mean(batch["teacher_image"], factor))
    assert (np.diag(worst) <= 0.5).all()


STUDENT_CASES = [("folder", "distill"), ("folder", "baseline"), ("synthetic", "control"), ("tfds", "distill"),
                 ("synthetic_slides", "distill"), ("synthetic_slides", "control"), ("slides", "baseline")]


@pytest.mark.parametrize("kind,stage_name", STUDENT_CASES)
def test_every_student_view_is_scanner_like_at_share_one_and_a_block_mean_at_zero(kind, stage_name, data):
    batch, factor = first_batch(kind, stage_name, data, share=1.0)
    check_scanner_like(batch, factor, f"{kind}/{stage_name}")
    plain, _ = first_batch(kind, stage_name, data, share=0.0)
    check_block_means(plain, factor)


@pytest.mark.parametrize("kind", ["folder", "synthetic_slides"])
def test_the_teachers_stage_never_gets_scanner_like_views(kind, data):
    batch, factor = first_batch(kind, "teacher", data, share=1.0)
    assert "scan_student" not in batch and "scanned" not in batch
    check_block_means(batch, factor)


def test_cached_teacher_targets_get_scanner_like_student_views(data, tmp_path):
    config = config_for("synthetic_slides", data, share=1.0)
    splits = data_splits.load_splits(config.data, workdir=data["work"] / "synthetic_slides")
    factor = data_splits.resolve_downsample(config.data)
    model = models.ResNetGN(num_classes=3, widths=(8, 16), blocks_per_stage=(1, 1), num_groups=4)
    params = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    mesh = parallel.make_mesh()
    eval_spec = data_splits.view_spec(config.data, train=False)
    logits, maps = teacher_targets.compute_targets(params, splits.pool, teacher=model, spec=eval_spec, mesh=mesh,
                                                   batch_size=8, show_progress=False)
    teacher_targets.save_targets(tmp_path / "t", logits=logits, maps=maps, key={"records": len(logits)})
    cached = teacher_targets.CachedTargetSource(splits.pool, folder=tmp_path / "t")
    for share in (1.0, 0.0):
        spec = dataclasses.replace(data_splits.view_spec(config.data, train=True), scanlike=share)
        batch = next(iter(make_train_loader(cached, spec=spec, batch_size=BATCH, seed=1, workers=0)))
        assert "teacher_image" not in batch  # the cached targets stand in for the teacher
        # each record's student view against the block means of the central crops under the eight turns
        rows = _indices(batch, logits)
        centres = np.stack([_central(splits.pool[i], eval_spec)["teacher_image"] for i in rows])
        turned = np.concatenate([block_mean(np.stack([dihedral(c, k, axes=(0, 1)) for c in centres]), factor)
                                 for k in range(len(DIHEDRAL))])  # row k * BATCH + i: record i under turn k
        worst, mean = distances(batch["student_image"], turned)
        own = mean.argmin(1)
        assert (own % BATCH == np.arange(BATCH)).all()  # nearest to a turn of its own crop
        own_worst = worst[np.arange(BATCH), own]
        assert (own_worst > 1).all() if share else (own_worst <= 0.5).all()


def _central(element: dict, spec) -> dict:
    from histokd_jax.data.views import make_views

    return make_views(element, spec=spec, rng=None)


def _indices(batch: dict, logits: np.ndarray) -> list[int]:
    """Which pool record each batch row is: its cached logits are that record's, and no two are equal."""
    return [int(np.flatnonzero((logits == row).all(1))[0]) for row in batch["teacher_logits"]]
