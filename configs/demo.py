"""The embedded demo: synthetic whole slides read through OpenSlide, teacher at 10x (64 px),
student at 2.5x (16 px, 4x downsample).

    python launch/train.py --config=configs/demo.py --workdir=/tmp/histokd-demo

Pyramidal TIFF slides (one class each; tiles inherit the slide's label) and unlabelled
mixed-class slides are written under ``workdir/slides`` from ``data.seed`` with a
manifest (nothing is downloaded); each slide is indexed once (tissue mask, tile grid
at 10x) and cached in ``workdir/slide_index``. ``configs/demo_tiles.py`` is the same
demo from generated tile folders.
Tiny smoke run: add ``--config.teacher.steps=20 --config.distill.steps=20 --config.baseline.steps=20``.
"""

from __future__ import annotations

import ml_collections

from configs import demo_tiles


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = demo_tiles.get_config(arg)
    c.unlock()
    c.data.kind = "synthetic_slides"
    c.data.class_names = ("solid", "speckled", "vesicular")
    c.data.teacher_magnification = "10x"  # the synthetic slides are scanned at 1 µm/px
    c.data.student_magnification = "2.5x"
    c.data.downsample = 0  # derived from the magnifications: 4
    c.data.slides_per_class = 10  # 6 train, 2 validation, 2 test slides per class
    c.data.n_unlabeled_slides = 24
    c.train.heatmap_slides = 1  # end with the distilled student's heatmap of one test slide
    # Shorter student stages keep the whole demo under 10 minutes on 2 cores; the best validation step is kept.
    c.distill.steps = 800
    c.baseline.steps = 500
    c.lock()
    return c
