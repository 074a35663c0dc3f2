"""Defaults shared by every experiment; other configs start from ``common.get_config()``.

Not meant to be launched directly: it names no data.
"""

from __future__ import annotations

import ml_collections


def optim(*, learning_rate: float = 1e-3, weight_decay: float = 1e-4, warmup_steps: int = 100) -> dict:
    """AdamW + linear warmup + cosine decay + global-norm clipping (see histokd_jax/optim.py)."""
    return dict(
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        clip_norm=1.0,
        accumulate_steps=1,  # >1: optax.MultiSteps gradient accumulation (steps count micro-batches)
    )


def stage(*, steps: int, batch_size: int = 64, eval_every_steps: int = 500) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(steps=steps, batch_size=batch_size, eval_every_steps=eval_every_steps, optim=optim())
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Stages run in this order; "distill" needs a teacher (from this workdir or teacher.checkpoint);
    # "control" (synthetic data only) is the student trained with the pool's true labels.
    c.stages = ("teacher", "distill", "baseline")

    c.data = ml_collections.ConfigDict()
    # "folder": root/<split>/<class>/*.png; "slides": whole slides listed in data.manifest;
    # "tfds": a TFDS dataset prepared as array_record (configs/crc.py, configs/pcam.py);
    # "synthetic" / "synthetic_slides": the generated demo tiles / slides.
    c.data.kind = "folder"
    c.data.root = ""  # required for "folder"; for the synthetic kinds, empty means under the workdir
    c.data.manifest = ""  # "slides": CSV slide,label,split[,mpp] (paths relative to the CSV)
    c.data.min_tissue = 0.5  # "slides": minimum tissue fraction of a tile (saturation above the glass peak)
    c.data.tile_overlap = 0.0  # "slides": fraction of a tile shared with its neighbour
    c.data.slide_index_dir = ""  # "slides": where slide indexes are cached; empty: workdir/slide_index
    c.data.class_names = ()  # empty: the sorted sub-folders of root/train (this order = label index)
    c.data.train_split = "train"
    c.data.val_split = "val"
    c.data.test_split = "test"
    c.data.unlabeled_folder = "unlabeled"  # root/<this>/**/*.png, used by distillation only
    c.data.use_unlabeled = True  # distil on train + unlabelled pool (the paper's self-supervised setting)
    c.data.tfds_name = ""  # "tfds": a dataset prepared as array_record (never downloaded)
    c.data.tfds_data_dir = ""  # "tfds": where it was prepared; empty: $TFDS_DATA_DIR, else ~/tensorflow_datasets
    c.data.unlabeled_split = ""  # "tfds": a split read WITHOUT its labels as the unlabelled pool, e.g. "train[50%:]"
    c.data.unlabeled_fraction = 1.0  # share of the unlabelled pool used (a seeded subset; the sweep grows it)
    c.data.teacher_px = 224  # side of the teacher crop, in pixels at the teacher resolution
    # Teacher and student resolution; downsample = ratio of the two. Magnification strings use the
    # heuristic mpp = 10 / power. Set downsample directly (2, 4, 8, 16) when magnifications are "".
    c.data.teacher_magnification = ""
    c.data.student_magnification = ""
    c.data.downsample = 0
    c.data.flips = True
    c.data.rot90 = True
    c.data.jitter = (0.5, 0.5, 0.5, 0.2)  # brightness, contrast, saturation, hue (the paper's values)
    # Share of training student views made like a scanner's pyramid level (Lanczos or bicubic, then JPEG
    # q70-95) instead of the block mean: what launch/predict.py reads from real slides (BENCHMARKS.md).
    c.data.scanlike_student_views = 0.0
    c.data.workers = 2  # grain worker processes; 0 loads in the main process
    # Synthetic data only (data.kind "synthetic" or "synthetic_slides"). generator: "chromatin" (class evidence
    # in 1-3 µm nuclear texture alone, the hardest setting) or "multiscale" (evidence in architecture, cell
    # arrangement and chromatin; histokd_jax/data/multiscale.py); evidence (0-1): how much of it is coarse.
    c.data.generator = "chromatin"
    c.data.evidence = 1.0
    c.data.seed = 0
    c.data.tile_px = 64
    c.data.n_train = 300
    c.data.n_unlabeled = 4200
    c.data.n_val = 300
    c.data.n_test = 600
    # Synthetic slides only (data.kind == "synthetic_slides"): slides of slide_tiles^2 tiles of tile_px.
    c.data.slides_per_class = 8
    c.data.n_unlabeled_slides = 24
    c.data.slide_tiles = 12
    c.data.test_slides_per_class = 0  # >0: this many extra test slides per class (a test set with narrow CIs)

    c.model = ml_collections.ConfigDict()
    c.model.widths = (32, 64, 128, 256)
    c.model.blocks_per_stage = (1, 1, 1, 1)
    c.model.num_groups = 32
    c.model.compute_dtype = "float32"  # "bfloat16": mixed precision on GPU/TPU (float32 parameters and losses)
    c.model.conv_lowering = "auto"  # "auto": small-output convolutions as matmuls (faster on CPU); "xla": never
    c.model.padding = "same"  # "same": XLA's SAME; "symmetric": PyTorch's k//2 (teachers from launch/import_torch.py)
    c.model.norm_epsilon = 1e-6  # GroupNorm's variance epsilon; PyTorch's is 1e-5 (teachers from import_torch.py)

    # Each stage trains one model: its length, global batch, validation cadence and optimiser.
    c.teacher = stage(steps=10_000)
    c.teacher.checkpoint = ""  # a finished teacher (a workdir/teacher folder): skip training, distil from it
    c.distill = stage(steps=20_000)
    c.distill.loss = ml_collections.ConfigDict()
    c.distill.loss.w_kl = 1.0
    c.distill.loss.w_feat = 1.0
    c.distill.loss.w_ce = 0.0
    # 1: temperature 4 gained at 2.5x on both seeds (+0.010, +0.022) but lost at 5x and 1.25x (-0.022, -0.021
    # on seed 0); BENCHMARKS.md, "Ablations"
    c.distill.loss.temperature = 1.0
    c.distill.loss.feature_kind = "l2"  # "l2" | "l1"
    c.distill.loss.feature_resize = "maxpool"  # "maxpool" | "bicubic" | "maxpool+bicubic"
    # Cheaper teacher targets (histokd_jax/teacher_targets.py; measured in BENCHMARKS.md). Defaults: the teacher
    # runs live, in the model's precision, on every student view.
    c.distill.views_per_crop = 1  # K > 1: one teacher pass per crop, K flipped/rotated student views of it
    c.distill.target_cache = False  # True: teacher targets of the un-jittered pool computed once, then reused
    c.distill.teacher_dtype = ""  # "" = model.compute_dtype; "bfloat16": the teacher alone at reduced precision
    c.baseline = stage(steps=10_000)
    # Synthetic data only: the student trained on the whole pool with its true labels (the sweep's ceiling).
    c.control = stage(steps=10_000)

    # launch/sweep.py: one teacher, then a distilled student and a label-only baseline per factor.
    c.sweep = ml_collections.ConfigDict()
    c.sweep.factors = (2, 4, 8, 16)
    c.sweep.unlabeled_fractions = (1.0,)  # e.g. (0.0, 0.25, 1.0): distillation with a growing unlabelled pool
    c.sweep.pool_factors = ()  # factors that get the fractions < 1 (empty: every factor)
    c.sweep.control = False  # also train the "control" stage per factor (needs the pool's true labels)
    c.sweep.measure_batch_size = 64  # batch of the images/s measurement

    c.train = ml_collections.ConfigDict()
    c.train.log_every_steps = 50
    c.train.checkpoint_every_steps = 500
    c.train.keep_checkpoints = 2
    c.train.eval_batch_size = 128
    c.train.select_metric = "balanced_accuracy"  # validation metric that picks the best parameters
    c.train.progress = True
    # At the end of a run: report.md/report.json + plots (bootstrap CIs), sweep.md (the resolution table with
    # measured images/s) and, for slide data, student heatmaps of the first `heatmap_slides` test slides.
    c.train.final_report = True
    c.train.bootstrap = 1000
    c.train.heatmap_slides = 0
    return c
