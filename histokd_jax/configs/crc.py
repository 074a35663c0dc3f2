"""Colorectal cancer histology (Kather et al. 2016, TFDS ``colorectal_histology``): 8 tissue classes.

150 px tiles at ~0.495 um/px (20x); the teacher sees a 144 px crop at 20x, the student the same
crop at 5x (downsample 4 -> 36 px). The data are read from TFDS array_record files without
TensorFlow and never downloaded: prepare them beforehand, on a machine with network, e.g.

    tfds build colorectal_histology --file_format=array_record --data_dir=/data/tfds

then launch:

    python launch/train.py --config=configs/crc.py --workdir=/tmp/crc --config.data.tfds_data_dir=/data/tfds

The dataset has a single "train" split of 5000 tiles; it is cut 70/15/15 with TFDS slicing
(records are stored in a shuffled order). Tiles carry no patient ids, so tiles of one patient
may fall in several splits.
"""

from __future__ import annotations

import ml_collections

from histokd_jax.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = common.get_config(arg)
    c.data.kind = "tfds"
    c.data.tfds_name = "colorectal_histology"
    # The TFDS label order (ClassLabel names of colorectal_histology).
    c.data.class_names = ("tumor", "stroma", "complex", "lympho", "debris", "mucosa", "adipose", "empty")
    c.data.train_split = "train[:70%]"
    c.data.val_split = "train[70%:85%]"
    c.data.test_split = "train[85%:]"
    c.data.use_unlabeled = False  # no unlabelled pool: distillation reads the labelled train split
    c.data.teacher_magnification = "20x"
    c.data.student_magnification = "5x"
    c.data.teacher_px = 144  # random (train) / central (eval) crop of the 150 px tiles; 36 px student
    for stage, steps in (("teacher", 4000), ("distill", 8000), ("baseline", 4000)):  # ~55 steps per epoch
        c[stage].steps = steps
        c[stage].eval_every_steps = 250
    c.lock()
    return c
