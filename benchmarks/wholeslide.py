"""Whole-slide inference time on scan-like slides: the teacher at 10x against students at 5x, 2.5x, 1.25x.

    python benchmarks/wholeslide.py [--repeats 3] [--scanners aperio40,aperio20,steps40]

Slides come from ``data.scanner_slides`` (generated here, nothing downloaded): a 10.24 mm square
of tissue and glass at 40x (40960 px, levels 1/4/16/32, Lanczos + JPEG q80), the same tissue at
20x (20480 px) and a 40x scan with 2x steps (levels 1/2/4/8, bicubic + JPEG q85), and a quarter
of the area at 40x to check that peak memory does not grow with the slide. Each model runs
``inference.predict_slide`` over all its tissue in its own process (so the peak resident memory
is that model's alone): tissue mask, strip reads from its own pyramid level, batched forward
passes, CSV + GeoJSON + heatmap + summary. The first pass (compilation) is discarded; the pass
with the median wall time of the rest is reported with its split. Speed does not depend on the
weights, so fresh ones are used: the paper model (widths 32-256, 32 groups), a 256 px teacher at
1 µm/px (256 µm tiles), students at 128 / 64 / 32 px.

Targets (issue 13): the 1.25x student at least 50% of the analytic FLOP ratio, the 2.5x student
at least 60%; peak memory flat in slide size.
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

TEACHER_PX, TEACHER_MPP = 256, 1.0
FACTORS = (1, 2, 4, 8)
TARGET_SHARE = {4: 0.6, 8: 0.5}  # share of the FLOP ratio the student must reach
PHASES = ("mask", "read", "read_wait", "compute", "outputs")


def run_one(slide: pathlib.Path, factor: int, repeats: int, batch_size: int) -> dict:
    import jax
    import numpy as np

    from histokd_jax.configs import common
    from histokd_jax import evaluation, inference, model_config, parallel
    from histokd_jax.state import init_params

    config = common.get_config()
    px = TEACHER_PX // factor
    model = model_config.make_model(config, num_classes=3)
    mesh = parallel.make_mesh()
    params = parallel.put_replicated(init_params(model, rng=jax.random.key(0), input_px=px), mesh=mesh)
    eval_fn = evaluation.make_eval_fn(model=model, image_key="image", mesh=mesh)
    predictor = inference.Predictor(
        role=f"f{factor}", class_names=("a", "b", "c"), input_mpp=TEACHER_MPP * factor, input_px=px,
        apply=lambda images: np.asarray(eval_fn(params, parallel.put_batch({"image": images}, mesh=mesh))),
        batch_size=batch_size, source="random weights")
    passes = []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(repeats + 1):
            passes.append(inference.predict_slide(slide, predictor=predictor, out_dir=out, show_progress=False))
    warm = sorted(passes[1:], key=lambda s: s["seconds"])
    median = warm[len(warm) // 2]
    return {"factor": factor, "input_px": px, "mpp": TEACHER_MPP * factor, "level": median["level"],
            "level_downsample": median["level_downsample"], "tiles": median["tiles"],
            "seconds": median["seconds"], "first_seconds": passes[0]["seconds"], "timings_s": median["timings_s"],
            "read_mpx": median["read_mpx"], "gflops": model_config.gflops_per_image(model, input_px=px),
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; getrusage's ru_maxrss would include the parent's
    peak from before exec)."""
    status = pathlib.Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def measure(slide: pathlib.Path, args) -> list[dict]:
    rows = []
    for factor in FACTORS:
        done = subprocess.run([sys.executable, __file__, f"--one={factor}", f"--slide={slide}",
                               f"--repeats={args.repeats}", f"--batch_size={args.batch_size}"],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"factor {factor} on {slide.name} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def mask_recall(info: dict, scanner, *, kept: int) -> str:
    """How many tiles of the teacher's grid have their centre in tissue by the slide's layout, beside
    the number the tissue mask kept (a mask that drops tissue makes a slide look cheaper than it is)."""
    import numpy as np

    from histokd_jax.data import scanner_slides

    side = TEACHER_PX * TEACHER_MPP / scanner.mpp
    n = int(info["level_dimensions"][0][0] // side)
    centres = (np.arange(n) + 0.5) * side
    x, y = (a.ravel() for a in np.meshgrid(centres, centres))
    tissue = int((scanner_slides.true_classes(info["layout"], x=x, y=y, mpp=scanner.mpp) >= 0).sum())
    return f"tissue mask: {kept} teacher tiles kept; {tissue} of the grid's {n * n} have their centre in tissue"


def print_table(rows: list[dict]) -> None:
    teacher = rows[0]
    print(f"{'model':<15}{'px':>4}{'level':>6}{'tiles':>6}{'wall s':>8}"
          + "".join(f"{p:>10}" for p in PHASES)
          + f"{'tiles/s':>8}{'slides/h':>9}{'read MB':>8}{'RSS MB':>7}{'speedup':>8}{'FLOPs':>7}{'share':>7}  target")
    for r in rows:
        name = "teacher 10x" if r["factor"] == 1 else f"student {10 / r['factor']:g}x"
        speedup, ratio = teacher["seconds"] / r["seconds"], teacher["gflops"] / r["gflops"]
        share = speedup / ratio
        target = TARGET_SHARE.get(r["factor"])
        verdict = "" if target is None else f">= {target:.0%} of ratio: {'met' if share >= target else 'MISSED'}"
        print(f"{name:<15}{r['input_px']:>4}{'ds' + format(r['level_downsample'], 'g'):>6}{r['tiles']:>6}"
              f"{r['seconds']:>8.2f}" + "".join(f"{r['timings_s'].get(p, 0.0):>10.3f}" for p in PHASES)
              + f"{r['tiles'] / r['seconds']:>8.0f}{3600 / r['seconds']:>9.0f}{3 * r['read_mpx']:>8.0f}"
              f"{r['peak_rss_mb']:>7.0f}{speedup:>8.1f}{ratio:>7.1f}{share:>7.0%}  {verdict}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--scanners", default="aperio40,aperio20,steps40")
    parser.add_argument("--size_um", type=float, default=10240.0)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--slide", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(pathlib.Path(args.slide), args.one, args.repeats, args.batch_size)))
        return

    import jax

    from histokd_jax.data import scanner_slides

    scanners = {"aperio40": scanner_slides.APERIO_40X, "aperio20": scanner_slides.APERIO_20X,
                "steps40": scanner_slides.STEPS_40X}
    print(f"jax {jax.__version__}; batch {args.batch_size}; median of {args.repeats} warm passes; wall time split "
          "into mask / read (background thread, overlaps compute) / read_wait / compute / outputs, in s")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        bank = scanner_slides.tissue_bank(seed=0)
        print(f"tissue bank drawn in {time.perf_counter() - t0:.1f} s", flush=True)
        peaks = {}
        for key in args.scanners.split(","):
            for size in (args.size_um, args.size_um / 2) if key == "aperio40" else (args.size_um,):
                scanner, slide = scanners[key], pathlib.Path(tmp) / f"{key}_{size:g}.tiff"
                t0 = time.perf_counter()
                info = scanner_slides.write_scan(slide, scanner=scanner, bank=bank, size_um=size)
                w, h = info["level_dimensions"][0]
                print(f"\n{key}: {size / 1000:g} mm square, level 0 {w} x {h} px at {scanner.mpp} µm/px, downsamples "
                      f"{'/'.join(map(str, scanner.downsamples))}, written in {time.perf_counter() - t0:.1f} s "
                      f"({slide.stat().st_size / 1e6:.0f} MB)", flush=True)
                rows = measure(slide, args)
                print(mask_recall(info, scanner, kept=rows[0]["tiles"]))
                print_table(rows)
                peaks[(key, size)] = [r["peak_rss_mb"] for r in rows]
                slide.unlink()
    if ("aperio40", args.size_um) in peaks:
        big, small = peaks[("aperio40", args.size_um)], peaks[("aperio40", args.size_um / 2)]
        print("\npeak RSS MB, 4x the area (aperio40): " + ", ".join(
            f"f{f} {s:.0f} -> {b:.0f}" for f, s, b in zip(FACTORS, small, big))
            + f"; target flat: largest growth {max(b / s for s, b in zip(small, big)) - 1:+.0%}")


if __name__ == "__main__":
    main()
