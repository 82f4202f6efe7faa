"""Compare training runs: accuracy/loss/kappa curves per epoch and a results table.

    python tools/compare_runs.py runs/resnet18 runs/resnet50 --out runs/compare

Writes ``OUT/compare.png`` (accuracy, loss and kappa per epoch; train dashed, val dotted,
test solid, one colour per run) and ``OUT/compare.md`` (the markdown table it also prints,
with a link to each run's ``report.html``).
The table reports each run's test figures at its best-val epoch: val chooses, test reports
(a run whose shards had no val split was chosen on test, and the table says so). Runs of
different lengths and runs still in progress are fine: each is drawn as far as it got.

``--seeds`` sums up runs that differ only by seed instead (``tools/compare_seeds.py``):
mean ± sd per configuration and a paired bootstrap interval of the difference from
``--baseline``, written to ``OUT/seeds.md``.
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
from pipeline.fileio import md_cell
from tools.compare_seeds import SEEDS_FILE, group_runs, seeds_table
from trainer.base.runfiles import CONFIG_FILE, METRICS_FILE, REPORT_FILE, SUMMARY_FILE, read_metrics

FIGURE_FILE = "compare.png"
TABLE_FILE = "compare.md"


@dataclass
class CompareConfig:
    runs: list[Path] = arg(
        help="run folders written by trainer/train.py", positional=True, metavar="RUN"
    )
    out: Path = arg(Path("."), "folder to write compare.png and compare.md into", metavar="DIR")
    seeds: bool = arg(
        False, "group runs that differ only by seed: mean ± sd and paired bootstrap intervals"
    )
    baseline: str | None = arg(
        None, "--seeds: the configuration to compare with (one of its runs, or its label)"
    )
    bootstrap: int = arg(10_000, "--seeds: bootstrap resamples", metavar="N")


@dataclass
class Run:
    path: Path
    name: str
    epochs_planned: int | None
    finished: bool
    metrics: pd.DataFrame  # one row per finished epoch

    @property
    def chosen_on(self) -> str:
        """The split the trainer chose best.pt on: val, or test when the shards had none."""
        return "val" if "val_qwk" in self.metrics else "test"

    def best(self) -> pd.Series | None:
        """The epoch the trainer kept as best.pt (the first of equals, as the trainer does)."""
        if self.metrics.empty:
            return None
        # the trainer's statistic (trainer/judging/selection.py): val MSE for a regress head on a
        # small val split, else kappa; runs of older versions chose by kappa
        key = f"{self.chosen_on}_qwk"
        if "selected_by" in self.metrics and self.metrics["selected_by"].notna().all():
            key = self.metrics["selected_by"].iloc[-1]
        column = self.metrics[key]
        return self.metrics.loc[column.idxmin() if key.endswith("_mse") else column.idxmax()]


def run_label(config: dict, fallback: str) -> str:
    """ "resnet50, classify, ImageNet-pretrained" (arch, head, pretraining: from scratch,
    ImageNet or a --weights file) from a run's config; the folder name when there is none."""
    cfg = config.get("config", config)
    arch = cfg.get("arch")
    if not arch:
        return fallback
    init = "from scratch"
    if cfg.get("pretrained"):
        init = "ImageNet-pretrained"
    elif cfg.get("weights"):
        init = f"weights {Path(cfg['weights']).name}"
    return f"{arch}, {cfg.get('head', 'classify')}, {init}"


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
    header = (
        "| run | epochs | chosen on | best epoch | test acc | test kappa | test kappa, both eyes "
        "| test referable AUC | test recall per grade 0-4 |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        done = len(run.metrics)
        epochs = f"{done}/{run.epochs_planned}" if run.epochs_planned else str(done)
        if not run.finished:
            epochs += " (in progress)"
        best = run.best()
        if best is None:
            lines.append(f"| {run.name} | {epochs} | - | - | - | - | - | - | - |")
            continue
        chosen = run.chosen_on + (" (optimistic)" if run.chosen_on == "test" else "")
        if pd.isna(best.get("test_qwk")):  # shards without a test split: val was all it had
            lines.append(
                f"| {md_cell(run.name)} | {epochs} | {chosen} | {best['epoch']} | no test split | - | - | - | - |"
            )
            continue
        auc, paired = (_figure(best.get(k)) for k in ("test_referable_auc", "test_qwk_paired"))
        recall = " / ".join(f"{r:.2f}" for r in best["test_recall"][:NUM_CLASSES])
        lines.append(
            f"| {md_cell(run.name)} | {epochs} | {chosen} | {best['epoch']} | {100 * best['test_acc']:.1f} % "
            f"| {best['test_qwk']:.3f} | {paired} | {auc} | {recall} |"
        )
    return "\n".join(lines)


def report_links(runs: list[Run], out: Path) -> str:
    """Links to each run's report.html (trainer/judging/run_page.py), relative to ``out``."""
    links = [
        f"- {md_cell(run.name)}: [{REPORT_FILE}]({os.path.relpath(run.path / REPORT_FILE, out)})"
        for run in runs
        if (run.path / REPORT_FILE).is_file()
    ]
    return "\n\nEach run on one page:\n\n" + "\n".join(links) if links else ""


def _figure(value) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:.3f}"


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
        styles = (("train", "--"), ("val", ":"), ("test", "-"))
        for ax, key, scale in ((ax_acc, "acc", 100), (ax_loss, "loss", 1), (ax_qwk, "qwk", 1)):
            for split, style in styles:
                if f"{split}_{key}" in m:
                    ax.plot(
                        m["epoch"],
                        scale * m[f"{split}_{key}"],
                        color=colour,
                        linestyle=style,
                        marker=marker,
                        label=f"{run.name} {split}",
                    )
    ax_acc.set(
        title="Accuracy (dashed: train, dotted: val, solid: test)",
        xlabel="epoch",
        ylabel="accuracy (%)",
    )
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="loss")
    ax_qwk.set(title="Quadratic weighted kappa (val, test)", xlabel="epoch", ylabel="kappa")
    for ax in (ax_acc, ax_loss, ax_qwk):  # a legend on every panel: each is read alone
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
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
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.seeds:
        if cfg.bootstrap < 100:
            raise UserError(f"--bootstrap needs at least 100 resamples, got {cfg.bootstrap}")
        table = seeds_table(group_runs(runs), cfg.baseline, cfg.bootstrap)
        (cfg.out / SEEDS_FILE).write_text(table + "\n")
        print(table)
        print(f"\ntable:  {cfg.out / SEEDS_FILE}")
        return 0
    _unique_names(runs)
    plot_runs(runs, cfg.out / FIGURE_FILE)
    table = results_table(runs) + report_links(runs, cfg.out)
    (cfg.out / TABLE_FILE).write_text(table + "\n")
    print(table)
    print(f"\nfigure: {cfg.out / FIGURE_FILE}\ntable:  {cfg.out / TABLE_FILE}")
    return 0


def cli() -> None:
    """The ``dr-compare`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
