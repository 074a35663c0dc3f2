"""The demo on whole slides: synthetic pyramidal TIFFs read through OpenSlide, tiled over tissue.

    python launch/train.py --config=configs/demo_slides.py --workdir=/tmp/histokd-demo-slides

Slides (one class each; tiles inherit the slide's label) and unlabelled mixed slides
are written under ``workdir/slides`` from ``data.seed`` with a manifest; each slide
is indexed once (tissue mask, tile grid at 10x) and cached in ``workdir/slide_index``.
The teacher reads 64 px tiles at 10x (1 µm/px); the student sees them at 2.5x (16 px).
"""

from __future__ import annotations

import ml_collections

from configs import demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = demo.get_config(arg)
    c.unlock()
    c.data.kind = "synthetic_slides"
    c.data.class_names = ("solid", "speckled", "vesicular")
    c.data.teacher_magnification = "10x"  # the synthetic slides are scanned at 1 µm/px
    c.data.student_magnification = "2.5x"
    c.data.downsample = 0  # derived from the magnifications: 4
    c.lock()
    return c
