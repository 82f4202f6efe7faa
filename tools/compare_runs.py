"""Compare training runs: accuracy/loss/kappa curves per epoch and a results table.

    python tools/compare_runs.py runs/resnet18 runs/resnet50 --out runs/compare

Writes ``OUT/compare.png`` (train dashed, test solid, one colour per run; a loss panel and
a kappa panel) and ``OUT/compare.md`` (the markdown table it also prints). Runs of
different lengths and runs still in progress are fine: each is drawn as far as it got.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.cli import arg, parse_config, run_cli
from pipeline.constants import NUM_CLASSES
from pipeline.errors import UserError
from trainer.runfiles import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_metrics

FIGURE_FILE = "compare.png"
TABLE_FILE = "compare.md"


@dataclass
class CompareConfig:
    runs: list[Path] = arg(
        help="run folders written by trainer/train.py", positional=True, metavar="RUN"
    )
    out: Path = arg(Path("."), "folder to write compare.png and compare.md into", metavar="DIR")


@dataclass
class Run:
    path: Path
    name: str
    epochs_planned: int | None
    finished: bool
    metrics: pd.DataFrame  # one row per finished epoch

    def best(self, key: str) -> pd.Series | None:
        return None if self.metrics.empty else self.metrics.loc[self.metrics[key].idxmax()]


def run_label(config: dict, fallback: str) -> str:
    """ "resnet50, pretrained" from a run's config; the folder name when there is none."""
    cfg = config.get("config", config)
    arch = cfg.get("arch")
    if not arch:
        return fallback
    init = "pretrained" if cfg.get("pretrained") or cfg.get("weights") else "from scratch"
    return f"{arch}, {init}"


def load_run(path: str | os.PathLike) -> Run:
    path = Path(path)
    if not (path / METRICS_FILE).is_file():
        raise UserError(
            f"{path} has no {METRICS_FILE}; is it a run folder written by trainer/train.py?"
        )
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        config = {}
    return Run(
        path=path,
        name=run_label(config, path.name),
        epochs_planned=config.get("config", config).get("epochs"),
        finished=(path / SUMMARY_FILE).is_file(),
        metrics=pd.DataFrame(read_metrics(path)),
    )


def _unique_names(runs: list[Run]) -> None:
    """Two runs with the same label (e.g. two schedules) get their folder names added."""
    seen = Counter(run.name for run in runs)
    for run in runs:
        if seen[run.name] > 1:
            run.name = f"{run.name} ({run.path.name})"


def results_table(runs: list[Run]) -> str:
    header = "| run | epochs | best test acc (epoch) | best test kappa (epoch) | final recall per grade 0-4 |"
    lines = [header, "|---|---|---|---|---|"]
    for run in runs:
        done = len(run.metrics)
        epochs = f"{done}/{run.epochs_planned}" if run.epochs_planned else str(done)
        if not run.finished:
            epochs += " (in progress)"
        if run.metrics.empty:
            lines.append(f"| {run.name} | {epochs} | - | - | - |")
            continue
        acc, qwk = run.best("test_acc"), run.best("test_qwk")
        recall = " / ".join(f"{r:.2f}" for r in run.metrics["test_recall"].iloc[-1][:NUM_CLASSES])
        lines.append(
            f"| {run.name} | {epochs} | {100 * acc['test_acc']:.1f} % ({acc['epoch']}) "
            f"| {qwk['test_qwk']:.3f} ({qwk['epoch']}) | {recall} |"
        )
    return "\n".join(lines)


def plot_runs(runs: list[Run], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss, ax_qwk) = plt.subplots(1, 3, figsize=(16, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(r for r in runs if not r.metrics.empty):
        colour = colours[i % len(colours)]
        m = run.metrics
        marker = "o" if len(m) < 30 else None
        for ax, key, scale in ((ax_acc, "acc", 100), (ax_loss, "loss", 1)):
            ax.plot(
                m["epoch"],
                scale * m[f"test_{key}"],
                color=colour,
                marker=marker,
                label=f"{run.name} test",
            )
            ax.plot(
                m["epoch"],
                scale * m[f"train_{key}"],
                color=colour,
                linestyle="--",
                marker=marker,
                alpha=0.8,
                label=f"{run.name} train",
            )
        ax_qwk.plot(m["epoch"], m["test_qwk"], color=colour, marker=marker, label=run.name)
    ax_acc.set(title="Accuracy (solid: test, dashed: train)", xlabel="epoch", ylabel="accuracy (%)")
    ax_loss.set(title="Cross-entropy loss", xlabel="epoch", ylabel="loss")
    ax_qwk.set(title="Test quadratic weighted kappa", xlabel="epoch", ylabel="kappa")
    for ax in (ax_acc, ax_loss, ax_qwk):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_acc.legend(fontsize=8)
    ax_qwk.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(
        CompareConfig, argv, prog="compare_runs.py", description=__doc__.splitlines()[0]
    )
    runs = [load_run(p) for p in cfg.runs]
    if all(run.metrics.empty for run in runs):
        raise UserError("none of the runs has a finished epoch yet; nothing to compare")
    _unique_names(runs)
    cfg.out.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, cfg.out / FIGURE_FILE)
    table = results_table(runs)
    (cfg.out / TABLE_FILE).write_text(table + "\n")
    print(table)
    print(f"\nfigure: {cfg.out / FIGURE_FILE}\ntable:  {cfg.out / TABLE_FILE}")
    return 0


def cli() -> None:
    """The ``dr-compare`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
