"""Say when a run is useless: the warnings of summary.json, the log and the report's top.

- **Collapsed**: the choosing split's predictions all fall on one grade although its
  photographs have several. Accuracy then only mirrors the class mix (the reference's
  from-scratch models graded every photograph 0 and still showed 73 %).
- **Diverged**: the last epoch's training loss ends far (``FAR_ABOVE`` times) above where
  training started: the first epoch's loss, or that of a constant guess (an untrained model
  is there after a few steps), whichever is lower. A one-epoch run at --lr 0.005 from random
  weights once ended at train loss 2,790 and kappa 0.000, exit 0 and no word.
"""

from __future__ import annotations

import math

import numpy as np

FAR_ABOVE = 3.0


def guess_loss(
    head: str, class_counts: list[int] | None, regress_loss: str = "mse"
) -> float | None:
    """The training loss of a constant guess: uniform probabilities (classify), every
    "grade > k" at even odds (ordinal), the mean train grade (regress with MSE)."""
    if head == "classify":
        return math.log(5)
    if head == "ordinal":
        return 4 * math.log(2)
    if not class_counts or regress_loss != "mse" or sum(class_counts) == 0:
        return None
    grades, counts = np.arange(len(class_counts)), np.asarray(class_counts, dtype=np.float64)
    mean = float((grades * counts).sum() / counts.sum())
    return float(((grades - mean) ** 2 * counts).sum() / counts.sum())


def collapsed(confusion: np.ndarray) -> int | None:
    """The one grade every prediction fell on, when the true grades were several; else None."""
    predicted = np.flatnonzero(confusion.sum(axis=0))
    present = np.flatnonzero(confusion.sum(axis=1))
    return int(predicted[0]) if len(predicted) == 1 and len(present) > 1 else None


def run_warnings(
    rows: list[dict], chooser: str, confusion: np.ndarray | None, guess: float | None
) -> list[str]:
    """One sentence per reason the run is useless (none: an empty list)."""
    found = []
    if confusion is not None and (grade := collapsed(confusion)) is not None:
        found.append(
            f"{chooser} predictions collapsed onto grade {grade} (all {int(confusion.sum())} "
            f"images of {int((confusion.sum(axis=1) > 0).sum())} grades): the model does not "
            "grade, and its accuracy only mirrors the class mix"
        )
    if rows:
        start = min(v for v in (rows[0]["train_loss"], guess) if v is not None)
        end = rows[-1]["train_loss"]
        if not end <= FAR_ABOVE * start:
            found.append(
                f"training loss ended at {end:.4g}, far above where it started ({start:.4g}): "
                "training diverged; lower --lr or add --warmup-epochs"
            )
    return found
