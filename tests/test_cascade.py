"""The student-then-teacher cascade: which tiles reach the teacher, and what the outputs say."""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
import pytest
import scipy.stats

from histokd_jax import cascade, inference
from histokd_jax.data import synthetic_slides


def test_confidences_match_hand_values_and_scipy():
    probs = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.7, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(cascade.margin(probs), [0.0, 1.0, 0.5, 0.0], atol=1e-12)
    rng = np.random.default_rng(0)
    random = rng.dirichlet(np.ones(4), size=50)
    expected = 1 - scipy.stats.entropy(random, axis=1) / np.log(4)
    np.testing.assert_allclose(cascade.entropy_confidence(random), expected, atol=1e-9)
    np.testing.assert_allclose(cascade.entropy_confidence(probs[[1, 3]]), [1.0, 0.0], atol=1e-9)


def test_a_tile_above_the_threshold_never_reaches_the_teacher_and_one_below_always_does():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(size=1000)
    for threshold in (0.0, 0.2, 0.5, 0.9, 1.0):
        sent = cascade.route(confidence, threshold=threshold)
        assert not sent[confidence >= threshold].any() and sent[confidence < threshold].all()
    edge = np.array([0.3, 0.29999, 0.30001])
    assert cascade.route(edge, threshold=0.3).tolist() == [False, True, False]  # strictly below


def test_a_budget_sends_the_least_confident_share():
    rng = np.random.default_rng(2)
    confidence = rng.uniform(size=200)
    for budget in (0.0, 0.1, 0.25, 0.5, 1.0):
        sent = cascade.route(confidence, budget=budget)
        k = int(np.floor(budget * 200 + 0.5))
        assert sent.sum() == k
        if 0 < k < 200:  # every sent tile is less confident than every kept one
            assert confidence[sent].max() < confidence[~sent].min()
    # with a threshold too: below it, and at most the budget's count of those
    sent = cascade.route(confidence, threshold=0.05, budget=0.5)
    np.testing.assert_array_equal(sent, confidence < 0.05)
    sent = cascade.route(confidence, threshold=0.9, budget=0.1)
    assert sent.sum() == 20 and (confidence[sent] < 0.9).all()
    assert cascade.route(np.array([0.4, 0.1, 0.1, 0.9]), budget=0.25).tolist() == [False, True, False, False]


def test_bad_rules_are_refused():
    for kwargs, words in [({}, "threshold, a teacher budget"), ({"threshold": 1.5}, "threshold must be"),
                          ({"budget": -0.1}, "budget must be"), ({"score": "max", "budget": 0.1}, "score must be")]:
        with pytest.raises(ValueError, match=words):
            cascade.Rule(**kwargs)


def gradient_slide(path: pathlib.Path) -> pathlib.Path:
    """512 x 256 px at 1 µm/px, all tissue: redness rises left to right, so a redness model's
    confidence varies from tile to tile."""
    rng = np.random.default_rng(5)
    share = np.broadcast_to(np.linspace(0, 1, 512)[None, :, None], (256, 512, 1))
    image = share * np.array([215, 95, 160]) + (1 - share) * np.array([70, 130, 200])
    image = image + rng.normal(0, 6, image.shape)
    synthetic_slides.write_pyramid_tiff(path, np.clip(np.rint(image), 0, 255).astype(np.uint8), mpp=1.0,
                                        levels=(1, 4))
    return path


def stand_in(*, mpp: float, px: int, calls: list, constant: np.ndarray | None = None) -> inference.Predictor:
    """P(pink) = the share of pixels redder than blue (or ``constant`` for every tile); records its inputs."""
    def apply(images: np.ndarray) -> np.ndarray:
        calls.append(images.copy())
        if constant is not None:
            return np.tile(constant, (len(images), 1)).astype(np.float32)
        red = (images[..., 0].astype(int) > images[..., 2]).mean(axis=(1, 2))
        return np.stack([red, 1 - red], axis=1).astype(np.float32)

    return inference.Predictor(role="distill", class_names=("pink", "blue"), input_mpp=mpp, input_px=px,
                               apply=apply, batch_size=8, source=f"stand-in {mpp}")


