"""One page per run: ``runs/<name>/report.html``, everything a reader needs to judge it.

Written at the end of training and by ``dr-report RUN`` (tools/report.py) for any run
folder, also one resumed or killed half way (it then shows the epochs that finished). One
self-contained file: every figure is a PNG embedded as base64, no script, no stylesheet or
font from elsewhere, so it opens offline and can be mailed. Sections (their ``id``):

- ``run``: the config and the environment;
- ``figures``: the chosen epoch's figures on val and test (the numbers of summary.json,
  or of the best epoch so far for an unfinished run);
- ``curves``: loss, accuracy, kappa and referable-DR AUC per epoch (train, val, test),
  the best epoch marked;
- ``confusion``: the confusion matrices of val and test at the best epoch;
- ``roc``: the referable-DR ROC of test with the operating point chosen on val;
- ``reliability``: how often a grade given with confidence c is right, before and after
  the temperature;
- ``recall``: recall per grade on val and test at the best epoch;
- ``gallery``: the most confidently wrong test photographs, the largest grade distance
  first, each with its class-activation map, true and predicted grade, referable score.

The per-image sections need the best epoch's predictions: the trainer keeps them as
``predictions/{val,test}_epoch_NNN.csv`` (``save_predictions``); a run without them (an
older one, or killed between its checkpoint and them) is evaluated again from best.pt on
its shards when they are there. The gallery reads its photographs from the shards.
"""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.constants import NUM_CLASSES, SPLITS
from pipeline.errors import UserError
from pipeline.fileio import atomic_write_text
from trainer.base.bestfile import BEST_FILE
from trainer.base.heads import build_head
from trainer.base.metrics import REFERABLE_GRADE, any_dr_score, plot_roc, referable_score
from trainer.base.runfiles import (
    CONFIG_FILE,
    CONFUSION_DIR,
    METRICS_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
    read_metrics,
)
from trainer.judging.calibration import plot_reliability, reliability_curves
from trainer.judging.evaluation import EvalResult
from trainer.judging.options import GALLERY

PREDICTIONS_DIR = "predictions"
CURVES = (("loss", "loss"), ("acc", "accuracy"), ("qwk", "quadratic kappa"))
CURVES += (("referable_auc", "referable DR AUC"),)
FIGURES = (
    ("qwk", "kappa"),
    ("qwk_paired", "kappa, both eyes"),
    ("acc", "accuracy"),
    ("loss", "loss"),
    ("referable_auc", "referable DR AUC"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("any_dr_auc", "any DR AUC"),
    ("ece_raw", "ECE before temperature"),
    ("ece", "ECE after temperature"),
)


# ---------------------------------------------------------------- per-image predictions


def predictions_path(run_dir: Path, split: str, epoch: int) -> Path:
    return Path(run_dir) / PREDICTIONS_DIR / f"{split}_epoch_{epoch:03d}.csv"


def save_predictions(run_dir: Path, epoch: int, results: dict[str, EvalResult]) -> None:
    """The best epoch's per-image table per split (key, true, pred, p0..p4 calibrated,
    referable_score, out0.. raw outputs); the best epoch before it is kept until the next
    one is written, the rest go."""
    folder = Path(run_dir) / PREDICTIONS_DIR
    folder.mkdir(exist_ok=True)
    for split, result in results.items():
        table = result.predictions()
        for k in range(result.outputs.shape[1]):
            table[f"out{k}"] = result.outputs[:, k]
        path = predictions_path(run_dir, split, epoch)
        atomic_write_text(path, table.to_csv(index=False, float_format="%.8g"))
    epochs = sorted({path.stem.rsplit("_", 1)[1] for path in folder.glob("*_epoch_*.csv")})
    for path in folder.glob("*_epoch_*.csv"):
        if path.stem.rsplit("_", 1)[1] not in epochs[-2:]:
            path.unlink()


def result_from_table(table: pd.DataFrame, head: str, cuts, temperature) -> EvalResult:
    outputs = table[[c for c in table.columns if c.startswith("out")]].to_numpy(np.float32)
    return EvalResult(
        float("nan"),
        list(table["key"]),
        table["true"].to_numpy(np.int64),
        outputs,
        build_head(head),
        tuple(cuts) if cuts else None,
        temperature,
    )


def best_results(run_dir: Path, best: dict, config: dict, shards: Path | None) -> dict:
    """split -> EvalResult at the best epoch: saved by the trainer, else evaluated again."""
    head, cuts, temperature = (
        config.get("head", "classify"),
        best.get("cut_points"),
        best.get("temperature"),
    )
    found = {}
    for split in ("val", "test"):
        path = predictions_path(run_dir, split, best["epoch"])
        if path.is_file():
            found[split] = result_from_table(pd.read_csv(path), head, cuts, temperature)
    if "test" in found or shards is None or not (Path(run_dir) / BEST_FILE).is_file():
        return found
    return evaluate_again(Path(run_dir) / BEST_FILE, shards)


def evaluate_again(checkpoint: Path, shards: Path) -> dict:
    """Every split of ``shards`` through best.pt, in this process (the torch loader)."""
    import torch
    from accelerate import Accelerator

    from pipeline.loading.loader import EvalSpec, build_loader
    from pipeline.manifest import read_manifest
    from trainer.base.bestfile import head_of, load_best
    from trainer.judging.evaluation import evaluate

    model, info = load_best(checkpoint)
    head, cuts = head_of(info)
    manifest = read_manifest(shards)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = model.to(accelerator.device)
    found = {}
    for split in ("val", "test"):
        if not manifest.has(split):
            continue
        loader = build_loader(
            shards,
            EvalSpec(
                split=split,
                batch_size=16,
                image_size=int(info["image_size"]),
                backend="torch",
                device=accelerator.device,
                workers=0,
                with_keys=True,
            ),
        )
        result = evaluate(model, loader, accelerator, head, cuts=cuts)
        found[split] = result.with_temperature(info.get("temperature"))
        loader.close()
    return found


# ---------------------------------------------------------------- figures


def png(draw) -> bytes:
    """The PNG bytes a plotting function writes into the file object it is given."""
    buffer = io.BytesIO()
    draw(buffer)
    return buffer.getvalue()


def plot_curves(rows: list[dict], best_epoch: int, target) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.8))
    epochs = [r["epoch"] for r in rows]
    for ax, (key, title) in zip(axes, CURVES, strict=True):
        for split, style, colour in zip(SPLITS, ("--", ":", "-"), ("C0", "C1", "C2"), strict=True):
            values = [r.get(f"{split}_{key}") for r in rows]
            if any(v is not None for v in values):
                ys = [np.nan if v is None else v for v in values]
                ax.plot(epochs, ys, style, color=colour, marker="o", label=split)
        ax.axvline(best_epoch, color="grey", alpha=0.5, label=f"best epoch ({best_epoch})")
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, format="png", dpi=90)
    plt.close(fig)


