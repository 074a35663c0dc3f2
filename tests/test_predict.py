"""Whole-slide inference (launch/predict.py) end to end.

The slides here are colour-coded on purpose (each class one stain colour, plus
noise): a few training steps learn them, so a test can ask whether prediction
recovers *where* each class is on a mixed slide, which is what the inference
plumbing (tissue grid, strip reads, pyramid levels, coordinates) decides.
The truth of the mixed slide comes from ``synthetic_slides.true_classes``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import openslide
import pytest
from PIL import Image

from histokd_jax import inference, trainer
from histokd_jax.data import synthetic_slides
from tests.tiny import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "cmu_small_region.svs"
pytestmark = pytest.mark.slow

CLASSES = ("pink", "purple", "blue")
COLOURS = np.array([(215, 95, 160), (120, 70, 170), (70, 130, 200)], np.float64)
GRID, TILE = 12, 64  # 768 x 768 level-0 px at 1 µm/px


def tissue_disc(n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    return (yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (0.42 * n) ** 2


def colour_slide(path: pathlib.Path, *, label: int | None, seed: int) -> None:
    """Tissue (a disc) coloured by class, glass (near white) outside; levels 1, 4, 16."""
    n = GRID * TILE
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    classes = synthetic_slides.true_classes(label=label, seed=seed, tile_grid=(GRID, GRID), tile_px=TILE, x=xx, y=yy)
    image = COLOURS[classes] + rng.normal(0, 12, (n, n, 3))
    image = np.where(tissue_disc(n)[..., None], image, 243 + rng.normal(0, 1.5, (n, n, 3)))
    synthetic_slides.write_pyramid_tiff(path, np.clip(np.rint(image), 0, 255).astype(np.uint8), mpp=1.0)


def train_colour_run(folder: pathlib.Path, *, steps: int = 40, scanlike: float = 0.0,
                     stages: tuple[str, ...] = ("teacher", "distill", "baseline")) -> pathlib.Path:
    """A tiny run on colour-coded slides (teacher at 10x, student at 2.5x) in ``folder``; returns its workdir."""
    root = folder / "colour_slides"
    root.mkdir(parents=True)
    rows = []
    for c in range(3):
        for i, split in enumerate(("train", "train", "val", "test")):
            name = f"{CLASSES[c]}_{i}.tiff"
            colour_slide(root / name, label=c, seed=100 * c + i)
            rows.append((name, CLASSES[c], split))
    colour_slide(root / "mixed_train.tiff", label=None, seed=7)
    rows.append(("mixed_train.tiff", "", "train"))
    with open(root / "manifest.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("slide", "label", "split"), *rows])
    config = tiny_config("")
    config.data.kind, config.data.manifest, config.data.class_names = "slides", str(root / "manifest.csv"), CLASSES
    config.data.teacher_magnification, config.data.student_magnification, config.data.downsample = "10x", "2.5x", 0
    config.data.scanlike_student_views = scanlike
    config.stages = stages
    for stage in stages:
        config[stage].steps, config[stage].eval_every_steps = steps, steps // 2
    workdir = folder / "run"
    trainer.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
    """Teacher, distilled student and baseline, 40 steps each."""
    return train_colour_run(tmp_path_factory.mktemp("trained"))


def predict(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(REPO / "launch/predict.py"), "--progress=false", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def read_csv(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    rects = np.array([[int(r[k]) for k in ("minx", "miny", "width", "height")] for r in rows])
    probs = np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])
    return rects, probs


@pytest.mark.parametrize("model, level, input_px", [("student", 1, 16), ("teacher", 0, 64)])
def test_predict_recovers_the_class_regions_of_a_mixed_slide(trained, tmp_path, model, level, input_px):
    slide = tmp_path / "mixed_new.tiff"
    colour_slide(slide, label=None, seed=31)  # a layout never seen in training
    out = tmp_path / "out"
    done = predict(f"--checkpoint={trained}", f"--model={model}", f"--out={out}", str(slide))
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads((out / "mixed_new.json").read_text())
    # the student reads 4 µm/px from the 4x level (never level 0); the teacher reads level 0
    assert (summary["level"], summary["input_px"], summary["input_mpp"]) == (level, input_px, 1.0 * 64 / input_px)
    rects, probs = read_csv(out / "mixed_new.csv")
    assert summary["tiles"] == len(rects) > 50 and (rects[:, 2:] == 64).all()
    centres = rects[:, :2] + 32
    # only tissue is tiled: every tile centre lies in the tissue disc
    assert tissue_disc(GRID * TILE)[centres[:, 1], centres[:, 0]].all()
    truth = synthetic_slides.true_classes(label=None, seed=31, tile_grid=(GRID, GRID), tile_px=TILE,
                                          x=centres[:, 0], y=centres[:, 1])
    assert len(np.unique(truth)) >= 2
    accuracy = np.mean(probs.argmax(1) == truth)
    assert accuracy > 0.8, f"tile accuracy {accuracy:.2f} against the true regions (chance is about 1/3)"
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)

    geo = json.loads((out / "mixed_new.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(rects)
    for feature in geo["features"]:
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        assert feature["geometry"]["type"] == "Polygon" and (ring[0] == ring[-1]).all()
        assert (ring >= 0).all() and (ring <= GRID * TILE).all()  # inside the slide bounds
        assert set(feature["properties"]["measurements"]) == {f"prob_{c}" for c in CLASSES}
    heat = np.asarray(Image.open(out / "mixed_new.heatmap.png").convert("RGB")).astype(float)
    side = round(GRID * TILE / summary["heatmap_mpp"])  # the thumbnail sits top-left, the legend below it
    assert heat.shape[0] > side and heat.shape[1] >= side
    # each tile is tinted with its top class's colour: the centre pixel is closer to it than to the others
    palette = np.asarray(inference.PALETTE[:3], float)
    scale = 1 / summary["heatmap_mpp"]
    pix = heat[(centres[:, 1] * scale).astype(int), (centres[:, 0] * scale).astype(int)]
    nearest = np.argmin(((pix[:, None] - palette[None]) ** 2).sum(-1), axis=1)
    assert np.mean(nearest == probs.argmax(1)) > 0.75  # the slide's own colour shows through the tint

    # a rerun finds the outputs complete and does not recompute them
    stamp = (out / "mixed_new.json").stat().st_mtime_ns
    again = predict(f"--checkpoint={trained}", f"--model={model}", f"--out={out}", str(slide))
    assert again.returncode == 0 and (out / "mixed_new.json").stat().st_mtime_ns == stamp


def test_bad_slides_are_skipped_with_a_reason_and_the_rest_goes_on(trained, tmp_path):
    good = tmp_path / "good.tiff"
    colour_slide(good, label=0, seed=5)
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(b"not a slide at all" * 100)
    out = tmp_path / "out"
    done = predict(f"--checkpoint={trained}", f"--out={out}", str(good), str(tmp_path / "missing.svs"), str(corrupt))
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "skipped_slides.csv", newline="") as handle:
        skipped = {pathlib.Path(r["slide"]).name: r["reason"] for r in csv.DictReader(handle)}
    assert set(skipped) == {"missing.svs", "corrupt.svs"}
    assert "not found" in skipped["missing.svs"] and "cannot read" in skipped["corrupt.svs"]
    assert json.loads((out / "good.json").read_text())["predicted"] == "pink"


def test_predict_on_the_real_fixture_tiles_only_tissue(trained, tmp_path):
    out = tmp_path / "out"
    done = predict(f"--checkpoint={trained}", f"--out={out}", str(FIXTURE))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "cmu_small_region.json").read_text())
    assert summary["slide_mpp"] == pytest.approx(0.499) and summary["level"] == 0  # its only level
    rects, _ = read_csv(out / "cmu_small_region.csv")
    assert len(rects) == summary["tiles"] > 5
    assert (rects[:, 2] == round(64 / 0.499)).all()
    with openslide.OpenSlide(FIXTURE) as slide:
        for x, y, w, h in rects:
            rgb = np.asarray(slide.read_region((int(x), int(y)), 0, (int(w), int(h))).convert("RGB"))
            saturation = np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1]
            assert (saturation > 25).mean() > 0.3 and rgb.mean() < 225, (x, y)  # tissue, not white glass


def test_predict_refuses_a_folder_that_is_not_a_run(tmp_path):
    done = predict(f"--checkpoint={tmp_path}", f"--out={tmp_path / 'o'}", str(FIXTURE))
    assert done.returncode != 0 and "not a training workdir" in done.stderr


def test_predict_on_a_run_with_the_old_student_folder_name_says_how_to_rename_it(tmp_path):
    run = tmp_path / "run"
    (run / "student_kd").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    done = predict(f"--checkpoint={run / 'student_kd'}", f"--out={tmp_path / 'o'}", str(FIXTURE))
    assert done.returncode != 0 and f"mv {run / 'student_kd'} {run / 'distill'}" in done.stderr
    assert not (tmp_path / "o").exists()


def redness_predictor(calls: list) -> inference.Predictor:
    """A stand-in model (no training): P(pink) = the fraction of pixels redder than blue; counts its calls."""
    def apply(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        red = (images[..., 0].astype(int) > images[..., 2]).mean(axis=(1, 2))
        return np.stack([red, 1 - red], axis=1).astype(np.float32)

    return inference.Predictor(role="distill", class_names=("pink", "blue"), input_mpp=4.0, input_px=16,
                               apply=apply, batch_size=64, source="stand-in")


def plain_slide(path: pathlib.Path, colour: tuple[int, int, int], seed: int) -> pathlib.Path:
    """256 x 256 px at 1 µm/px: a disc of one colour on glass."""
    rng = np.random.default_rng(seed)
    image = np.asarray(colour, float) + rng.normal(0, 8, (256, 256, 3))
    image = np.where(tissue_disc(256)[..., None], image, 243 + rng.normal(0, 1.5, (256, 256, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic_slides.write_pyramid_tiff(path, np.clip(np.rint(image), 0, 255).astype(np.uint8), mpp=1.0,
                                        levels=(1, 4))
    return path


def test_slides_with_the_same_stem_in_different_folders_each_get_their_own_outputs(tmp_path):
    pink = plain_slide(tmp_path / "case_a" / "x.tiff", (215, 95, 160), seed=1)
    blue = plain_slide(tmp_path / "case_b" / "x.tiff", (70, 130, 200), seed=2)
    other = plain_slide(tmp_path / "case_b" / "y.tiff", (215, 95, 160), seed=3)
    missing_a, missing_b = tmp_path / "case_a" / "gone.svs", tmp_path / "case_b" / "gone.svs"
    out, calls = tmp_path / "out", []
    entries = [(p, None, None) for p in (pink, blue, other, missing_a, missing_b)]
    summaries, skipped = inference.predict_slides(entries, predictor=redness_predictor(calls), out_dir=out,
                                                  show_progress=False)
    by_slide = {s["slide"]: s for s in summaries}
    assert set(by_slide) == {str(pink), str(blue), str(other)}
    assert by_slide[str(pink)]["predicted"] == "pink" and by_slide[str(blue)]["predicted"] == "blue"
    # the unique stem keeps its plain name; the two x.tiff get the stem plus a hash of their resolved path
    expected = {str(p): f"x-{hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:8]}" for p in (pink, blue)}
    assert {k: by_slide[k]["name"] for k in expected} == expected and by_slide[str(other)]["name"] == "y"
    for slide, s in by_slide.items():
        on_disk = json.loads((out / f"{s['name']}.json").read_text())
        assert on_disk["slide"] == slide and on_disk["predicted"] == s["predicted"]
        for suffix in (".csv", ".geojson", ".heatmap.png"):
            assert (out / f"{s['name']}{suffix}").is_file()
    _, probs_pink = read_csv_classes(out / f"{expected[str(pink)]}.csv", ("pink", "blue"))
    _, probs_blue = read_csv_classes(out / f"{expected[str(blue)]}.csv", ("pink", "blue"))
    assert (probs_pink[:, 0] > 0.5).all() and (probs_blue[:, 1] > 0.5).all()  # each file holds its own slide
    assert sorted(p for p, _ in skipped) == sorted([str(missing_a), str(missing_b)])
    with open(out / "skipped_slides.csv", newline="") as handle:
        assert sorted(r["slide"] for r in csv.DictReader(handle)) == sorted([str(missing_a), str(missing_b)])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    # reruns, with the same list or with either x.tiff alone, recompute nothing and keep the names
    for subset in ([pink, blue, other], [blue], [pink]):
        calls.clear()
        again, _ = inference.predict_slides([(p, None, None) for p in subset], predictor=redness_predictor(calls),
                                            out_dir=out, show_progress=False)
        assert calls == [] and [s["name"] for s in again] == [by_slide[str(p)]["name"] for p in subset]


def test_a_slide_alone_keeps_its_plain_name_and_a_later_namesake_gets_its_own(tmp_path):
    first = plain_slide(tmp_path / "case_a" / "x.tiff", (215, 95, 160), seed=1)
    second = plain_slide(tmp_path / "case_b" / "x.tiff", (70, 130, 200), seed=2)
    out, calls = tmp_path / "out", []
    done, _ = inference.predict_slides([(first, None, None)], predictor=redness_predictor(calls), out_dir=out,
                                       show_progress=False)
    assert done[0]["name"] == "x" and json.loads((out / "x.json").read_text())["slide"] == str(first)
    # the second x.tiff, alone or with the first, is not taken for the first's finished outputs
    for entries in ([second], [first, second]):
        calls.clear()
        done, _ = inference.predict_slides([(p, None, None) for p in entries], predictor=redness_predictor(calls),
                                           out_dir=out, show_progress=False)
        names = {s["slide"]: s["name"] for s in done}
        assert names[str(second)] == inference.hashed_name(second) != "x"
        assert names.get(str(first), "x") == "x"
        assert json.loads((out / "x.json").read_text())["slide"] == str(first)
        assert json.loads((out / f"{names[str(second)]}.json").read_text())["predicted"] == "blue"
        assert len(calls) == (1 if entries == [second] else 0)  # computed once, then found complete


def read_csv_classes(path: pathlib.Path, classes) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    rects = np.array([[int(r[k]) for k in ("minx", "miny", "width", "height")] for r in rows])
    return rects, np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])


def test_a_slide_named_like_the_runs_own_files_does_not_overwrite_them(tmp_path):
    """skipped_slides.csv and summary.json are the run's: slides of those stems get hashed names."""
    clash = plain_slide(tmp_path / "skipped_slides.tiff", (215, 95, 160), seed=1)
    summary = plain_slide(tmp_path / "summary.tiff", (70, 130, 200), seed=2)
    out, calls = tmp_path / "out", []
    done, _ = inference.predict_slides([(clash, None, None), (summary, None, None),
                                        (tmp_path / "gone.svs", None, None)],
                                       predictor=redness_predictor(calls), out_dir=out, show_progress=False)
    assert [s["name"] for s in done] == [inference.hashed_name(clash), inference.hashed_name(summary)]
    with open(out / "skipped_slides.csv", newline="") as handle:  # the run's list, not a slide's tiles
        assert [r["slide"] for r in csv.DictReader(handle)] == [str(tmp_path / "gone.svs")]
    _, probs = read_csv_classes(out / f"{inference.hashed_name(clash)}.csv", ("pink", "blue"))
    assert (probs[:, 0] > 0.5).all()


