"""Temperature scaling and ECE (trainer/judging/calibration.py): what it fits, what it must not change."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tools.export import metadata
from trainer.base.heads import build_head
from trainer.base.metrics import referable_score
from trainer.judging.calibration import ece, ece_figures, fit_temperature, reliability
from trainer.judging.deciding import decide
from trainer.judging.evaluation import EvalResult


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def overconfident(n: int, true_t: float, outputs: int = 5, seed: int = 0):
    """Logits whose labels are drawn from softmax(logits / true_t): a model over-confident
    by a factor true_t, whose best temperature is true_t."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, outputs)).astype(np.float32)
    probs = softmax(logits / true_t)
    labels = (rng.random((n, 1)) > probs.cumsum(axis=1)).sum(axis=1)
    return logits, np.minimum(labels, outputs - 1)


def test_fit_recovers_a_known_temperature():
    logits, labels = overconfident(6000, true_t=2.0)
    t = fit_temperature(build_head("classify"), logits, labels)
    assert 1.8 < t < 2.2


def test_calibrated_model_keeps_t_one_or_near():
    logits, labels = overconfident(6000, true_t=1.0, seed=1)
    assert 0.9 < fit_temperature(build_head("classify"), logits, labels) < 1.1


def test_regress_head_has_no_temperature():
    assert fit_temperature(build_head("regress"), np.zeros((10, 1)), np.zeros(10, int)) is None


@pytest.mark.parametrize("head_name", ["classify", "ordinal"])
def test_temperature_changes_probabilities_not_grades(head_name):
    head = build_head(head_name)
    logits, labels = overconfident(3000, true_t=2.5, outputs=head.outputs, seed=2)
    if head_name == "ordinal":  # labels of "grade > k" logits: the median grade, noised
        labels = np.clip(head.grades(logits) + np.random.default_rng(3).integers(-1, 2, 3000), 0, 4)
    keys = [f"{i}_left" for i in range(len(labels))]
    raw = EvalResult(loss=0.0, keys=keys, labels=labels, outputs=logits, head=head)
    decisions = decide(raw, tune=False)
    after, t = raw.decided(decisions), decisions.temperature
    assert t is not None and t > 1.2
    np.testing.assert_array_equal(after.grades, raw.grades)
    np.testing.assert_array_equal(after.confusion, raw.confusion)
    assert after.kappa == raw.kappa
    assert not np.allclose(after.probs, raw.probs)
    np.testing.assert_allclose(after.probs.sum(axis=1), 1.0, atol=1e-5)
    figures = ece_figures(after, "test_")
    assert figures["test_ece"] < figures["test_ece_raw"]
    if head_name == "ordinal":  # a monotone map of each image's referable score: same ranking
        order = np.argsort(referable_score(raw.probs), kind="stable")
        assert np.all(np.diff(referable_score(after.probs)[order]) >= -1e-6)


def test_ece_by_hand():
    # two images at confidence 0.9 (one right), two at 0.6 (both right): bins 13 and 9
    probs = np.array(
        [[0.9, 0.1, 0, 0, 0], [0.9, 0.1, 0, 0, 0], [0.6, 0.4, 0, 0, 0], [0.6, 0.4, 0, 0, 0]]
    )
    grades = np.zeros(4, int)
    labels = np.array([0, 1, 0, 0])
    # |0.5 - 0.9| * 2/4 + |1.0 - 0.6| * 2/4
    assert ece(probs, grades, labels) == pytest.approx(0.4)
    mean_conf, accuracy, count = reliability(probs, grades, labels)
    assert count.sum() == 4 and count[13] == 2 and count[9] == 2
    assert accuracy[13] == 0.5 and mean_conf[9] == pytest.approx(0.6)
    assert ece(np.eye(5)[[0, 1]], np.array([0, 1]), np.array([0, 1])) == 0.0


def test_export_metadata_carries_the_temperature():
    info = {"arch": "resnet18", "image_size": 64, "mean": [1, 2, 3], "std": [1, 1, 1]}
    assert "temperature" not in metadata(info)
    assert json.loads(metadata(info | {"temperature": 1.7})["temperature"]) == 1.7
