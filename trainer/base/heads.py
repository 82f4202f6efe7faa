"""The network's head: what its outputs mean, how they are trained, how they become grades.

Every head turns the raw outputs of a batch into the same two things, so metrics, confusion
matrices, screening scores, evaluate and predict work the same for all of them: ``probs``
(N, 5) class probabilities and ``grades`` (N,).

- ``classify`` (the reference): 5 logits, cross-entropy; probs = softmax, grade = argmax.
- ``regress``: one output s, trained on the grade with MSE (the default: quadratic kappa is
  a squared-error agreement) or smooth L1. The grade is the
  number of cut-points below s (4 cut-points between the grades, 0.5/1.5/2.5/3.5 until they
  are tuned on val to maximise kappa). Probabilities come from the same cut-points:
  ``P(grade >= k) = sigmoid((s - c_k) / SOFTNESS)``, so ``p_k = P(>= k) - P(>= k+1)``; the
  referable score P(grade >= 2) is then a monotone function of s, and the referable ROC is
  that of s itself.
- ``ordinal``: 4 outputs z_k, each trained (binary cross-entropy) on "grade > k";
  ``P(grade > k) = sigmoid(z_k)``, made non-increasing in k; ``p_k = P(> k-1) - P(> k)``;
  the grade is the median of that distribution (the number of P(grade > k) above 1/2).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.constants import NUM_CLASSES
from pipeline.errors import UserError

DEFAULT_CUTS = (0.5, 1.5, 2.5, 3.5)
MIN_BAND = 0.5  # tuned cut-points leave every inner grade at least this much of the score
SOFTNESS = 0.25  # grades: how sharply the regress head's probabilities switch at a cut-point
REGRESS_LOSSES = ("mse", "smoothl1")


class Head:
    """A head: its number of outputs, its loss, and its outputs as probabilities and grades."""

    name = "?"
    outputs = NUM_CLASSES

    def loss_sums(
        self, out: Tensor, labels: Tensor, class_weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """(weighted) loss summed over the batch, and the weights summed: their ratio is the mean.

        No tensor from a Python number here: on a GPU that is a host-to-device copy and a
        sync in every step.
        """
        weights = (
            class_weights[labels]
            if class_weights is not None
            else torch.ones_like(labels, dtype=torch.float32)
        )
        return (self.per_sample(out.float(), labels) * weights).sum(), weights.sum()

    def per_sample(self, out: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def probs(self, out: np.ndarray, cuts: tuple[float, ...] | None = None) -> np.ndarray:
        raise NotImplementedError

    def grades(self, out: np.ndarray, cuts: tuple[float, ...] | None = None) -> np.ndarray:
        return self.probs(out, cuts).argmax(axis=1)

    def train_grades(self, out: Tensor) -> Tensor:
        """Grades on the device during training (the default cut-points; no host copy)."""
        return out.argmax(dim=1)


class ClassifyHead(Head):
    name = "classify"
    outputs = NUM_CLASSES

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def per_sample(self, out: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(out, labels, reduction="none", label_smoothing=self.label_smoothing)

    def probs(self, out: np.ndarray, cuts=None) -> np.ndarray:
        shifted = np.exp(out - out.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)


class RegressHead(Head):
    name = "regress"
    outputs = 1

    def __init__(self, loss: str = "mse"):
        if loss not in REGRESS_LOSSES:
            raise UserError(
                f"unknown regression loss '{loss}'; choose one of {', '.join(REGRESS_LOSSES)}"
            )
        self.loss = loss

    def per_sample(self, out: Tensor, labels: Tensor) -> Tensor:
        target = labels.to(out.dtype)
        score = out[:, 0]
        if self.loss == "mse":
            return F.mse_loss(score, target, reduction="none")
        return F.smooth_l1_loss(score, target, reduction="none")

    def probs(self, out: np.ndarray, cuts=None) -> np.ndarray:
        cuts = np.asarray(cuts or DEFAULT_CUTS, dtype=np.float64)
        above = 1.0 / (
            1.0 + np.exp(-(out[:, :1].astype(np.float64) - cuts) / SOFTNESS)
        )  # P(grade >= k+1)
        return _from_exceedance(above)

    def grades(self, out: np.ndarray, cuts=None) -> np.ndarray:
        cuts = np.asarray(cuts or DEFAULT_CUTS)
        return (out[:, :1] > cuts).sum(axis=1)

    def train_grades(self, out: Tensor) -> Tensor:
        score = out[:, 0]
        return sum((score > cut).long() for cut in DEFAULT_CUTS)


class OrdinalHead(Head):
    name = "ordinal"
    outputs = NUM_CLASSES - 1

    def per_sample(self, out: Tensor, labels: Tensor) -> Tensor:
        thresholds = torch.arange(NUM_CLASSES - 1, device=labels.device)
        targets = (labels[:, None] > thresholds).to(out.dtype)
        return F.binary_cross_entropy_with_logits(out, targets, reduction="none").sum(dim=1)

    def probs(self, out: np.ndarray, cuts=None) -> np.ndarray:
        above = 1.0 / (1.0 + np.exp(-out.astype(np.float64)))  # P(grade > k), k = 0..3
        return _from_exceedance(np.minimum.accumulate(above, axis=1))

    def grades(self, out: np.ndarray, cuts=None) -> np.ndarray:
        """The median grade: the number of (non-increasing) P(grade > k) above one half."""
        return (np.minimum.accumulate(out, axis=1) > 0).sum(axis=1)

    def train_grades(self, out: Tensor) -> Tensor:
        return (torch.cummin(out, dim=1).values > 0).sum(dim=1)


def _from_exceedance(above: np.ndarray) -> np.ndarray:
    """(N, 4) non-increasing P(grade > k) -> (N, 5) class probabilities."""
    ones, zeros = np.ones((len(above), 1)), np.zeros((len(above), 1))
    return (np.hstack([ones, above]) - np.hstack([above, zeros])).astype(np.float32)


HEADS = {"classify": ClassifyHead, "regress": RegressHead, "ordinal": OrdinalHead}


def build_head(name: str, label_smoothing: float = 0.0, regress_loss: str = "mse") -> Head:
    if name not in HEADS:
        raise UserError(f"unknown head '{name}'; choose one of {', '.join(HEADS)}")
    if label_smoothing and name != "classify":
        raise UserError("--label-smoothing applies to the classify head only")
    if name == "classify":
        return ClassifyHead(label_smoothing)
    return RegressHead(regress_loss) if name == "regress" else OrdinalHead()


# ---------------------------------------------------------------- tuning on val


def tune_cuts(
    scores: np.ndarray,
    labels: np.ndarray,
    passes: int = 3,
    candidates: int = 64,
    start: tuple[float, ...] = DEFAULT_CUTS,
) -> tuple[float, ...]:
    """Cut-points for a regress head that maximise quadratic kappa on (scores, labels), every
    inner grade keeping a band at least ``MIN_BAND`` wide.

    Coordinate ascent from ``start`` (0.5/1.5/2.5/3.5): each cut-point in turn takes the best
    of ``candidates`` values between its neighbours (``MIN_BAND`` away from each), for a few
    passes. Only a strictly better kappa moves a cut, so the result never scores below
    ``start``. Deterministic. Unconstrained, a few hundred val images placed grade 2's band
    0.08 wide, and no test photograph of grade 2 was graded 2.
    """
    from trainer.base.metrics import kappa_of

    scores = np.asarray(scores, dtype=np.float64).ravel()
    cuts = [float(c) for c in start]
    best = kappa_of(labels, (scores[:, None] > cuts).sum(axis=1))
    for _ in range(passes):
        for k in range(len(cuts)):
            low, high = _cut_range(cuts, k, scores)
            for value in np.linspace(low, high, candidates + 2)[1:-1]:
                trial = cuts[:k] + [float(value)] + cuts[k + 1 :]
                kappa = kappa_of(labels, (scores[:, None] > trial).sum(axis=1))
                if kappa > best + 1e-12:
                    best, cuts = kappa, trial
    return tuple(cuts)


def _cut_range(cuts: list[float], k: int, scores: np.ndarray) -> tuple[float, float]:
    """Where cut-point ``k`` may move: ``MIN_BAND`` inside its neighbours (the outer ones
    out to the scores' range); widened to its current value where ``start`` broke the rule."""
    low = cuts[k - 1] + MIN_BAND if k else min(scores.min(), cuts[0]) - 1e-6
    high = cuts[k + 1] - MIN_BAND if k + 1 < len(cuts) else max(scores.max(), cuts[-1]) + 1e-6
    return min(low, cuts[k]), max(high, cuts[k])
