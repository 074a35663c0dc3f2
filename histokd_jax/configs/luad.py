"""Lung adenocarcinoma (LUAD) growth patterns; teacher at 10x, student at 1.25x (64x fewer FLOPs).

The LUAD data are private; point the config at your tiles (root/<split>/<class>/*.png at 10x) or
at a slide manifest (CSV slide,label,split[,mpp]) with --config.data.manifest=/path/to/manifest.csv:

    python launch/train.py --config=configs/luad.py --workdir=/tmp/luad --config.data.root=/path/to/luad_tiles
"""

from __future__ import annotations

import ml_collections

from histokd_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = common.get_config(arg)
    c.data.kind = "folder"
    c.data.class_names = ("Acinar", "Lepidic", "Micropapillary", "Papillary", "Solid")
    c.data.teacher_magnification = "10x"
    c.data.student_magnification = "1.25x"
    c.data.teacher_px = 224  # a 28 px student at 1.25x
    c.lock()
    return c