def test_the_summary_splits_the_wall_time_and_counts_the_pixels_read(tmp_path):
    """The phases of ``timings_s`` are all there and, but for the read-ahead thread's ``read`` (which
    overlaps ``compute``), add up to no more than the wall time; ``read_mpx`` is one 16 x 16 level-1 read
    per tile (a row of a disc is contiguous, so each strip reads exactly its tiles)."""
    slide = plain_slide(tmp_path / "p.tiff", (215, 95, 160), seed=4)
    summary = inference.predict_slide(slide, predictor=redness_predictor([]), out_dir=tmp_path / "o",
                                      show_progress=False)
    timings = summary["timings_s"]
    assert set(timings) == {"mask", "read", "read_wait", "compute", "outputs"}
    assert all(v >= 0 for v in timings.values())
    serial = timings["mask"] + timings["read_wait"] + timings["compute"] + timings["outputs"]
    assert serial <= summary["seconds"] + 1e-3
    assert summary["level"] == 1 and summary["tiles"] > 0
    assert summary["read_mpx"] * 1e6 == pytest.approx(summary["tiles"] * 16 * 16)


def test_the_cascade_on_a_trained_run_keeps_the_students_sure_tiles_and_takes_the_teachers_elsewhere(trained, tmp_path):
    """``--cascade --cascade_budget=0.25``: a quarter of the tiles, the student's least sure, carry the
    teacher's probabilities (as the teacher alone gives them), the rest the student's (as alone)."""
    slide = tmp_path / "mixed_cascade.tiff"
    colour_slide(slide, label=None, seed=41)
    done = predict(f"--checkpoint={trained}", "--cascade", "--cascade_budget=0.25", f"--out={tmp_path / 'c'}",
                   str(slide))
    assert done.returncode == 0, done.stderr[-3000:]
    for model in ("student", "teacher"):
        inference.predict_slide(slide, predictor=inference.load_predictor(trained, model=model),
                                out_dir=tmp_path / model, show_progress=False)
    with open(tmp_path / "c" / "mixed_cascade.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rects, probs = read_csv(tmp_path / "c" / "mixed_cascade.csv")
    student_rects, student = read_csv(tmp_path / "student" / "mixed_cascade.csv")
    teacher_rects, teacher = read_csv(tmp_path / "teacher" / "mixed_cascade.csv")
    assert (rects == student_rects).all() and (rects == teacher_rects).all()
    to_teacher = np.array([r["decided_by"] == "teacher" for r in rows])
    assert to_teacher.sum() == np.floor(0.25 * len(rows) + 0.5)  # a quarter, rounded half up
    np.testing.assert_allclose(probs[to_teacher], teacher[to_teacher], atol=2e-4)
    np.testing.assert_allclose(probs[~to_teacher], student[~to_teacher], atol=2e-4)
    top2 = np.sort(student, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    assert margin[to_teacher].max() <= margin[~to_teacher].min() + 2e-4  # the least sure went
    summary = json.loads((tmp_path / "c" / "mixed_cascade.json").read_text())
    assert summary["cascade"]["to_teacher"] == to_teacher.sum() and summary["cascade"]["teacher_level"] == 0
    refused = predict(f"--checkpoint={trained}", "--cascade_threshold=0.5", f"--out={tmp_path / 'x'}", str(slide))
    assert refused.returncode != 0 and "need --cascade" in refused.stderr


def test_students_are_also_scored_on_the_slides_own_pyramid_level(trained):
    """Beside the block mean it was trained on, each student's test tiles are read from the 4 µm/px level
    (as predict.py reads them): its saved probabilities are the student's on OpenSlide's own level-1
    reads, and the result row, report.md and the sweep table carry that accuracy."""
    from histokd_jax import report, sweep
    from histokd_jax.data.splits import load_splits

    config, _ = report.load_run(trained)
    test = load_splits(config.data, workdir=trained).test
    for role in ("distill", "baseline"):
        pyramid = report.load_predictions(trained / role, filename=report.PYRAMID_PREDICTIONS)
        block = report.load_predictions(trained / role)
        np.testing.assert_array_equal(pyramid["labels"], block["labels"])
        row = json.loads((trained / role / "result.json").read_text())
        assert row["pyramid_accuracy"] == pytest.approx(np.mean(pyramid["probs"].argmax(1) == pyramid["labels"]))
    assert not (trained / "teacher" / report.PYRAMID_PREDICTIONS).exists()

    student = inference.load_predictor(trained, model="student")
    picks = np.linspace(0, len(test) - 1, 8).astype(int)
    reads = []
    for i in picks:
        with openslide.OpenSlide(test.paths[test.slide_of[i]]) as slide:
            x, y = (int(v) for v in test.coords[i])
            reads.append(np.asarray(slide.read_region((x, y), 1, (16, 16)).convert("RGB")))
    batch = np.zeros((student.batch_size, 16, 16, 3), np.uint8)
    batch[:len(picks)] = reads
    pyramid = report.load_predictions(trained / "distill", filename=report.PYRAMID_PREDICTIONS)
    np.testing.assert_allclose(pyramid["probs"][picks], student.apply(batch)[:len(picks)], atol=1e-4)

    report.write_report(trained, n_boot=50)
    md = (trained / "report.md").read_text()
    assert "accuracy, pyramid reads" in md
    kd_accuracy = np.mean(pyramid["probs"].argmax(1) == pyramid["labels"])
    kd_line = next(line for line in md.splitlines() if line.startswith("| distill |"))
    assert kd_line.split("|")[6].strip().startswith(f"{kd_accuracy:.3f} [")  # the pyramid column
    rows = sweep.table_rows(trained, n_boot=50, measure=False)
    kd = next(r for r in rows if r["role"] == "distill")
    assert kd["pyramid_accuracy"] == pytest.approx(kd_accuracy)
    assert "pyramid_accuracy" not in next(r for r in rows if r["role"] == "teacher")
    assert "accuracy, pyramid reads" in sweep.format_table(rows)


def test_the_heatmap_reuses_the_masks_thumbnail_unless_told_its_resolution(tmp_path):
    """A 10.24 mm slide at 4 µm/px: the default heatmap (~10 µm/px) takes the 8 µm/px mask thumbnail
    as it is (no second read of the slide); an explicit --heatmap_mpp is honoured."""
    rng = np.random.default_rng(3)
    n = 2560
    image = np.where(tissue_disc(n)[..., None], np.array([215, 95, 160]) + rng.normal(0, 8, (n, n, 3)),
                     243 + rng.normal(0, 1.5, (n, n, 3)))
    slide = tmp_path / "big.tiff"
    synthetic_slides.write_pyramid_tiff(slide, np.clip(np.rint(image), 0, 255).astype(np.uint8), mpp=4.0,
                                        levels=(1, 4))
    default = inference.predict_slide(slide, predictor=redness_predictor([]), out_dir=tmp_path / "a",
                                      show_progress=False)
    assert default["heatmap_mpp"] == 8.0
    assert Image.open(tmp_path / "a" / "big.heatmap.png").size[0] == n // 2
    told = inference.predict_slide(slide, predictor=redness_predictor([]), out_dir=tmp_path / "b", heatmap_mpp=12.0,
                                   show_progress=False)
    assert told["heatmap_mpp"] == 12.0 and Image.open(tmp_path / "b" / "big.heatmap.png").size[0] == round(n / 3)


def run_wsinfer(export: pathlib.Path, slides: pathlib.Path, out: pathlib.Path, home: pathlib.Path):
    """WSInfer's own CLI (tests/wsinfer_cli.py: its torchvision import made to work on this CPU torch), offline,
    with an empty model-zoo registry: it loads the registry at start-up."""
    (home / ".wsinfer-zoo").mkdir(parents=True)
    (home / ".wsinfer-zoo" / "wsinfer-zoo-registry.json").write_text('{"models": {}}')
    env = dict(os.environ, HOME=str(home), HF_HUB_OFFLINE="1", WSINFER_FORCE_CPU="1")
    return subprocess.run([sys.executable, str(REPO / "tests" / "wsinfer_cli.py"), "--backend", "openslide", "run",
                           "-i", str(slides), "-o", str(out), "-c", str(export / "config.json"),
                           "-p", str(export / "model.pt"), "-n", "1"],  # -n 0 fails in WSInfer's GeoJSON step
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def export_and_run_both(trained: pathlib.Path, folder: pathlib.Path) -> tuple[np.ndarray, ...]:
    """Export ``trained``'s student for WSInfer, run WSInfer and predict.py on the CMU fixture alone; returns
    (predict.py's tile rectangles, its probabilities, WSInfer's rectangles, its probabilities)."""
    from wsinfer_zoo.client import validate_config_json

    export = folder / "export"
    done = subprocess.run([sys.executable, str(REPO / "launch" / "export_wsinfer.py"), f"--workdir={trained}",
                           "--model=student", f"--out={export}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((export / "config.json").read_text())
    assert validate_config_json(config)
    assert config["patch_size_pixels"] == 16 and config["spacing_um_px"] == pytest.approx(4.0)
    slides = folder / "slides"
    slides.mkdir()
    (slides / FIXTURE.name).symlink_to(FIXTURE)
    done = run_wsinfer(export, slides, folder / "wsinfer", folder / "home")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    done = predict(f"--checkpoint={trained}", f"--out={folder / 'ours'}", str(FIXTURE))
    assert done.returncode == 0, done.stderr[-3000:]
    return (*read_csv(folder / "ours" / f"{FIXTURE.stem}.csv"),
            *read_csv(folder / "wsinfer" / "model-outputs-csv" / f"{FIXTURE.stem}.csv"))


def match_tiles(ours: np.ndarray, theirs: np.ndarray) -> list[tuple[int, int]]:
    """(our row, WSInfer's row) of the same tile. WSInfer rounds the level-0 patch to whole pixels (128 here) and
    steps by it; predict.py steps by the exact 64 µm (128.26 px) and rounds each corner, so the grids drift apart
    (up to ~6 px over this slide). A tile matches WSInfer's nearest corner within an eighth of a tile in x and y."""
    gap = np.abs(ours[:, None, :2] - theirs[None, :, :2]).max(-1)
    nearest = gap.argmin(1)
    return [(i, j) for i, j in enumerate(nearest) if gap[i, j] <= ours[i, 2] / 8]


def agreement(ours: np.ndarray, mine: np.ndarray, theirs: np.ndarray, their_probs: np.ndarray) -> dict:
    pairs = match_tiles(ours, theirs)
    mine, their_probs = mine[[i for i, _ in pairs]], their_probs[[j for _, j in pairs]]
    same = float((mine.argmax(1) == their_probs.argmax(1)).mean())
    return {"matched": len(pairs), "tiles": len(ours), "same_top_class": same,
            "mean_prob_difference": float(np.abs(mine.mean(0) - their_probs.mean(0)).max())}


def test_wsinfer_runs_the_exported_student_and_agrees_with_predict_tile_by_tile(tmp_path_factory, tmp_path):
    """The export in the tool pathologists use: WSInfer reads a level-0 region and resizes it with PIL (bilinear,
    antialiased), predict.py area-averages the best level, so the two see different pixels. A student trained on
    what it will read (half its views scanner-like: Lanczos / bicubic, then JPEG) agrees, matched by level-0
    corner, on >= 90% of the tiles' top class and on the slide's mean probabilities within 0.03.
    (benchmarks/wsinfer_agreement.py measures this beside students of block means only, which agree less.)"""
    pytest.importorskip("wsinfer", reason="WSInfer is in the test extra: pip install -e '.[test]'")
    trained = train_colour_run(tmp_path_factory.mktemp("scanlike"), steps=120, scanlike=0.5,
                               stages=("teacher", "distill"))
    found = agreement(*export_and_run_both(trained, tmp_path))
    print(f"WSInfer vs predict.py: {found}")
    assert found["matched"] >= 0.9 * found["tiles"] > 5, found
    assert found["same_top_class"] >= 0.9, found
    assert found["mean_prob_difference"] <= 0.03, found
