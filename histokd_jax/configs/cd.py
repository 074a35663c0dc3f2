"""Celiac disease (CD): Abnormal / Normal / Sprue; teacher at 10x, student at 5x by default.

The CD tiles are private; point the config at your copy (root/<split>/<class>/*.png, tiles
extracted at the teacher magnification, optional root/unlabeled/ pool), or at a slide manifest
(CSV slide,label,split[,mpp]; tiles are cut from the slides at the configured magnifications):

    python launch/train.py --config=configs/cd.py --workdir=/tmp/cd \
        --config.data.root=/path/to/cd_tiles [--config.data.student_magnification=1.25x]
    python launch/train.py --config=configs/cd.py --workdir=/tmp/cd --config.data.manifest=/path/to/manifest.csv
"""

from __future__ import annotations

import ml_collections

from histokd_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = common.get_config(arg)
    c.data.kind = "folder"
    c.data.class_names = ("Abnormal", "Normal", "Sprue")
    c.data.teacher_magnification = "10x"
    c.data.student_magnification = "5x"
    c.data.teacher_px = 224
    c.lock()
    return c
