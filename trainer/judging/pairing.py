"""Both eyes of a patient: each eye's outputs blended with its partner's.

EyePACS photographs both eyes of every patient, and their grades are strongly correlated
(the disease is systemic). ``blend_partners`` replaces each eye's raw head outputs by
``(1 - w) * own + w * partner``; an eye whose partner is not in the set keeps its own.
The weight is chosen on val (``choose_blend``) and stored in best.pt as ``pair_blend``.
For the regress head the weight and the cut-points are chosen together
(``choose_blend_and_cuts``): blending shrinks the scores' spread, so cut-points tuned on
each eye alone are misplaced for the blended scores; they are stored as ``pair_cut_points``.

Each eye keeps its own grade: the weight is searched only up to ``MAX_BLEND`` (0.4, the own
eye keeps at least 60 %). At 0.5 the two eyes are averaged and get one grade, so a patient
with one healthy and one grade-4 eye was graded the same in both (a checkpoint of an older
version stored 0.5); such a stored weight is clipped to ``MAX_BLEND`` with a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pipeline.shardformat import eye_of, patient_of
from trainer.base.decisions import MAX_BLEND, own_eye_first
from trainer.base.heads import tune_cuts
from trainer.base.metrics import kappa_of

BLENDS = tuple(round(0.05 * i, 2) for i in range(round(MAX_BLEND / 0.05) + 1))  # 0 .. MAX_BLEND
OTHER_EYE = {"left": "right", "right": "left"}


def usable_blend(weight: float | None) -> float:
    """A stored partner weight as this version applies it: None is 0 (each eye alone), one
    above ``MAX_BLEND`` is clipped to it with a warning (trainer.base.decisions)."""
    return own_eye_first(float(weight or 0.0))


def partner_index(keys: Sequence[str]) -> np.ndarray:
    """For each key, the index of the other eye of the same patient in ``keys``, else -1."""
    where = {(patient_of(k), eye_of(k)): i for i, k in enumerate(keys) if eye_of(k)}
    return np.array(
        [where.get((patient_of(k), OTHER_EYE.get(eye_of(k), "")), -1) for k in keys], dtype=np.int64
    )


def blend_partners(keys: Sequence[str], outputs: np.ndarray, weight: float) -> np.ndarray:
    """Each eye's outputs ``(1 - w) * own + w * partner``, ``w`` clipped by ``usable_blend``."""
    weight = usable_blend(weight)
    partner = partner_index(keys)
    blended = np.array(outputs, dtype=np.float32, copy=True)
    paired = partner >= 0
    blended[paired] = (1 - weight) * outputs[paired] + weight * outputs[partner[paired]]
    return blended


def choose_blend(
    keys: Sequence[str], outputs: np.ndarray, score: Callable[[np.ndarray], float]
) -> float:
    """The weight of ``BLENDS`` whose blended outputs ``score`` best (val kappa); ties go to
    the smaller weight, 0 when no eye has its partner in the set."""
    if (partner_index(keys) < 0).all():
        return 0.0
    results = [(score(blend_partners(keys, outputs, w)), -w) for w in BLENDS]
    return -max(results)[1]


def choose_blend_and_cuts(
    keys: Sequence[str], scores: np.ndarray, labels: np.ndarray, cuts: tuple[float, ...]
) -> tuple[float, tuple[float, ...]]:
    """A regress head's blend weight and cut-points chosen jointly for val kappa: for each
    weight of ``BLENDS`` the cut-points are re-tuned on the blended scores, starting from
    ``cuts`` (those of each eye alone), so no weight scores below its blend with ``cuts``;
    ties go to the smaller weight. ``scores``: (N, 1) raw outputs."""
    if (partner_index(keys) < 0).all():
        return 0.0, tuple(cuts)
    best = None
    for weight in BLENDS:
        blended = blend_partners(keys, scores, weight)[:, 0]
        tuned = tune_cuts(blended, labels, start=cuts)
        kappa = kappa_of(labels, (blended[:, None] > np.asarray(tuned)).sum(axis=1))
        if best is None or kappa > best[0] + 1e-12:
            best = (kappa, weight, tuned)
    return best[1], best[2]