def roc_png(result: EvalResult, threshold: float | None) -> bytes | None:
    positive = result.labels >= REFERABLE_GRADE
    if positive.all() or not positive.any():
        return None
    curves = {
        "referable DR (>= 2)": (positive, referable_score(result.probs)),
        "any DR (>= 1)": (result.labels >= 1, any_dr_score(result.probs)),
    }
    return png(lambda f: plot_roc(curves, threshold, f, title="test, operating point from val"))


def gallery(run_dir: Path, result: EvalResult, shards: Path | None, count: int) -> list:
    """(PNG bytes, caption) of the most confidently wrong test photographs, with their maps."""
    from trainer.base.bestfile import load_best
    from trainer.judging.explain import rank_wrong, write_overlays

    table = result.predictions()
    wrong = [i for i in rank_wrong(table) if table["true"].iloc[i] != table["pred"].iloc[i]]
    chosen = table.iloc[wrong[:count]]
    if chosen.empty or shards is None or not (Path(run_dir) / BEST_FILE).is_file():
        return []
    model, info = load_best(Path(run_dir) / BEST_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_overlays(model, info, shards, "test", chosen, Path(tmp))
        return [
            (
                p.read_bytes(),
                f"{row.key}: true {row.true}, predicted {row.pred}, referable score {row.referable_score:.2f}",
            )
            for p, row in zip(paths, chosen.itertuples(), strict=True)
        ]


# ---------------------------------------------------------------- the page


def img(data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def number(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def figure_cell(key: str, row: dict) -> str:
    value = row.get(key)
    data = "" if value is None else f' data-key="{key}" data-value="{value!r}"'
    return f"<td{data}>{number(value)}</td>"


def table(rows: list[list[str]], header: list[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    return f"<table>{head}{body}</table>"


def section(ident: str, title: str, body: str) -> str:
    return f'<section id="{ident}"><h2>{html.escape(title)}</h2>{body}</section>'


STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 1em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f3f3f3; } img { max-width: 100%; }
.gallery figure { display: inline-block; width: 48%; margin: 0.5%; }
.note { color: #666; }
"""


def run_section(config: dict, summary: dict | None, rows: list[dict]) -> str:
    cfg, env = config.get("config", {}), config.get("environment", {})
    keys = (
        "arch",
        "head",
        "pretrained",
        "epochs",
        "image_size",
        "batch_size",
        "optimizer",
        "lr",
        "schedule",
        "augment",
        "class_weights",
        "shards",
        "seed",
    )
    items = [(k, cfg.get(k)) for k in keys if k in cfg]
    items += [
        (k, env.get(k))
        for k in ("git_commit", "torch", "device_name", "world_size", "mixed_precision", "backend")
        if k in env
    ]
    state = "finished" if summary else f"not finished: {len(rows)} epoch(s) logged"
    if config.get("resumed_after_epoch"):
        state += f", resumed after epoch {config['resumed_after_epoch']}"
    cells = [[f"<th>{html.escape(k)}</th>", f"<td>{number(v)}</td>"] for k, v in items]
    return section("run", "The run", f"<p>{html.escape(state)}</p>" + table(cells))


def figures_section(best: dict, chooser: str) -> str:
    splits = [s for s in ("val", "test") if f"{s}_qwk" in best]
    rows = [
        [f"<th>{label}</th>", *(figure_cell(f"{s}_{key}", best) for s in splits)]
        for key, label in FIGURES
    ]
    chosen = [
        [
            "<th>referable threshold (on val, calibrated)</th>",
            figure_cell("referable_threshold", best),
        ],
        ["<th>temperature</th>", figure_cell("temperature", best)],
    ]
    intro = f"<p>Epoch {best['epoch']}, the highest {chooser} kappa. Val chooses, test reports.</p>"
    return section(
        "figures", "Figures at the best epoch", intro + table(rows, ["", *splits]) + table(chosen)
    )


def recall_section(best: dict) -> str:
    rows = []
    for split in ("val", "test"):
        if f"{split}_recall" in best:
            rows.append(
                [f"<th>{split}</th>", *(f"<td>{r:.3f}</td>" for r in best[f"{split}_recall"])]
            )
    return section(
        "recall",
        "Recall per grade at the best epoch",
        table(rows, ["", *(f"grade {g}" for g in range(NUM_CLASSES))]),
    )


def build_html(run_dir: Path, shards: Path | None = None, gallery_size: int = GALLERY) -> str:
    run_dir = Path(run_dir)
    config = _json(run_dir / CONFIG_FILE) or {}
    summary = _json(run_dir / SUMMARY_FILE)
    if not (run_dir / METRICS_FILE).is_file() or not (rows := read_metrics(run_dir)):
        raise UserError(f"{run_dir} has no finished epoch ({METRICS_FILE}): nothing to report")
    chooser = (
        summary["chosen_on"] if summary else ("val" if rows and "val_qwk" in rows[0] else "test")
    )
    if summary:
        best = summary["best"]
    else:  # the first of equals, as the trainer keeps it
        best = max(rows, key=lambda r: (r[f"{chooser}_qwk"], -r["epoch"]))
    shards = shards or _existing(config.get("config", {}).get("shards"))
    name = html.escape(run_dir.resolve().name)
    parts = [run_section(config, summary, rows), figures_section(best, chooser)]
    parts.append(
        section(
            "curves", "Per epoch", img(png(lambda f: plot_curves(rows, best["epoch"], f)), "curves")
        )
    )
    matrices = [
        img(
            (run_dir / CONFUSION_DIR / f"{s}_epoch_{best['epoch']:03d}.png").read_bytes(),
            f"confusion {s}",
        )
        for s in ("val", "test")
        if (run_dir / CONFUSION_DIR / f"{s}_epoch_{best['epoch']:03d}.png").is_file()
    ]
    parts.append(
        section(
            "confusion",
            "Confusion matrices at the best epoch (val, test)",
            "".join(matrices) or '<p class="note">not written</p>',
        )
    )
    results = best_results(run_dir, best, config.get("config", {}), shards)
    test = results.get("test")
    missing = '<p class="note">needs the best epoch\'s predictions, or best.pt and the shards</p>'
    roc = roc_png(test, best.get("referable_threshold")) if test is not None else None
    parts.append(
        section(
            "roc",
            "Referable DR on test: ROC and the operating point",
            img(roc, "roc") if roc else missing,
        )
    )
    curves = {f"{s}, {k}": v for s, r in results.items() for k, v in reliability_curves(r).items()}
    parts.append(
        section(
            "reliability",
            "Reliability: is a 90 % grade right 90 % of the time?",
            img(png(lambda f: plot_reliability(curves, f, title="val and test")), "reliability")
            if curves
            else missing,
        )
    )
    parts.append(recall_section(best))
    shown = gallery(run_dir, test, shards, gallery_size) if test is not None else []
    figures = "".join(
        f"<figure>{img(data, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"
        for data, caption in shown
    )
    parts.append(
        section(
            "gallery",
            "The most confidently wrong test photographs, and where the model looked",
            f'<div class="gallery">{figures}</div>' if figures else missing,
        )
    )
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{name}</title>'
        f"<style>{STYLE}</style></head><body><h1>Run {name}</h1>{''.join(parts)}</body></html>\n"
    )


def write_report(run_dir: Path, shards: Path | None = None, gallery_size: int = GALLERY) -> Path:
    path = Path(run_dir) / REPORT_FILE
    atomic_write_text(path, build_html(run_dir, shards, gallery_size))
    return path


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _existing(path: str | None) -> Path | None:
    return Path(path) if path and (Path(path) / "manifest.json").is_file() else None
