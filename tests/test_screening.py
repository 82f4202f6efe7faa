"""trainer/base/metrics.py's screening figures on hand-built cases: the operating threshold (the
highest one whose sensitivity reaches the target) and sensitivity, specificity and AUCs at a
threshold, with ties, splits without positives and splits without negatives."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.base.metrics import operating_threshold, screening


def probs_with(score) -> np.ndarray:
    """(N, 5) probabilities whose referable score p2+p3+p4 (and any-DR score) is ``score``."""
    score = np.asarray(score, dtype=np.float64)
    zero = np.zeros_like(score)
    return np.stack([1 - score, zero, score, zero, zero], axis=1)


def test_the_threshold_is_the_highest_that_reaches_the_sensitivity():
    # ten positives 0.9 .. 0.05, three negatives; one negative among the positives
    positives = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    negatives = [0.95, 0.35, 0.0]
    positive = np.array([True] * 10 + [False] * 3)
    score = np.array(positives + negatives)
    # 9 of 10 positives at or above it: the 9th highest positive, not a lower score
    assert operating_threshold(positive, score) == 0.1
    assert operating_threshold(positive, score, sensitivity=0.5) == 0.5
    assert operating_threshold(positive, score, sensitivity=1.0) == 0.05
    # the order of the images does not matter
    order = np.random.default_rng(0).permutation(len(score))
    assert operating_threshold(positive[order], score[order]) == 0.1


def test_a_threshold_on_a_tie_flags_every_image_of_that_score():
    positive = np.array([True, True, True, True, False, False])
    score = np.array([0.8, 0.6, 0.6, 0.2, 0.6, 0.1])
    # 3 of 4 positives need 0.6, which also flags the negative at 0.6
    assert operating_threshold(positive, score, sensitivity=0.75) == 0.6
    labels = np.where(positive, 2, 0)
    result = screening(labels, probs_with(score), 0.6)
    assert (result["sensitivity"], result["specificity"]) == (0.75, 0.5)


def test_no_threshold_without_positives_or_without_negatives():
    score = np.array([0.2, 0.4, 0.9])
    assert operating_threshold(np.zeros(3, bool), score) is None
    assert operating_threshold(np.ones(3, bool), score) is None


def test_sensitivity_specificity_and_aucs_at_a_threshold():
    labels = np.array([0, 1, 2, 3, 4, 0])
    score = np.array([0.1, 0.5, 0.5, 0.9, 0.3, 0.7])
    result = screening(labels, probs_with(score), 0.5)
    # referable: grades 2, 3, 4 (0.5 flagged: on the threshold; 0.9; 0.3 missed)
    assert result["sensitivity"] == pytest.approx(2 / 3)
    # not referable: grades 0, 1, 0 (0.1 passed; 0.5 and 0.7 flagged)
    assert result["specificity"] == pytest.approx(1 / 3)
    # pairs (positive, negative) ranked right, ties half: (1.5 + 3 + 1) / 9 and (2 + 2 + 1) / 8
    assert result["referable_auc"] == pytest.approx(5.5 / 9)
    assert result["any_dr_auc"] == pytest.approx(5 / 8)


def test_a_split_without_referable_eyes_has_no_sensitivity_and_no_auc():
    result = screening(np.array([0, 1, 0, 1]), probs_with([0.1, 0.6, 0.7, 0.2]), 0.5)
    assert result["sensitivity"] is None and result["referable_auc"] is None
    assert result["specificity"] == 0.5  # 0.6 and 0.7 flagged
    assert result["any_dr_auc"] == 0.5  # grade 1 at 0.6 and 0.2, grade 0 at 0.1 and 0.7


def test_a_split_of_referable_eyes_only_has_no_specificity_and_no_auc():
    result = screening(np.array([2, 3, 4]), probs_with([0.2, 0.6, 0.9]), 0.5)
    assert result["specificity"] is None and result["referable_auc"] is None
    assert result["any_dr_auc"] is None
    assert result["sensitivity"] == pytest.approx(2 / 3)


def test_no_threshold_gives_aucs_only():
    result = screening(np.array([0, 2, 3, 0]), probs_with([0.1, 0.8, 0.6, 0.7]), None)
    assert result["sensitivity"] is None and result["specificity"] is None
    assert result["referable_auc"] == 0.75
