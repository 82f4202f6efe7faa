"""trainer/base/heads.py and trainer/judging/pairing.py: what each head's outputs mean, cut-point tuning, both eyes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from pipeline.errors import UserError
from trainer.base.heads import DEFAULT_CUTS, HEADS, build_head, tune_cuts
from trainer.base.metrics import kappa_of, referable_score
from trainer.fitting.config import HEADS as HEAD_CHOICES
from trainer.judging.pairing import blend_partners, choose_blend, partner_index


def test_the_cli_offers_every_head():
    assert set(HEAD_CHOICES) == set(HEADS)


@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_gives_probabilities_and_grades_that_agree(name):
    head = build_head(name)
    rng = np.random.default_rng(0)
    out = (rng.normal(size=(200, head.outputs)) * 2 + (2 if name == "regress" else 0)).astype(
        np.float32
    )
    probs, grades = head.probs(out), head.grades(out)
    assert (
        probs.shape == (200, 5)
        and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
        and (probs >= -1e-7).all()
    )
    assert grades.shape == (200,) and set(np.unique(grades)) <= set(range(5))
    assert np.array_equal(
        head.train_grades(torch.from_numpy(out)).numpy(), grades
    )  # the device version
    labels = torch.from_numpy(rng.integers(0, 5, 200))
    loss, weights = head.loss_sums(torch.from_numpy(out), labels, None)
    assert torch.isfinite(loss) and weights == 200


@pytest.mark.parametrize("name", list(HEADS))
def test_class_weights_weigh_each_sample_by_its_grade(name):
    """The weighted loss against torch's own losses: cross-entropy's ``weight``, and the
    regression and per-threshold binary losses weighted by hand."""
    head = build_head(name)
    rng = np.random.default_rng(4)
    out = torch.from_numpy(rng.normal(size=(50, head.outputs)).astype(np.float32) + 1)
    labels = torch.from_numpy(rng.integers(0, 5, 50))
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])
    loss, total = head.loss_sums(out, labels, weights)
    per_sample = weights[labels]
    assert float(total) == pytest.approx(float(per_sample.sum()))
    if name == "classify":  # its mean is torch's weighted mean
        want = F.cross_entropy(out, labels, weight=weights, reduction="sum")
    elif name == "regress":
        # MSE, the regress head's default loss
        want = (F.mse_loss(out[:, 0], labels.float(), reduction="none") * per_sample).sum()
    else:
        above = (labels[:, None] > torch.arange(4)).float()  # grade > k, k = 0..3
        bce = F.binary_cross_entropy_with_logits(out, above, reduction="none").sum(dim=1)
        want = (bce * per_sample).sum()
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    unweighted, _ = head.loss_sums(out, labels, None)
    assert float(loss) != pytest.approx(float(unweighted), rel=1e-3)


def test_regress_probabilities_follow_the_cut_points():
    head = build_head("regress")
    hand = np.array([-1.0, 0.49, 0.51, 1.2, 1.51, 2.49, 2.6, 3.49, 3.51, 9.0], np.float32)
    assert head.grades(hand[:, None]).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert head.grades(hand[:, None], (0.0, 1.0, 2.0, 3.0)).tolist() == [
        0,
        1,
        1,
        2,
        2,
        3,
        3,
        4,
        4,
        4,
    ]
    scores = np.linspace(-1.05, 4.95, 61, dtype=np.float32)[:, None]  # none exactly on a cut-point
    grades = head.grades(scores, DEFAULT_CUTS)
    assert np.array_equal(grades, np.digitize(scores[:, 0], DEFAULT_CUTS))
    # P(grade >= 2) rises with the score: the referable ROC is the score's own
    referable = referable_score(head.probs(scores))
    assert np.all(np.diff(referable) > 0)
    truth = np.random.default_rng(1).random(61) < 0.5
    assert roc_auc_score(truth, referable) == pytest.approx(roc_auc_score(truth, scores[:, 0]))
    assert np.array_equal(
        head.probs(scores).argmax(axis=1), grades
    )  # the likeliest grade is the cut-point grade


def test_ordinal_grade_is_the_median_of_its_distribution():
    head = build_head("ordinal")
    out = np.array(
        [[3.0, 2.0, -1.0, -2.0], [2.0, -1.0, 1.0, -3.0], [-2.0, -2.0, -2.0, -2.0]], np.float32
    )
    assert head.grades(out).tolist() == [
        2,
        1,
        0,
    ]  # a later z_k above 0 after a lower one does not count
    cumulative = np.cumsum(head.probs(out), axis=1)
    assert [int(np.argmax(c >= 0.5)) for c in cumulative] == [2, 1, 0]


def test_tuned_cut_points_beat_the_defaults_when_the_scores_are_shifted():
    rng = np.random.default_rng(2)
    labels = rng.choice(5, size=2000, p=[0.6, 0.1, 0.2, 0.05, 0.05])
    scores = (
        0.6 * labels + 0.3 + rng.normal(0, 0.25, 2000)
    )  # compressed and shifted: 0.5/1.5/... misplaced
    before = kappa_of(labels, (scores[:, None] > DEFAULT_CUTS).sum(axis=1))
    cuts = tune_cuts(scores, labels)
    after = kappa_of(labels, (scores[:, None] > cuts).sum(axis=1))
    assert list(cuts) == sorted(cuts) and after > before + 0.1
    assert cuts == tune_cuts(scores, labels)  # deterministic


def test_label_smoothing_is_for_the_classify_head_only():
    with pytest.raises(UserError, match="classify head only"):
        build_head("regress", label_smoothing=0.1)
    with pytest.raises(UserError, match="unknown head"):
        build_head("softmax")


def test_both_eyes_blend_with_their_partner_and_a_lone_eye_keeps_its_own():
    keys = ["10_left", "10_right", "11_left", "12_RIGHT", "12_left", "scan7"]
    assert partner_index(keys).tolist() == [1, 0, -1, 4, 3, -1]
    outputs = np.arange(6, dtype=np.float32)[:, None] * 10
    blended = blend_partners(keys, outputs, 0.25)
    assert blended[:, 0].tolist() == [2.5, 7.5, 20.0, 32.5, 37.5, 50.0]
    assert np.array_equal(blend_partners(keys, outputs, 0.0), outputs)


def test_the_blend_weight_chosen_on_val_helps_when_the_eyes_agree():
    rng = np.random.default_rng(3)
    patients = rng.choice(5, size=400, p=[0.6, 0.1, 0.2, 0.05, 0.05])
    keys = [f"{p}_{eye}" for p in range(400) for eye in ("left", "right")]
    labels = np.repeat(patients, 2)  # both eyes share the grade
    scores = (labels + rng.normal(0, 0.7, 800)).astype(np.float32)[:, None]
    head = build_head("regress")
    weight = choose_blend(keys, scores, lambda o: kappa_of(labels, head.grades(o)))
    assert weight > 0.2
    assert kappa_of(labels, head.grades(blend_partners(keys, scores, weight))) > kappa_of(
        labels, head.grades(scores)
    )
    assert choose_blend(["a", "b"], scores[:2], lambda o: 0.0) == 0.0  # no pairs at all
