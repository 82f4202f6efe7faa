"""Which statistic chooses the best epoch (best.pt), by the size of the choosing split.

On a large val split the epoch with the highest val kappa is kept, the regress head's kappa
taken at cut-points tuned on that same split. On a small one (fewer than ``SMALL_VAL``
images) that is a maximum over epochs of a maximum over cut-points, both fitted to the same
few hundred labels: it chooses the epoch whose cut-points fit val's noise best. There the
regress head's epoch is chosen by val MSE, which no tuning touches, and the cut-points
(tuned on every epoch's val outputs, as logged) are those of the chosen epoch. The classify
and ordinal heads have nothing tuned in their kappa (argmax, median), so they keep it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SMALL_VAL = 500  # images in the choosing split below which tuned figures do not choose


@dataclass(frozen=True)
class Selection:
    key: str  # a metrics.jsonl key: val_qwk, val_mse, test_qwk, ...
    higher_is_better: bool

    def better(self, row: dict, best: dict | None) -> bool:
        """Whether ``row`` beats ``best`` (the first of equals stays)."""
        if best is None:
            return True
        if self.key not in best:  # a best row of an older version: it chose by kappa
            return row[self.key.replace("_mse", "_qwk")] > best[self.key.replace("_mse", "_qwk")]
        new, old = row[self.key], best[self.key]
        return new > old if self.higher_is_better else new < old


def selection_for(head: str, chooser: str, samples: int) -> Selection:
    """val (or test without val) kappa; val MSE for the regress head on a small split."""
    if head == "regress" and samples < SMALL_VAL:
        return Selection(f"{chooser}_mse", higher_is_better=False)
    return Selection(f"{chooser}_qwk", higher_is_better=True)


def squared_error(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared error of a regress head's scores (N, 1) against the grades."""
    if len(labels) == 0:
        return 0.0
    return float(np.mean((scores[:, 0].astype(np.float64) - labels) ** 2))
