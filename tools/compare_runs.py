"""Compare training runs: accuracy/loss/kappa curves per epoch and a results table.

    python tools/compare_runs.py runs/resnet18 runs/resnet50 --out runs/compare.png

Writes FIG.png (train dashed, test solid, one colour per run; a loss panel and a
kappa panel) and FIG.md (the markdown table it also prints). Runs of different
lengths and runs still in progress are fine: each is drawn as far as it got.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.constants import NUM_CLASSES
from pipeline.errors import UserError, run_cli

METRICS_FILE = "metrics.jsonl"


@dataclass
class Run:
    path: Path
    name: str
    epochs_planned: int | None
    finished: bool
    rows: list[dict]

    def column(self, key: str) -> list[float]:
        return [row[key] for row in self.rows]

    def best(self, key: str) -> dict | None:
        return max(self.rows, key=lambda r: r[key]) if self.rows else None


def _config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def run_label(config: dict, fallback: str) -> str:
    """"resnet50, pretrained" from a run's config; the folder name when there is none."""
    cfg = config.get("config", config)
    arch = cfg.get("arch")
    if not arch:
        return fallback
    init = "pretrained" if cfg.get("pretrained") or cfg.get("weights") else "from scratch"
    return f"{arch}, {init}"


def read_metrics(path: Path) -> list[dict]:
    """The epochs logged so far; a half-written last line (run in progress) is ignored."""
    rows = []
    lines = (path / METRICS_FILE).read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break
            raise UserError(f"{path / METRICS_FILE} line {number} is not JSON") from None
    return rows


def load_run(path: str | os.PathLike) -> Run:
    path = Path(path)
    if not (path / METRICS_FILE).is_file():
        raise UserError(f"{path} has no {METRICS_FILE}; is it a run folder written by trainer/train.py?")
    config = _config(path)
    cfg = config.get("config", config)
    return Run(
        path=path,
        name=run_label(config, path.name),
        epochs_planned=cfg.get("epochs"),
        finished=(path / "summary.json").is_file(),
        rows=read_metrics(path),
    )


def _unique_names(runs: list[Run]) -> None:
    """Two runs with the same label (e.g. two schedules) get their folder names added."""
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
    for run in runs:
        if seen[run.name] > 1:
            run.name = f"{run.name} ({run.path.name})"


def results_table(runs: list[Run]) -> str:
    header = "| run | epochs | best test acc (epoch) | best test kappa (epoch) | final recall per grade 0-4 |"
    lines = [header, "|---|---|---|---|---|"]
    for run in runs:
        done = len(run.rows)
        planned = run.epochs_planned
        epochs = f"{done}/{planned}" if planned else str(done)
        if not run.finished:
            epochs += " (in progress)"
        if not run.rows:
            lines.append(f"| {run.name} | {epochs} | - | - | - |")
            continue
        acc, qwk = run.best("test_acc"), run.best("test_qwk")
        recall = " / ".join(f"{r:.2f}" for r in run.rows[-1]["test_recall"][:NUM_CLASSES])
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
    for i, run in enumerate(r for r in runs if r.rows):
        colour = colours[i % len(colours)]
        epochs = run.column("epoch")
        marker = "o" if len(epochs) < 30 else None
        for ax, key in ((ax_acc, "acc"), (ax_loss, "loss")):
            scale = 100 if key == "acc" else 1
            ax.plot(epochs, [scale * v for v in run.column(f"test_{key}")], color=colour,
                    marker=marker, label=f"{run.name} test")
            ax.plot(epochs, [scale * v for v in run.column(f"train_{key}")], color=colour,
                    linestyle="--", marker=marker, alpha=0.8, label=f"{run.name} train")
        ax_qwk.plot(epochs, run.column("test_qwk"), color=colour, marker=marker, label=run.name)
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders written by trainer/train.py")
    parser.add_argument("--out", default="compare.png", help="figure file (.png); the table goes beside it as .md")
    args = parser.parse_args(argv)

    runs = [load_run(p) for p in args.runs]
    if not any(run.rows for run in runs):
        raise UserError("none of the runs has a finished epoch yet; nothing to compare")
    _unique_names(runs)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} should end in .png")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, out)
    table = results_table(runs)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nfigure: {out}\ntable:  {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    run_cli(main)
