"""Whole-slide inference time: the teacher at its resolution vs students at factors 2, 4 and 8.

    python benchmarks/wholeslide.py [--grid 48] [--repeats 3]

One synthetic pyramidal slide (levels 1, 4, 16 at 1 µm/px) is written once; each
model then runs ``inference.predict_slide`` over all its tissue (tissue mask, strip
reads from the best pyramid level, batched forward passes, all four outputs) in
its own process, so the peak resident memory is that model's alone. Wall times
include the reads; the first pass (compilation) is discarded and the median of the
rest is reported. Speed does not depend on the weights, so fresh ones are used.
The paper model (widths 32-256, 32 groups) with a 128 px teacher at 1 µm/px, so
the students see 64, 32 and 16 px.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

TEACHER_PX, TEACHER_MPP = 128, 1.0
FACTORS = (1, 2, 4, 8)


def run_one(slide: pathlib.Path, factor: int, repeats: int, batch_size: int) -> dict:
    import jax
    import numpy as np

    from configs import common
    from histokd_jax import evaluation, inference, parallel, trainer
    from histokd_jax.state import init_params

    config = common.get_config()
    px = TEACHER_PX // factor
    model = trainer.make_model(config, num_classes=3)
    mesh = parallel.make_mesh()
    params = parallel.put_replicated(init_params(model, rng=jax.random.key(0), input_px=px), mesh=mesh)
    eval_fn = evaluation.make_eval_fn(model=model, image_key="image", mesh=mesh)
    predictor = inference.Predictor(
        role=f"f{factor}", class_names=("a", "b", "c"), input_mpp=TEACHER_MPP * factor, input_px=px,
        apply=lambda images: np.asarray(eval_fn(params, parallel.put_batch({"image": images}, mesh=mesh))),
        batch_size=batch_size, source="random weights")
    times, summary = [], None
    with tempfile.TemporaryDirectory() as out:
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            summary = inference.predict_slide(slide, predictor=predictor, out_dir=out, show_progress=False)
            times.append(time.perf_counter() - t0)
    return {"factor": factor, "input_px": px, "mpp": TEACHER_MPP * factor, "level": summary["level"],
            "tiles": summary["tiles"], "seconds": float(np.median(times[1:])), "first_seconds": times[0],
            "gflops": trainer.gflops_per_image(model, input_px=px),
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; getrusage's ru_maxrss would include the parent's
    peak from before exec)."""
    status = pathlib.Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=48, help="slide side in 64 px cells (48: 3072 px)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--slide", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(pathlib.Path(args.slide), args.one, args.repeats, args.batch_size)))
        return

    from histokd_jax.data import synthetic_slides

    with tempfile.TemporaryDirectory() as tmp:
        slide = pathlib.Path(tmp) / "bench.tiff"
        t0 = time.perf_counter()
        synthetic_slides.write_slide(slide, label=None, seed=0, tile_grid=(args.grid, args.grid), tile_px=64)
        print(f"slide: {args.grid * 64} x {args.grid * 64} px at 1 µm/px, levels 1/4/16 "
              f"(written in {time.perf_counter() - t0:.0f} s); batch {args.batch_size}; median of {args.repeats} "
              "warm passes", flush=True)
        rows = []
        for factor in FACTORS:
            done = subprocess.run([sys.executable, __file__, f"--one={factor}", f"--slide={slide}",
                                   f"--repeats={args.repeats}", f"--batch_size={args.batch_size}"],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    teacher = rows[0]
    print(f"{'model':<9}{'px':>5}{'µm/px':>7}{'level':>6}{'tiles':>7}{'wall s':>9}{'tiles/s':>9}{'speedup':>9}"
          f"{'FLOP ratio':>12}{'peak RSS MB':>13}")
    for r in rows:
        name = "teacher" if r["factor"] == 1 else f"student/{r['factor']}"
        print(f"{name:<9}{r['input_px']:>5}{r['mpp']:>7.0f}{r['level']:>6}{r['tiles']:>7}{r['seconds']:>9.2f}"
              f"{r['tiles'] / r['seconds']:>9.0f}{teacher['seconds'] / r['seconds']:>9.1f}"
              f"{teacher['gflops'] / r['gflops']:>12.1f}{r['peak_rss_mb']:>13.0f}")


if __name__ == "__main__":
    main()
