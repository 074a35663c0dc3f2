"""Input pipeline tiles/s (tile folders and slides; 0, 1, 2 grain workers) beside what the step consumes.

    python benchmarks/pipeline.py [--batches 30]

The chromatin-only demo's settings (configs/demo_tiles.py, and configs/demo.py's slides with
that generator's 64 px tiles: 64 px teacher view, 16 px student view, flips + rot90, no colour
jitter, batch 64 for distillation). Each line times full
training batches from ``make_train_loader`` (decode or slide read, augmentation,
both views) after a warm-up; the last line times the jitted distillation step on
the same batch size, i.e. the rate at which training consumes tiles. Also prints
the step's first-call (compile) time and this process's peak resident memory.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from histokd_jax.configs import demo, demo_tiles  # noqa: E402
from histokd_jax import model_config, parallel, steps  # noqa: E402
from histokd_jax.data import synthetic  # noqa: E402
from histokd_jax.data.pipeline import make_train_loader  # noqa: E402
from histokd_jax.data.splits import load_splits, view_spec  # noqa: E402
from histokd_jax.optim import make_optimizer  # noqa: E402
from histokd_jax.state import create_train_state, init_params  # noqa: E402

BATCH = 64


def peak_rss_mb() -> float:
    return int(pathlib.Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024


def loader_rate(source, config, *, workers: int, batches: int) -> float:
    it = iter(make_train_loader(source, spec=view_spec(config.data, train=True), batch_size=BATCH, seed=0,
                                workers=workers))
    for _ in range(3):  # warm-up: worker start, slide handles
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * BATCH / (time.perf_counter() - start)


def step_rate(config, splits, *, batches: int) -> tuple[float, float]:
    """(tiles/s consumed by the jitted distillation step, first-call seconds)."""
    model = model_config.make_model(config, num_classes=len(splits.class_names))
    spec = view_spec(config.data, train=True)
    mesh = parallel.make_mesh()
    teacher = parallel.put_replicated(init_params(model, rng=jax.random.key(0), input_px=spec.teacher_px), mesh=mesh)
    tx = make_optimizer(config.distill.optim, total_steps=10_000)
    state = parallel.put_replicated(create_train_state(
        init_params(model, rng=jax.random.key(1), input_px=spec.student_px), tx=tx), mesh=mesh)
    step = jax.jit(functools.partial(steps.distill_step, student=model, teacher=model, tx=tx,
                                     loss=steps.DistillLoss()), donate_argnums=0)
    it = iter(make_train_loader(splits.pool, spec=spec, batch_size=BATCH, seed=0, workers=0))
    batch = parallel.put_batch(next(it), mesh=mesh)
    start = time.perf_counter()
    state, metrics = step(state, teacher, batch)
    jax.block_until_ready(metrics["loss"])
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        state, metrics = step(state, teacher, batch)
    jax.block_until_ready(metrics["loss"])
    return batches * BATCH / (time.perf_counter() - start), compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain reads its absl flags in worker processes
    with tempfile.TemporaryDirectory() as tmp:
        tiles_cfg, slides_cfg = demo_tiles.get_config(), demo.get_config()
        for c in (tiles_cfg, slides_cfg):
            c.unlock()
            c.train.progress = False
        tiles_cfg.data.n_train, tiles_cfg.data.n_unlabeled = 600, 1200
        slides_cfg.data.slides_per_class, slides_cfg.data.n_unlabeled_slides = 5, 6
        slides_cfg.data.update(generator="chromatin", class_names=synthetic.CLASS_NAMES, tile_px=64, teacher_px=64,
                               test_slides_per_class=0, min_tissue=0.5, jitter=(0.0, 0.0, 0.0, 0.0))
        print(f"batch {BATCH}, demo views (64 px teacher, 16 px student, flips + rot90); tiles/s", flush=True)
        splits = {}
        for name, config in (("tile folder", tiles_cfg), ("slides", slides_cfg)):
            splits[name] = load_splits(config.data, workdir=pathlib.Path(tmp) / name.replace(" ", "_"))
            for workers in (0, 1, 2):
                rate = loader_rate(splits[name].pool, config, workers=workers, batches=args.batches)
                print(f"  {name:<12} {workers} worker(s) {rate:>8.0f}", flush=True)
        rate, compile_s = step_rate(tiles_cfg, splits["tile folder"], batches=args.batches)
        print(f"  distillation step consumes {rate:>8.0f}   (first call incl. compile {compile_s:.1f} s)")
        print(f"peak resident memory of this process: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
