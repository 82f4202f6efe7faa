"""Fitting what val decides (``trainer.base.decisions.Decisions``) on the choosing split.

Order matters: the regress head's cut-points first (grades), then the temperature
(calibrated probabilities), then the both-eyes weight (with the regress head's cut-points
for blended scores), and last the referable threshold, chosen on the calibrated scores.

On a val split under ``SMALL_VAL`` images the regress head keeps the fixed cut-points
0.5/1.5/2.5/3.5 unless asked (``--tune-cuts``): cut-points tuned to a few hundred labels fit
their noise (a demo run's grade 2 got a band 0.08 wide and no test photograph of grade 2).
"""

from __future__ import annotations

from trainer.base.decisions import Decisions
from trainer.base.heads import DEFAULT_CUTS, tune_cuts
from trainer.base.metrics import REFERABLE_GRADE, kappa_of, operating_threshold, referable_score
from trainer.judging.calibration import fit_temperature
from trainer.judging.evaluation import EvalResult
from trainer.judging.pairing import choose_blend, choose_blend_and_cuts
from trainer.judging.selection import SMALL_VAL


def tunes_cuts(head: str, samples: int, asked: bool) -> bool:
    """Whether the regress head's cut-points are tuned on a choosing split of ``samples``."""
    return head == "regress" and (asked or samples >= SMALL_VAL)


def decide(result: EvalResult, tune: bool) -> Decisions:
    """What ``result`` (val's evaluation, raw) decides; ``tune``: tune the regress head's
    cut-points (else they stay 0.5/1.5/2.5/3.5)."""
    regress = result.head.name == "regress"
    cuts = None
    if regress:
        cuts = tune_cuts(result.outputs[:, 0], result.labels) if tune else DEFAULT_CUTS
    temperature = fit_temperature(result.head, result.outputs, result.labels)
    base = result.decided(Decisions(cut_points=cuts, temperature=temperature))
    pair_cuts = None
    if regress and tune:  # the blend and the cut-points that go with it, chosen together
        blend, pair_cuts = choose_blend_and_cuts(base.keys, base.outputs, base.labels, cuts)
    else:
        blend = choose_blend(
            base.keys, base.outputs, lambda o: kappa_of(base.labels, base.head.grades(o, cuts))
        )
    threshold = operating_threshold(base.labels >= REFERABLE_GRADE, referable_score(base.probs))
    return Decisions(
        cut_points=cuts,
        temperature=temperature,
        pair_blend=blend,
        pair_cut_points=pair_cuts,
        referable_threshold=threshold,
    )