def tile_rows(path: pathlib.Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_cascade_replaces_the_unsure_tiles_with_the_teachers_and_says_so(tmp_path):
    slide = gradient_slide(tmp_path / "g.tiff")
    student_calls, teacher_calls = [], []
    student = stand_in(mpp=4.0, px=8, calls=student_calls)  # 32 µm tiles from level 1
    teacher_probs = np.array([0.125, 0.875])
    teacher = stand_in(mpp=1.0, px=32, calls=teacher_calls, constant=teacher_probs)  # level 0
    rule = cascade.Rule(score="margin", threshold=0.6)
    summary = inference.predict_slide(slide, predictor=student, out_dir=tmp_path / "o", min_tissue=0.0,
                                      cascade=inference.Cascade(teacher=teacher, rule=rule), show_progress=False)
    inference.predict_slide(slide, predictor=stand_in(mpp=4.0, px=8, calls=[]), out_dir=tmp_path / "s",
                            min_tissue=0.0, show_progress=False)
    rows, plain = tile_rows(tmp_path / "o" / "g.csv"), tile_rows(tmp_path / "s" / "g.csv")
    assert len(rows) == len(plain) == summary["tiles"] == 8 * 16
    p_student = np.array([float(r["prob_pink"]) for r in plain])
    margin = np.abs(2 * p_student - 1)  # two classes: top minus runner-up
    assert 0 < (margin < 0.6).sum() < len(rows)  # the slide has sure and unsure tiles
    for row, student_row, m in zip(rows, plain, margin):
        assert (row["minx"], row["miny"]) == (student_row["minx"], student_row["miny"])
        if m < 0.6:
            assert row["decided_by"] == "teacher"
            assert (float(row["prob_pink"]), float(row["prob_blue"])) == tuple(teacher_probs)
        else:
            assert row["decided_by"] == "student" and row["prob_pink"] == student_row["prob_pink"]
        assert float(row["student_margin"]) == pytest.approx(m, abs=2e-5)
    sent = int((margin < 0.6).sum())
    # the teacher saw exactly the unsure tiles, at its own 32 px from level 0 (padded to its batch of 8)
    assert sum(len(c) for c in teacher_calls) == 8 * int(np.ceil(sent / 8))
    assert all(c.shape[1:] == (32, 32, 3) for c in teacher_calls)
    chain = summary["cascade"]
    assert (chain["to_teacher"], chain["teacher_level"], chain["score"], chain["threshold"]) == (sent, 0, "margin", 0.6)
    assert chain["teacher_share"] == pytest.approx(sent / len(rows), abs=1e-5) and summary["model"] == "distill"
    # the student's 8 px from the 4x level, the teacher's 32 px from level 0
    assert summary["level"] == 1 and summary["read_mpx"] * 1e6 == pytest.approx(len(rows) * 8 * 8 + sent * 32 * 32)
    assert {"teacher_read", "teacher_compute"} <= set(summary["timings_s"])
    geo = json.loads((tmp_path / "o" / "g.geojson").read_text())
    assert [f["properties"]["decided_by"] for f in geo["features"]] == [r["decided_by"] for r in rows]

    # a rerun with another rule recomputes; with the same one it does not
    calls_before = len(student_calls)
    inference.predict_slides([(slide, None, None)], predictor=student, out_dir=tmp_path / "o", min_tissue=0.0,
                             cascade=inference.Cascade(teacher=teacher, rule=rule), show_progress=False)
    assert len(student_calls) == calls_before
    again, _ = inference.predict_slides([(slide, None, None)], predictor=student, out_dir=tmp_path / "o",
                                        min_tissue=0.0, show_progress=False,
                                        cascade=inference.Cascade(teacher=teacher, rule=cascade.Rule(budget=1.0)))
    assert len(student_calls) > calls_before and again[0]["cascade"]["to_teacher"] == len(rows)


def test_a_teacher_of_other_tiles_or_classes_is_refused(tmp_path):
    slide = gradient_slide(tmp_path / "g.tiff")
    student = stand_in(mpp=4.0, px=8, calls=[])
    rule = cascade.Rule(budget=0.5)
    for teacher, words in [(stand_in(mpp=1.0, px=64, calls=[]), "same tissue"),
                           (inference.Predictor(role="teacher", class_names=("a", "b"), input_mpp=1.0, input_px=32,
                                                apply=None, batch_size=8, source="x"), "classes")]:
        with pytest.raises(ValueError, match=words):
            inference.predict_slide(slide, predictor=student, out_dir=tmp_path / "o",
                                    cascade=inference.Cascade(teacher=teacher, rule=rule), show_progress=False)
    assert not (tmp_path / "o" / "g.json").exists()


def test_strips_are_runs_of_neighbouring_tiles_so_gaps_are_never_read():
    """A cascade's teacher gets scattered tiles: each read must cover only side-by-side tiles of a row
    (at most strip_tiles of them), never the tiles or glass between."""
    side = 100.0
    columns = {0: [0, 1, 2, 5, 6, 9], 3: [4, 5, 6, 7, 8]}  # grid row -> grid columns present
    coords = np.array([(c * side, r * side) for r, cols in columns.items() for c in cols])
    strips = inference.tile_strips(coords, side=side, strip_tiles=2)
    as_columns = [sorted(int(coords[i, 0] / side) for i in strip) for strip in strips]
    assert as_columns == [[0, 1], [2], [5, 6], [9], [4, 5], [6, 7], [8]]
    assert sorted(np.concatenate(strips).tolist()) == list(range(len(coords)))
