"""The embedded demo: the multi-scale benchmark's 2.5x row. Synthetic lung-adenocarcinoma-like whole
slides read through OpenSlide; teacher at 10x (128 px), student at 2.5x (32 px, 4x downsample).

    python launch/train.py --config=configs/demo.py --workdir=/tmp/histokd-demo

Pyramidal TIFF slides (one class each; tiles inherit the slide's label), unlabelled mixed-class
slides and many test slides are written under ``workdir/slides`` from ``data.seed`` with a
manifest (nothing is downloaded); each slide is indexed once (tissue mask, tile grid at 10x) and
cached in ``workdir/slide_index``. It is ``configs/benchmark.py`` with the teacher, the distilled
student and the label-only baseline: the same figures as seed 0's 2.5x row of
``launch/reproduce.py``. ``configs/demo_tiles.py`` is the older chromatin-only demo from tile folders.
Tiny smoke run: add ``--config.teacher.steps=20 --config.distill.steps=20 --config.baseline.steps=20``.
"""

from __future__ import annotations

import ml_collections

from histokd_jax.configs import benchmark


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = benchmark.get_config(arg)
    c.unlock()
    c.stages = ("teacher", "distill", "baseline")
    c.train.heatmap_slides = 1  # end with the distilled student's heatmap of one test slide
    c.lock()
    return c
