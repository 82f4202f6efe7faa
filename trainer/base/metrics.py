"""Grading metrics from a confusion matrix, and the matrix as CSV and PNG.

The matrix is ``NUM_CLASSES x NUM_CLASSES`` counts, rows the true grade, columns the
predicted grade. Accuracy alone hides a model that predicts grade 0 for everything
(73.5 % of EyePACS); quadratic weighted kappa, the Kaggle metric, does not.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np

from pipeline.constants import CLASS_NAMES, NUM_CLASSES


def sklearn_metrics():
    """``sklearn.metrics``, imported on first use: over a second of start-up that a command
    ending on bad input never needs."""
    from sklearn import metrics

    return metrics


def accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else 0.0


def recall_per_class(cm: np.ndarray) -> list[float]:
    """Correct / true count per grade; 0.0 for a grade absent from the split."""
    rows = cm.sum(axis=1)
    return [float(cm[i, i] / rows[i]) if rows[i] else 0.0 for i in range(len(cm))]


def quadratic_kappa(cm: np.ndarray) -> float:
    """Quadratic weighted kappa (sklearn), from the matrix expanded back into label pairs.

    0.0 where it is undefined (a single grade in both truth and predictions).
    """
    n = len(cm)
    true = np.repeat(np.repeat(np.arange(n), n), cm.ravel())
    pred = np.repeat(np.tile(np.arange(n), n), cm.ravel())
    if len(true) == 0:
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns where kappa is undefined; 0.0 below
        kappa = sklearn_metrics().cohen_kappa_score(
            true, pred, labels=list(range(n)), weights="quadratic"
        )
    return float(kappa) if np.isfinite(kappa) else 0.0


def confusion_of(
    labels: np.ndarray, grades: np.ndarray, num_classes: int = NUM_CLASSES
) -> np.ndarray:
    """The confusion matrix of two grade arrays (numpy), ``[true, predicted]``."""
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(grades, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def kappa_of(labels: np.ndarray, grades: np.ndarray) -> float:
    """Quadratic weighted kappa of two grade arrays, by its formula (what threshold tuning
    calls thousands of times; equal to ``quadratic_kappa``, which asks sklearn)."""
    cm = confusion_of(labels, grades).astype(np.float64)
    total = cm.sum()
    if total == 0:
        return 0.0
    n = len(cm)
    weights = (np.arange(n)[:, None] - np.arange(n)[None, :]) ** 2 / (n - 1) ** 2
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / total
    denominator = (weights * expected).sum()
    return float(1.0 - (weights * cm).sum() / denominator) if denominator > 0 else 0.0


def write_confusion_csv(cm: np.ndarray, path: Path) -> None:
    """A header of predicted grades, then one row per true grade: name, counts."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *CLASS_NAMES[: len(cm)]])
        for name, row in zip(CLASS_NAMES, cm, strict=False):
            writer.writerow([name, *(int(x) for x in row)])


def read_confusion_csv(path: Path) -> np.ndarray:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return np.array([[int(x) for x in row[1:]] for row in rows], dtype=np.int64)


def plot_confusion(cm: np.ndarray, path: Path, title: str = "") -> None:
    """Two panels: counts, and each row divided by its total (recall on the diagonal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = cm.sum(axis=1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    names = CLASS_NAMES[: len(cm)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    panels = (
        (axes[0], cm, "counts", "{:d}"),
        (axes[1], normalised, "row-normalised (recall)", "{:.2f}"),
    )
    for ax, values, label, fmt in panels:
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=max(values.max(), 1e-9))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set(
            title=label,
            xlabel="predicted grade",
            ylabel="true grade",
            xticks=range(len(names)),
            yticks=range(len(names)),
        )
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_yticklabels(names)
        threshold = values.max() / 2
        for i in range(len(names)):
            for j in range(len(names)):
                value = int(values[i, j]) if fmt == "{:d}" else float(values[i, j])
                ax.text(
                    j,
                    i,
                    fmt.format(value),
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if values[i, j] > threshold else "black",
                )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- screening

REFERABLE_GRADE = 2  # moderate or worse: a screening programme refers the patient
TARGET_SENSITIVITY = 0.9  # the operating point is chosen on val to reach at least this


def referable_score(probs: np.ndarray) -> np.ndarray:
    """P(grade >= 2) = p2 + p3 + p4, per image."""
    return probs[:, REFERABLE_GRADE:].sum(axis=1)


def any_dr_score(probs: np.ndarray) -> np.ndarray:
    """P(grade >= 1) = p1 + ... + p4, per image."""
    return probs[:, 1:].sum(axis=1)


def _auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """ROC-AUC; None where it is undefined (a split without positives or without negatives)."""
    if positive.all() or not positive.any():
        return None
    return float(sklearn_metrics().roc_auc_score(positive, score))


def operating_threshold(
    positive: np.ndarray, score: np.ndarray, sensitivity: float = TARGET_SENSITIVITY
) -> float | None:
    """The highest score threshold whose sensitivity reaches ``sensitivity`` (so the most
    specific such one); None without positives and negatives to choose from."""
    if positive.all() or not positive.any():
        return None
    # every threshold, not sklearn's thinned curve: a dropped point can be the highest
    # threshold that reaches the target, and the next one kept is then less specific
    _, tpr, thresholds = sklearn_metrics().roc_curve(positive, score, drop_intermediate=False)
    return float(thresholds[np.argmax(tpr >= sensitivity)])


def screening(labels: np.ndarray, probs: np.ndarray, threshold: float | None) -> dict:
    """Referable DR (grade >= 2) AUC, sensitivity and specificity at ``threshold`` (chosen on
    val, applied unchanged elsewhere), and any-DR (grade >= 1) AUC."""
    referable = labels >= REFERABLE_GRADE
    score = referable_score(probs)
    flagged = score >= threshold if threshold is not None else None
    return {
        "referable_auc": _auc(referable, score),
        "any_dr_auc": _auc(labels >= 1, any_dr_score(probs)),
        "sensitivity": float(flagged[referable].mean())
        if flagged is not None and referable.any()
        else None,
        "specificity": float((~flagged[~referable]).mean())
        if flagged is not None and (~referable).any()
        else None,
    }


def plot_roc(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    threshold: float | None,
    path: Path,
    title: str = "",
) -> None:
    """Referable-DR and any-DR ROC curves of one split, the referable operating point marked.

    ``curves``: name -> (positive, score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sk = sklearn_metrics()
    fig, ax = plt.subplots(figsize=(5.5, 5.2))
    for name, (positive, score) in curves.items():
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = sk.roc_curve(positive, score)
        ax.plot(fpr, tpr, label=f"{name} (AUC {sk.roc_auc_score(positive, score):.3f})")
        if name.startswith("referable") and threshold is not None:
            flagged = score >= threshold
            sens, spec = flagged[positive].mean(), (~flagged[~positive]).mean()
            ax.plot(
                [1 - spec],
                [sens],
                "o",
                color="black",
                label=f"operating point: sensitivity {sens:.2f}, specificity {spec:.2f}",
            )
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
