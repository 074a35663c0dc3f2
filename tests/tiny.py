"""A tiny version of the demo config (seconds per stage) shared by the slow tests."""

from __future__ import annotations

import ml_collections

from histokd_jax.configs import demo, demo_tiles

# The same settings as command-line overrides of configs/demo_tiles.py (or configs/demo.py), for
# launch/train.py runs.
TINY_FLAGS = [
    "--config.data.n_train=48",
    "--config.data.n_unlabeled=48",
    "--config.data.n_val=24",
    "--config.data.n_test=24",
    "--config.model.widths=(8, 16, 16, 32)",
    "--config.model.num_groups=4",
    "--config.teacher.steps=6",
    "--config.distill.steps=6",
    "--config.baseline.steps=6",
    "--config.teacher.batch_size=16",
    "--config.distill.batch_size=16",
    "--config.baseline.batch_size=16",
    "--config.teacher.eval_every_steps=3",
    "--config.distill.eval_every_steps=3",
    "--config.baseline.eval_every_steps=3",
    "--config.train.eval_batch_size=16",
    "--config.train.log_every_steps=1",
    "--config.train.checkpoint_every_steps=2",
    "--config.train.progress=False",
    "--config.train.final_report=False",
]
# With configs/demo.py (synthetic slides): few, small slides (5 per class: 3 train, 1 val, 1 test) of
# 64 px tiles.
TINY_SLIDE_FLAGS = [
    "--config.data.slides_per_class=5",
    "--config.data.test_slides_per_class=0",
    "--config.data.n_unlabeled_slides=2",
    "--config.data.slide_tiles=6",
    "--config.data.tile_px=64",
    "--config.data.teacher_px=64",
]


def tiny_config(data_root: str = "") -> ml_collections.ConfigDict:
    """configs/demo_tiles.py with every TINY_FLAGS override applied."""
    config = demo_tiles.get_config()
    for flag in TINY_FLAGS:
        path, value = flag.removeprefix("--config.").split("=", 1)
        *parents, leaf = path.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = type(node[leaf])(eval(value)) if not isinstance(node[leaf], str) else value  # noqa: S307
    config.data.root = data_root
    return config


def chromatin_slide_data() -> ml_collections.ConfigDict:
    """configs/demo.py's data settings (slides at 10x -> 2.5x), unlocked, for the chromatin-only slides
    ``synthetic_slides.write_slide_set`` writes by default (its classes, 64 px tiles)."""
    from histokd_jax.data import synthetic

    data = demo.get_config().data
    data.unlock()
    data.class_names = synthetic.CLASS_NAMES
    data.tile_px = data.teacher_px = 64
    data.min_tissue = 0.5
    return data
