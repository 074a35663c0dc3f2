"""The embedded demo: synthetic H&E-like tiles, teacher at 64 px, student at 16 px (4x downsample).

    python launch/train.py --config=configs/demo.py --workdir=/tmp/histokd-demo

Tiles are generated under ``workdir/data`` from ``data.seed`` (nothing is downloaded).
Tiny smoke run: add ``--config.teacher.steps=20 --config.distill.steps=20 --config.baseline.steps=20``.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = common.get_config(arg)
    c.data.kind = "synthetic"
    c.data.tile_px = 64
    c.data.teacher_px = 64
    c.data.downsample = 4
    c.data.jitter = (0.1, 0.1, 0.1, 0.02)  # mild: the synthetic classes are told apart partly by stain
    c.data.workers = 0

    for stage, steps in (("teacher", 600), ("distill", 1200), ("baseline", 1200)):
        c[stage].steps = steps
        c[stage].batch_size = 32 if stage == "teacher" else 64
        c[stage].eval_every_steps = 200
        c[stage].optim.warmup_steps = 50
        c[stage].optim.weight_decay = 5e-2
    c.train.log_every_steps = 25
    c.train.checkpoint_every_steps = 200
    c.lock()
    return c
