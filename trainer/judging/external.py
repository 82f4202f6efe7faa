"""One checkpoint on several datasets: the external-validation table DR papers print.

``trainer/evaluate.py --shards A B C`` evaluates each folder in turn and writes, into --out:

    external.csv     one row per dataset: dataset, shards, split, images, referable (how many
                     are grade >= 2), accuracy, kappa, referable_auc, sensitivity,
                     specificity (at the checkpoint's operating point, chosen on the
                     training data's val split and applied unchanged), any_dr_auc
    external.md      the same table in markdown, with the operating point it used
    external_roc.png referable-DR ROC curves, one per dataset, each with its operating point
    <dataset>/       each folder's own metrics.json, predictions.csv, confusion and ROC

Every image of the split evaluated counts once; the totals are checked against each
folder's manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.fileio import atomic_write, md_cell, safe_cell
from trainer.base.metrics import REFERABLE_GRADE, referable_score, sklearn_metrics
from trainer.judging.evaluation import EvalResult

TABLE_CSV, TABLE_MD, ROC_FIGURE = "external.csv", "external.md", "external_roc.png"


@dataclass
class ExternalRow:
    dataset: str
    shards: str
    split: str
    images: int
    referable: int
    accuracy: float
    kappa: float
    referable_auc: float | None
    sensitivity: float | None
    specificity: float | None
    any_dr_auc: float | None


def dataset_names(folders: list[Path]) -> list[str]:
    """Each folder's name; with its parent's too where two folders share a name."""
    names = [Path(f).resolve().name for f in folders]
    return [
        f"{Path(f).resolve().parent.name}/{name}" if names.count(name) > 1 else name
        for f, name in zip(folders, names, strict=True)
    ]


def combined(results: list[EvalResult]) -> EvalResult:
    """Several splits of one folder as one set of images (the loss weighted by images), read
    with the same cut-points and temperature."""
    if len(results) == 1:
        return results[0]
    images = sum(r.samples for r in results)
    return EvalResult(
        loss=sum(r.loss * r.samples for r in results) / images,
        keys=[k for r in results for k in r.keys],
        labels=np.concatenate([r.labels for r in results]),
        outputs=np.concatenate([r.outputs for r in results]),
        head=results[0].head,
        cuts=results[0].cuts,
        temperature=results[0].temperature,  # one checkpoint's decisions: the same for every split
        features=None
        if results[0].features is None
        else np.concatenate([r.features for r in results]),
    )


def external_row(dataset: str, shards: Path, split: str, metrics: dict) -> ExternalRow:
    """A table row from one folder's metrics (evaluate.py's metrics.json)."""
    return ExternalRow(
        dataset=dataset,
        shards=str(shards),
        split=split,
        images=metrics["samples"],
        referable=int(sum(metrics["confusion"][g][p] for g in range(2, 5) for p in range(5))),
        accuracy=metrics["accuracy"],
        kappa=metrics["qwk"],
        referable_auc=metrics["referable_auc"],
        sensitivity=metrics["sensitivity"],
        specificity=metrics["specificity"],
        any_dr_auc=metrics["any_dr_auc"],
    )


def table_frame(rows: list[ExternalRow]) -> pd.DataFrame:
    return pd.DataFrame([asdict(r) for r in rows])


def markdown(rows: list[ExternalRow], threshold: float | None, threshold_from: str) -> str:
    """The table as DR papers print it, figures at 3 decimals (accuracy in %)."""

    def fig(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [
        "| dataset | split | images | referable | accuracy | kappa | referable AUC "
        "| sensitivity | specificity | any-DR AUC |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {md_cell(r.dataset)} | {md_cell(r.split)} | {r.images} | {r.referable} | {100 * r.accuracy:.1f} % "
            f"| {r.kappa:.3f} | {fig(r.referable_auc)} | {fig(r.sensitivity)} "
            f"| {fig(r.specificity)} | {fig(r.any_dr_auc)} |"
        )
    point = "none stored" if threshold is None else f"P(grade >= 2) >= {threshold:.4f}"
    lines += [
        "",
        f"Referable DR: grade >= {REFERABLE_GRADE}. Sensitivity and specificity at the "
        f"operating point {point}, from {threshold_from}, the same for every dataset.",
    ]
    return "\n".join(lines)


def write_tables(rows: list[ExternalRow], out: Path, threshold, threshold_from: str) -> None:
    atomic_write(
        out / TABLE_CSV,
        lambda tmp: table_frame(rows).map(safe_cell).to_csv(tmp, index=False),  # names: safe
    )
    text = markdown(rows, threshold, threshold_from) + "\n"
    atomic_write(out / TABLE_MD, lambda tmp: Path(tmp).write_text(text))


def plot_external_roc(
    curves: dict[str, EvalResult], threshold: float | None, path: Path, title: str
) -> None:
    """Referable-DR ROC curves, one per dataset, each with its operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, result) in enumerate(curves.items()):
        positive = result.labels >= REFERABLE_GRADE
        score = referable_score(result.probs)
        if positive.all() or not positive.any():
            continue  # one class only: no curve (its row says '-')
        colour = colours[i % len(colours)]
        sk = sklearn_metrics()
        fpr, tpr, _ = sk.roc_curve(positive, score)
        auc = sk.roc_auc_score(positive, score)
        ax.plot(fpr, tpr, color=colour, label=f"{name}, n={result.samples} (AUC {auc:.3f})")
        if threshold is not None:
            flagged = score >= threshold
            sens, spec = flagged[positive].mean(), (~flagged[~positive]).mean()
            ax.plot([1 - spec], [sens], "o", color=colour)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(
        xlabel="1 - specificity",
        ylabel="sensitivity",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title=title + "\n(dots: the stored operating point)",
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
