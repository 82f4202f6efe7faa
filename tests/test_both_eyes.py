"""Both eyes (issue 25): each eye keeps its own grade, the patient gets a decision.

The blend never gives the partner more than 40 %, a stored larger weight is clipped with a
warning, the fusion head keeps the single eye's order of a patient's two eyes on held-out
asymmetric pairs, and predict --pair-eyes writes the eye's own figures beside the both-eyes
ones with the method and the patient's decision."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import untrained_best
from PIL import Image

from tools import predict
from tools.make_synthetic import render_fundus
from trainer.base.bestfile import add_to_best
from trainer.base.heads import build_head
from trainer.base.metrics import kappa_of
from trainer.judging.evaluation import EvalResult
from trainer.judging.pairing import (
    BLENDS,
    MAX_BLEND,
    blend_partners,
    choose_blend,
    choose_blend_and_cuts,
)


def agreeing_eyes(seed: int, patients: int, noise: float = 0.6):
    """Keys, grades and single-eye scores of patients whose two eyes share the grade."""
    rng = np.random.default_rng(seed)
    grades = np.repeat(rng.choice(5, size=patients, p=[0.5, 0.1, 0.2, 0.1, 0.1]), 2)
    keys = [f"{p}_{eye}" for p in range(patients) for eye in ("left", "right")]
    return keys, grades, (grades + rng.normal(0, noise, 2 * patients)).astype(np.float32)


def test_the_blend_is_searched_only_below_averaging():
    """Eyes that always agree would be best averaged (w = 0.5); the search stops at 0.4."""
    assert max(BLENDS) == MAX_BLEND == 0.4
    keys, grades, scores = agreeing_eyes(0, 400)
    scores = scores[:, None]
    head = build_head("regress")
    weight = choose_blend(keys, scores, lambda o: kappa_of(grades, head.grades(o)))
    assert weight == MAX_BLEND
    weight, _ = choose_blend_and_cuts(keys, scores, grades, (0.5, 1.5, 2.5, 3.5))
    assert 0 < weight <= MAX_BLEND


def test_a_stored_weight_above_the_limit_is_clipped_with_a_warning(capsys):
    keys = ["90_left", "90_right"]
    scores = np.array([[0.1], [3.9]], np.float32)  # a healthy eye beside a grade-4 one
    blended = blend_partners(keys, scores, 0.5)  # what an older checkpoint stored
    assert "both-eyes weight 0.50" in capsys.readouterr().err
    assert blended == pytest.approx(blend_partners(keys, scores, MAX_BLEND))
    assert blended[:, 0] == pytest.approx([0.1 * 0.6 + 3.9 * 0.4, 3.9 * 0.6 + 0.1 * 0.4])
    assert blended[0, 0] < blended[1, 0]  # averaged, both eyes had one score (2.0)


def asymmetric_pairs(rng, pairs: int, noise: float):
    """Held-out patients with one grade-0 and one grade-4 eye (which eye is random)."""
    grades = np.zeros(2 * pairs, dtype=np.int64)
    sick = rng.integers(0, 2, pairs) + 2 * np.arange(pairs)
    grades[sick] = 4
    keys = [f"90{p}_{eye}" for p in range(pairs) for eye in ("left", "right")]
    return keys, grades, (grades + rng.normal(0, noise, 2 * pairs)).astype(np.float32)


def with_features(keys, grades, scores, rng) -> EvalResult:
    """An evaluation whose backbone features carry the single eye's score, and noise."""
    features = rng.normal(0, 1, (len(keys), 8)).astype(np.float32)
    features[:, 0] = scores
    return EvalResult(
        loss=0.0, keys=keys, labels=grades, outputs=scores[:, None], head=build_head("regress"),
        features=features,
    )  # fmt: skip


