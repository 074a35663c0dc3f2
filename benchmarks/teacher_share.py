"""The teacher's share of distillation: what each cheaper-target option saves per step.

    python benchmarks/teacher_share.py [--rounds 7] [--factor 4]

Options (``distill.*`` in configs/common.py; ``histokd_jax/teacher_targets.py``):
  default            the teacher runs live on every student view (float32)
  teacher bf16       the teacher alone computes in bfloat16 (``teacher_dtype``)
  2 / 4 views/crop   one teacher pass per crop, 2 or 4 flipped/turned student views of it (``views_per_crop``)
  target cache       teacher targets of the un-jittered pool, computed once (``target_cache``)

1. Step speed at the paper's scale: teacher 256 px, student 256/f px, 32 student views per
   step, AdamW; every option's step timed back to back in each round (medians, and the
   median of the per-round ratios to the default). The cache's one-off pass is reported
   per pool crop.

What each option costs in accuracy, and its wall time in a whole distillation stage, is measured
on the multi-scale benchmark by ``launch/ablate.py`` (BENCHMARKS.md, "Ablations").
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from histokd_jax.configs import common  # noqa: E402
from histokd_jax import models, optim, state, steps  # noqa: E402
from histokd_jax.data.views import area_downsample  # noqa: E402

WIDTHS = (32, 64, 128, 256)
OPTIONS = {  # name -> distill config overrides
    "default": {},
    "teacher bf16": {"teacher_dtype": "bfloat16"},
    "2 views/crop": {"views_per_crop": 2},
    "4 views/crop": {"views_per_crop": 4},
    "target cache": {"target_cache": True},
}


def _views(teacher_images: np.ndarray, factor: int) -> dict:
    students = np.stack([np.rint(area_downsample(im.astype(np.float32), factor)).astype(np.uint8)
                         for im in teacher_images])
    n = len(teacher_images)
    return {"teacher_image": teacher_images, "student_image": students,
            "label": np.zeros(n, np.int32), "has_label": np.zeros(n, bool)}


def step_options(*, factor: int, batch: int, teacher_px: int = 256):
    """name -> (jitted step, student state, teacher params, batch), all for ``batch`` student views."""
    model = models.ResNetGN(num_classes=3, widths=WIDTHS)
    teacher_params = state.init_params(model, rng=jax.random.key(0), input_px=teacher_px)
    student_params = state.init_params(model, rng=jax.random.key(1), input_px=teacher_px // factor)
    tx = optim.make_optimizer(common.get_config().distill.optim, total_steps=10_000)
    crops = np.random.default_rng(0).integers(0, 256, (batch, teacher_px, teacher_px, 3), dtype=np.uint8)
    full = _views(crops, factor)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, models.normalize_images(x)))
    logits, features = forward(teacher_params, jnp.asarray(crops))
    cached = dict(full, teacher_logits=np.asarray(logits), teacher_map=np.asarray(models.last_stage(features)))
    out = {}
    for name, option in OPTIONS.items():
        k = option.get("views_per_crop", 1)
        teacher = model.clone(dtype=jnp.bfloat16) if option.get("teacher_dtype") else model
        data = cached if option.get("target_cache") else {key: v[: batch // k] for key, v in full.items()}
        fn = jax.jit(functools.partial(steps.distill_step, student=model, teacher=teacher, tx=tx, views_per_crop=k),
                     donate_argnums=0)
        own = jax.tree.map(jnp.copy, student_params)  # each option donates its own state
        out[name] = [fn, state.create_train_state(own, tx=tx), teacher_params,
                     {key: jnp.asarray(v) for key, v in data.items()}]
    return out, forward, teacher_params, jnp.asarray(crops)


def time_steps(*, factor: int, batch: int, rounds: int) -> None:
    options, forward, teacher_params, crops = step_options(factor=factor, batch=batch)
    for entry in options.values():  # compile and warm up
        for _ in range(2):
            entry[1], metrics = entry[0](entry[1], entry[2], entry[3])
        jax.block_until_ready(metrics)
    times: dict[str, list[float]] = {name: [] for name in options}
    teacher_forward = []
    for _ in range(rounds):
        for name, entry in options.items():
            t0 = time.perf_counter()
            entry[1], metrics = entry[0](entry[1], entry[2], entry[3])
            jax.block_until_ready(metrics)
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(forward(teacher_params, crops))
        teacher_forward.append(time.perf_counter() - t0)
    base = np.asarray(times["default"])
    print(f"\ndistillation step, teacher 256 px, student {256 // factor} px, {batch} student views per step, "
          f"{rounds} interleaved rounds")
    print("| option | ms / step | student views / s | speedup over default (paired) |")
    print("|---|---:|---:|---:|")
    for name, t in times.items():
        t = np.asarray(t)
        print(f"| {name} | {np.median(t) * 1e3:.0f} | {batch / np.median(t):.0f} | {np.median(base / t):.2f}x |")
    per_crop = float(np.median(teacher_forward)) / batch
    print(f"target cache, one-off: the teacher's forward pass costs {per_crop * 1e3:.2f} ms per pool crop "
          f"(a pool of 100,000 crops: {per_crop * 1e5 / 60:.1f} min)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    time_steps(factor=args.factor, batch=args.batch, rounds=args.rounds)


if __name__ == "__main__":
    main()
