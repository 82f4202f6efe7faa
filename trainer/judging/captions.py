"""The text beside each figure: its key numbers, and which outputs it draws.

A figure is read with its caption; the caption's numbers are computed from the same
``EvalResult`` the figure is drawn from, so the two cannot disagree. The report
(run_page.py) and evaluate (``figures.md``) print the same sentences.
"""

from __future__ import annotations

import math

from trainer.base.decisions import Decisions
from trainer.base.metrics import REFERABLE_GRADE, screening
from trainer.judging.calibration import bins_for, ece, reliability


def outputs_label(method: str, decisions: Decisions | None = None) -> str:
    """Which outputs a figure draws: ``alone``, ``blend`` (at val's weight) or ``fused``."""
    if method == "blend":
        return f"both eyes blended w={decisions.pair_blend:.2f}"
    return {"alone": "each eye alone", "fused": "both eyes fused (dr-fuse's head)"}[method]


def roc_caption(result, threshold: float | None, outputs: str) -> str:
    """AUC, the operating point (threshold, sensitivity, specificity) and the outputs drawn."""
    screen = screening(result.labels, result.probs, threshold)
    text = f"Referable DR (grade >= {REFERABLE_GRADE}) ROC of {outputs}, {result.samples} images: "
    if screen["referable_auc"] is None:
        return text + "undefined (the split lacks positives or negatives)."
    text += f"AUC {screen['referable_auc']:.4f}"
    if threshold is not None:
        text += (
            f"; operating point: threshold {threshold:.4g}, sensitivity "
            f"{screen['sensitivity']:.4f}, specificity {screen['specificity']:.4f}"
        )
    if screen["any_dr_auc"] is not None:
        text += f"; any DR (grade >= 1) AUC {screen['any_dr_auc']:.4f}"
    return text + "."


def reliability_caption(name: str, result) -> str:
    """ECE before and after the temperature, the bins and the images in each."""
    bins = bins_for(result.samples)
    raw = result.with_temperature(None)
    before = ece(raw.probs, raw.grades, raw.labels, bins)
    after = ece(result.probs, result.grades, result.labels, bins)
    counts = reliability(result.probs, result.grades, result.labels, bins)[2]
    temperature = f"T = {result.temperature:.4g}" if result.temperature else "no temperature"
    return (
        f"{name} ({result.samples} images, {bins} bins): ECE {before:.4f} before the "
        f"temperature, {after:.4f} after ({temperature}); images per bin after: "
        + "/".join(str(int(c)) for c in counts)
        + "."
    )


def score_text(score: float, threshold: float | None) -> str:
    """``score`` with enough decimals to compare with ``threshold``: 4 significant digits of
    the threshold, more until the two differ as printed."""
    if threshold is None or not threshold > 0:
        return f"{score:.4f}"
    digits = max(4, 3 - math.floor(math.log10(threshold)))
    while digits < 10 and f"{score:.{digits}f}" == f"{threshold:.{digits}f}" and score != threshold:
        digits += 1
    return f"{score:.{digits}f}"
