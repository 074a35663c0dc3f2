"""PatchCamelyon (Veeling et al. 2018, TFDS ``patch_camelyon``): lymph-node metastasis, 2 classes.

96 px tiles at ~0.97 um/px (10x); label 1 means tumour in the central 32x32 region. The teacher
sees the whole 96 px tile at 10x, the student the same tile at 2.5x (downsample 4 -> 24 px).
The data are read from TFDS array_record files without TensorFlow and never downloaded: prepare
them beforehand, on a machine with network, e.g.

    tfds build patch_camelyon --file_format=array_record --data_dir=/data/tfds

then launch:

    python launch/train.py --config=configs/pcam.py --workdir=/tmp/pcam --config.data.tfds_data_dir=/data/tfds
"""

from __future__ import annotations

import ml_collections

from histokd_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = common.get_config(arg)
    c.data.kind = "tfds"
    c.data.tfds_name = "patch_camelyon"
    c.data.class_names = ("normal", "tumor")  # TFDS labels 0 and 1
    c.data.train_split = "train"  # 262,144 tiles
    c.data.val_split = "validation"  # 32,768
    c.data.test_split = "test"  # 32,768
    c.data.use_unlabeled = False  # no unlabelled pool: distillation reads the labelled train split
    c.data.teacher_magnification = "10x"
    c.data.student_magnification = "2.5x"
    c.data.teacher_px = 96
    c.lock()
    return c
