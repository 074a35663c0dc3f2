"""Deployment on scan-like slides: what the students lose on real pyramid reads, what scanner-like
training views recover, and a student-then-teacher cascade's accuracy against its cost.

    python benchmarks/deploy.py --workdir=/tmp/histokd-deploy [--factors 4,8] [--size_um 7680]

In ``--workdir`` (reused where finished, so a rerun only measures):
  base/                configs/benchmark.py as it is: teacher at 10x (1 µm/px, 128 px), the 2.5x student
  f<F>_scanlike<S>/    the same teacher (``teacher.checkpoint``) and slides, a student at factor F trained with
                       ``data.scanlike_student_views`` = S (0: block means, as base)

The test slides are generated here (``data.scanner_slides``, nothing downloaded): mixed-class scans
at 40x, Aperio-like (levels 1/4/16/32, Lanczos + JPEG q80) and with 2x steps (1/2/4/8, bicubic +
JPEG q85), from a bank of multiscale tissue blocks drawn with another seed than the training slides.
Tile accuracy is against the true class at each tile's centre (tiles whose centre is glass are left
out), over all slides of a scanner. Each student is read two ways: as ``launch/predict.py`` reads it
(its own pyramid level; the deployment view) and as it was trained (the slide at the teacher's 1 µm/px,
block-averaged to the student's µm/px). The cascade runs ``predict_slide`` with the student first and
the teacher on the least confident share (margin) of each slide's tiles, from 0 to 100%; its cost is
the wall time over the teacher's alone, both measured here after a warm-up pass.

Targets (issue 13): the cascade within 1 point of the teacher's accuracy at no more than 25% of its time.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

SHARES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)
TARGET_COST, TARGET_POINTS = 0.25, 0.01


def student_config(base: pathlib.Path, *, factor: int, scanlike: float):
    from histokd_jax.configs import benchmark

    config = benchmark.get_config()
    config.stages = ("teacher", "distill")
    config.teacher.checkpoint = str(base / "teacher")
    config.data.root = str(base / "slides")
    config.data.student_magnification = f"{10 / factor:g}x"
    config.data.scanlike_student_views = scanlike
    config.train.final_report = False
    return config


def train_runs(workdir: pathlib.Path, *, factors: list[int], scanlike: float) -> dict[tuple[int, float], pathlib.Path]:
    """The finished run of each (factor, scanlike share), trained here where missing."""
    from histokd_jax.configs import benchmark
    from histokd_jax import messages, trainer

    base = workdir / "base"
    if not (base / "distill" / "result.json").exists():
        messages.say(f"training {base} (configs/benchmark.py: teacher, 2.5x student, baseline)")
        trainer.train_and_evaluate(benchmark.get_config(), base)
    runs = {}
    for factor in factors:
        for share in (0.0, scanlike):
            run = base if (factor, share) == (4, 0.0) else workdir / f"f{factor}_scanlike{share:g}"
            if not (run / "distill" / "result.json").exists():
                messages.say(f"training {run}")
                trainer.train_and_evaluate(student_config(base, factor=factor, scanlike=share), run)
            runs[(factor, share)] = run
    return runs


def write_slides(root: pathlib.Path, *, n: int, size_um: float, seed: int) -> list[tuple[str, pathlib.Path, object]]:
    from histokd_jax.data import scanner_slides

    t0 = time.perf_counter()
    bank = scanner_slides.tissue_bank(seed=seed, per_class=4)
    print(f"tissue bank (4 blocks per class, seed {seed}) drawn in {time.perf_counter() - t0:.1f} s", flush=True)
    out = []
    for key, scanner in (("aperio40", scanner_slides.APERIO_40X), ("steps40", scanner_slides.STEPS_40X)):
        for i in range(n):
            path = root / f"{key}_{i}.tiff"
            t0 = time.perf_counter()
            info = scanner_slides.write_scan(path, scanner=scanner, seed=seed + i, size_um=size_um, bank=bank)
            print(f"{path.name}: {size_um / 1000:g} mm at {scanner.mpp} µm/px, levels "
                  f"{'/'.join(map(str, scanner.downsamples))}, written in {time.perf_counter() - t0:.1f} s", flush=True)
            out.append((key, path, info["layout"]))
    return out


def tile_truth(csv_path: pathlib.Path, *, layout, mpp: float, class_names) -> tuple[np.ndarray, np.ndarray, list]:
    """(true class at each tile's centre, predicted class, decided_by or None) from a predict CSV."""
    from histokd_jax.data import scanner_slides

    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    x = np.array([int(r["minx"]) + int(r["width"]) / 2 for r in rows])
    y = np.array([int(r["miny"]) + int(r["height"]) / 2 for r in rows])
    probs = np.array([[float(r[f"prob_{c}"]) for c in class_names] for r in rows])
    truth = scanner_slides.true_classes(layout, x=x, y=y, mpp=mpp)
    return truth, probs.argmax(1), [r.get("decided_by") for r in rows]


def as_trained(student, *, teacher_mpp: float, factor: int):
    """The student fed as in training: the slide read at the teacher's µm/px, then block-averaged."""
    from histokd_jax.data import views

    def apply(images: np.ndarray) -> np.ndarray:
        return student.apply(np.stack([views.area_downsample(im, factor) for im in images]))

    return dataclasses.replace(student, input_mpp=teacher_mpp, input_px=student.input_px * factor, apply=apply)


def run_over(slides, predictor, *, out: pathlib.Path, min_tissue: float, cascade=None) -> dict:
    """Accuracy (per scanner) and seconds of ``predictor`` (optionally a cascade) over every slide."""
    from histokd_jax import inference

    correct, total, seconds, sent = {}, {}, 0.0, 0
    for key, path, layout in slides:
        summary = inference.predict_slide(path, predictor=predictor, out_dir=out, min_tissue=min_tissue,
                                          cascade=cascade, show_progress=False)
        truth, pred, _ = tile_truth(out / f"{path.stem}.csv", layout=layout, mpp=summary["slide_mpp"],
                                    class_names=predictor.class_names)
        tissue = truth >= 0
        correct[key] = correct.get(key, 0) + int((pred[tissue] == truth[tissue]).sum())
        total[key] = total.get(key, 0) + int(tissue.sum())
        seconds += summary["seconds"]
        sent += summary.get("cascade", {}).get("to_teacher", 0)
    acc = {k: correct[k] / total[k] for k in correct}
    acc["all"] = sum(correct.values()) / sum(total.values())
    return {"accuracy": acc, "tiles": total, "seconds": seconds, "to_teacher": sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/histokd-deploy")
    parser.add_argument("--factors", default="4,8")
    parser.add_argument("--scanlike", type=float, default=0.5, help="share of scanner-like views for the option")
    parser.add_argument("--slides", type=int, default=2, help="test slides per scanner kind")
    parser.add_argument("--size_um", type=float, default=7680.0)
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args()

    import jax

    from histokd_jax import cascade, inference, plots

    workdir = pathlib.Path(args.workdir).absolute()
    factors = [int(f) for f in args.factors.split(",")]
    t_start = time.perf_counter()
    runs = train_runs(workdir, factors=factors, scanlike=args.scanlike)
    print(f"runs ready in {time.perf_counter() - t_start:.0f} s; jax {jax.__version__}", flush=True)
    base_config = json.loads((workdir / "base" / "config.json").read_text())
    min_tissue = float(base_config["data"]["min_tissue"])
    results = {"command": " ".join(sys.argv), "runs": {f"f{f}_s{s:g}": str(p) for (f, s), p in runs.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        slides = write_slides(tmp / "slides", n=args.slides, size_um=args.size_um, seed=args.seed)
        teacher = inference.load_predictor(runs[(factors[0], 0.0)], model="teacher", batch_size=64)
        warmed = {}  # id -> predictor (kept alive, so an id is never reused)

        def measured(name, predictor, **kwargs):
            if id(predictor) not in warmed:  # compile once, on one slide
                run_over(slides[:1], predictor, out=tmp / "warm", min_tissue=min_tissue)
                warmed[id(predictor)] = predictor
            got = run_over(slides, predictor, out=tmp / name, min_tissue=min_tissue, **kwargs)
            print(f"  {name:<34} " + "  ".join(f"{k} {v:.3f}" for k, v in got["accuracy"].items())
                  + f"  ({sum(got['tiles'].values())} tiles, {got['seconds']:.1f} s)", flush=True)
            return got

        print(f"\ntile accuracy against the true classes (min_tissue {min_tissue}):", flush=True)
        results["teacher"] = measured("teacher 10x", teacher)
        results["students"] = {}
        students = {}
        for (factor, share), run in runs.items():
            student = inference.load_predictor(run, model="student", batch_size=256)
            trained = as_trained(student, teacher_mpp=teacher.input_mpp, factor=factor)
            key = f"{10 / factor:g}x scanlike {share:g}"
            results["students"][key] = {
                "as_trained": measured(f"{key}: as trained (block mean)", trained),
                "pyramid": measured(f"{key}: pyramid read", student)}
            students[key] = student
        print_gap(results["students"])

        print("\ncascade: student, then the teacher on the least confident share of each slide (margin)", flush=True)
        curves, results["cascade"] = {}, {}
        t_teacher = results["teacher"]["seconds"]
        for key in [k for k in students if k.startswith(f"{10 / factors[0]:g}x")]:
            points = []
            for s in SHARES:
                chain = inference.Cascade(teacher=teacher, rule=cascade.Rule(score="margin", budget=s))
                got = measured(f"{key}, {s:.0%} to teacher", students[key], cascade=chain)
                points.append((s, got["seconds"] / t_teacher, got["accuracy"]["all"]))
            curves[key] = points
            results["cascade"][key] = points
            print_operating_point(key, points, teacher_acc=results["teacher"]["accuracy"]["all"])
        plot = workdir / "cascade.png"
        plots.cascade_curve(plot, curves, teacher_accuracy=results["teacher"]["accuracy"]["all"],
                            target_cost=TARGET_COST, title=f"cascade on {len(slides)} scan-like slides")
        print(f"\nplot: {plot}")
    (workdir / "deploy.json").write_text(json.dumps(results, indent=1))
    print(f"figures: {workdir / 'deploy.json'}; total {time.perf_counter() - t_start:.0f} s")


def print_gap(students: dict) -> None:
    print("\ntrain/deploy gap (pyramid read - as trained), per scanner:")
    for key, got in students.items():
        a, p = got["as_trained"]["accuracy"], got["pyramid"]["accuracy"]
        print(f"  {key:<22} " + "  ".join(f"{k} {p[k] - a[k]:+.3f} ({a[k]:.3f} -> {p[k]:.3f})" for k in a))


def print_operating_point(key: str, points, *, teacher_acc: float) -> None:
    good = [(s, c, a) for s, c, a in points if a >= teacher_acc - TARGET_POINTS]
    if not good:
        print(f"  {key}: no share within {TARGET_POINTS * 100:g} point of the teacher ({teacher_acc:.3f}): MISSED")
        return
    s, c, a = min(good, key=lambda p: p[1])
    verdict = "met" if c <= TARGET_COST else "MISSED"
    print(f"  {key}: operating point {s:.0%} to the teacher, accuracy {a:.3f} (teacher {teacher_acc:.3f}), "
          f"{c:.0%} of the teacher's time; target <= {TARGET_COST:.0%} within {TARGET_POINTS * 100:g} point: {verdict}")


if __name__ == "__main__":
    main()
