"""The demo from tile folders: synthetic H&E-like tiles, teacher at 64 px, student at 16 px (4x downsample).

    python launch/train.py --config=configs/demo_tiles.py --workdir=/tmp/histokd-demo-tiles

Tiles are generated under ``workdir/data`` from ``data.seed`` (nothing is downloaded).
Tiny smoke run: add ``--config.teacher.steps=20 --config.distill.steps=20 --config.baseline.steps=20``.
"""

from __future__ import annotations

import ml_collections

from histokd_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = common.get_config(arg)
    c.data.kind = "synthetic"
    c.data.tile_px = 64
    c.data.teacher_px = 64
    c.data.downsample = 4
    c.data.jitter = (0.0, 0.0, 0.0, 0.0)  # the generator already varies stain per tile; flips + rot90 stay
    c.data.workers = 0  # on 2 cores, worker processes cost more (IPC) than they overlap
    c.data.n_train = 900  # 300 labelled tiles per class
    c.data.n_unlabeled = 3600

    for stage in ("teacher", "distill", "baseline", "control"):
        c[stage].steps = 1000
        c[stage].batch_size = 32 if stage == "teacher" else 64
        c[stage].eval_every_steps = 250
        c[stage].optim.learning_rate = 3e-3 if stage == "teacher" else 1e-3
        c[stage].optim.warmup_steps = 50
        c[stage].optim.weight_decay = 5e-2
    c.train.log_every_steps = 25
    c.train.checkpoint_every_steps = 250
    c.lock()
    return c