def test_fusion_keeps_the_single_eyes_order_of_a_patients_two_eyes():
    """Trained where both eyes agree, the partner's features say as much as the eye's own; on
    asymmetric pairs (grade 0 beside grade 4) the fused outputs must still order the two eyes
    as the eye alone does, in every pair the eye alone orders right."""
    from trainer.judging.fusion import FusionSettings, fused_result, train_fusion

    rng = np.random.default_rng(1)
    train, val = (
        with_features(*agreeing_eyes(seed, n, noise=0.8), rng) for seed, n in ((2, 300), (3, 80))
    )
    fusion = train_fusion(train, val, build_head("regress"), FusionSettings(epochs=20, hidden=32))
    held_out = with_features(*asymmetric_pairs(rng, 40, noise=0.8), rng)
    fused = fused_result(fusion, held_out).outputs[:, 0]
    alone = held_out.outputs[:, 0]
    sick = held_out.labels.reshape(-1, 2).argmax(axis=1)
    first = np.arange(0, len(alone), 2)
    right_alone = (alone[first + sick] > alone[first + 1 - sick]).nonzero()[0]
    assert len(right_alone) >= 30  # the eye alone orders most pairs right
    rows = first[right_alone]
    agree = np.sign(fused[rows + sick[right_alone]] - fused[rows + 1 - sick[right_alone]])
    assert (agree > 0).all(), f"{(agree <= 0).sum()} of {len(rows)} pairs reordered by fusion"
    # and the fused head still learns from the partner where the eyes agree
    fused_val = fused_result(fusion, val)
    assert fused_val.kappa > val.with_cuts(tuple(fusion["cut_points"])).kappa


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A classify checkpoint that stored an averaging weight (0.5) and a referral threshold."""
    path = tmp_path_factory.mktemp("pairs") / "best.pt"
    metrics = {"pair_blend": 0.5, "referable_threshold": 0.4, "temperature": 1.3}
    untrained_best(path, metrics=metrics)
    add_to_best(path, "pair_blend", 0.5)  # as an older version stored it (it searched up to 0.5)
    return path


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_predict_pair_eyes_keeps_each_eyes_own_figures(tmp_path, checkpoint, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate(["1_left", "1_right", "2_left", "2_right", "3_left"]):
        Image.fromarray(render_fundus(4 * (i % 2), rng, 96)).save(photos / f"{name}.jpeg")
    assert (
        predict.main(["--checkpoint", str(checkpoint), str(photos), "--out", str(tmp_path / "a")])
        == 0
    )
    assert "weight 0.50" in capsys.readouterr().err  # clipped where best.pt is read, and said so
    argv = ["--checkpoint", str(checkpoint), str(photos), "--out", str(tmp_path / "p")]
    assert predict.main([*argv, "--pair-eyes"]) == 0
    out = capsys.readouterr()
    assert (
        "both eyes: 2 pair(s) of one patient's left and right eye graded together "
        "(blend w=0.40), 1 photograph(s) without their partner graded alone"
    ) in out.out
    alone = {
        Path(r["image"]).stem: r for r in csv.DictReader((tmp_path / "a/predictions.csv").open())
    }
    rows = {
        Path(r["image"]).stem: r for r in csv.DictReader((tmp_path / "p/predictions.csv").open())
    }
    probs = {k: np.array([float(r[f"p{g}"]) for g in range(5)]) for k, r in alone.items()}
    for key, row in rows.items():
        assert int(row["pred_alone"]) == int(alone[key]["grade"])
        assert float(row["referable_score_alone"]) == pytest.approx(
            float(alone[key]["referable_score"])
        )
        partner = key.replace("left", "x").replace("right", "left").replace("x", "right")
        if partner not in rows:
            assert row["pair_method"] == "alone" and row["grade"] == alone[key]["grade"]
            continue
        assert row["pair_method"] == "blend w=0.40"
        # logits are log-probabilities * T up to a constant per row: blend them, then calibrate
        own, other = np.log(probs[key])[None], np.log(probs[partner])[None]
        expected = softmax(0.6 * own + 0.4 * other)[0]
        assert [float(row[f"p{g}"]) for g in range(5)] == pytest.approx(expected, abs=1e-5)
    for key, row in rows.items():  # the patient is referable when either eye is
        eyes = [r for k, r in rows.items() if k.split("_")[0] == key.split("_")[0]]
        either = max(float(r["referable_score"]) >= 0.4 for r in eyes)
        assert int(row["patient_referable"]) == int(either)


@pytest.mark.slow
def test_evaluate_says_which_outputs_its_headline_shows(
    straight_run, tiny_shards, tmp_path, capsys
):
    from trainer import evaluate

    best = str(straight_run / "best.pt")
    for extra, shown in (([], "each eye alone"), (["--pair-eyes"], "both eyes blended w=")):
        argv = ["--checkpoint", best, "--shards", str(tiny_shards), "--out", str(tmp_path / "e")]
        evaluate.main(argv + extra)
        headline = next(
            line for line in capsys.readouterr().out.splitlines() if " on test (" in line
        )
        assert f"images, {shown}" in headline, headline
