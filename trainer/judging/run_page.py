"""One page per run: ``runs/<name>/report.html``, everything a reader needs to judge it.

Written at the end of training and by ``dr-report RUN`` (tools/report.py) for any run
folder, also one resumed or killed half way (it then shows the epochs that finished). One
self-contained file: every figure is a PNG embedded as base64, no script, no stylesheet or
font from elsewhere, so it opens offline and can be mailed. Sections (their ``id``):

- ``warnings`` (first, only when there are any): why the run is useless (summary.json's,
  trainer/judging/sanity.py);
- ``run``: the config and the environment;
- ``figures``: the chosen epoch's figures on val and test (the numbers of summary.json,
  or of the best epoch so far for an unfinished run), and how it was chosen (``selected_by``);
- ``curves``: loss, accuracy, kappa and referable-DR AUC per epoch (train, val, test),
  the best epoch marked;
- ``confusion``: the confusion matrices of val and test at the best epoch;
- ``roc``: the referable-DR ROC of test with the operating point chosen on val;
- ``reliability``: how often a grade given with confidence c is right, before and after
  the temperature, with each bin's image count;
- ``recall``: recall per grade on val and test at the best epoch, a grade the split has
  but never got marked;
- ``gallery``: the most confidently wrong test photographs, the largest grade distance
  first, each with its class-activation map, true and predicted grade, referable score.

Each figure has one caption beside it (trainer/judging/captions.py) with its key numbers,
computed from the same calibrated ``EvalResult`` it is drawn from.

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
from trainer.base.decisions import Decisions
from trainer.base.heads import build_head
from trainer.base.metrics import (
    REFERABLE_GRADE,
    any_dr_score,
    plot_roc,
    read_confusion_csv,
    referable_score,
)
from trainer.base.runfiles import (
    CONFIG_FILE,
    CONFUSION_DIR,
    METRICS_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
    read_metrics,
)
from trainer.judging.calibration import plot_reliability, reliability_curves
from trainer.judging.captions import outputs_label, reliability_caption, roc_caption, score_text
from trainer.judging.evaluation import EvalResult
from trainer.judging.options import GALLERY
from trainer.judging.sanity import run_warnings
from trainer.judging.selection import SMALL_VAL, Selection

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
        # 9 significant digits: every float32 back exactly (8 moved a score off the threshold)
        atomic_write_text(path, table.to_csv(index=False, float_format="%.9g"))
    epochs = sorted({path.stem.rsplit("_", 1)[1] for path in folder.glob("*_epoch_*.csv")})
    for path in folder.glob("*_epoch_*.csv"):
        if path.stem.rsplit("_", 1)[1] not in epochs[-2:]:
            path.unlink()


def result_from_table(table: pd.DataFrame, head: str, decisions: Decisions) -> EvalResult:
    """A saved predictions table as the result it was written from: its raw outputs, read
    with the decisions of that epoch (the temperature included: every figure is calibrated)."""
    outputs = table[[c for c in table.columns if c.startswith("out")]].to_numpy(np.float32)
    return EvalResult(
        keys=list(table["key"]),
        labels=table["true"].to_numpy(np.int64),
        outputs=outputs,
        head=build_head(head),
    ).decided(decisions)


def best_results(
    run_dir: Path, best: dict, decisions: Decisions, config: dict, shards: Path | None
) -> dict:
    """split -> EvalResult at the best epoch: saved by the trainer, else evaluated again."""
    head = config.get("head", "classify")
    found = {}
    for split in ("val", "test"):
        path = predictions_path(run_dir, split, best["epoch"])
        if path.is_file():
            found[split] = result_from_table(pd.read_csv(path), head, decisions)
    if "test" in found or shards is None or not (Path(run_dir) / BEST_FILE).is_file():
        return found
    return evaluate_again(Path(run_dir) / BEST_FILE, shards)


def evaluate_again(checkpoint: Path, shards: Path) -> dict:
    """Every split of ``shards`` through best.pt, in this process (the torch loader), the one
    way evaluate takes: the checkpoint's normalisation, decisions and precision."""
    from pipeline.manifest import read_manifest
    from trainer.base.bestfile import open_best
    from trainer.judging.evaluation import checkpoint_accelerator, evaluate_best

    best = open_best(checkpoint)
    manifest = read_manifest(shards)
    accelerator = checkpoint_accelerator(best.info)
    model = best.model.to(accelerator.device)
    options = {"batch_size": 16, "backend": "torch", "workers": 0}
    return {
        split: evaluate_best(best, model, accelerator, shards, split, loader_options=options)[0]
        for split in ("val", "test")
        if manifest.has(split)
    }


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
        ax.set(title=title, xlabel="epoch", ylabel=title)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(target, format="png", dpi=90)
    plt.close(fig)


def roc_png(result: EvalResult, threshold: float | None, outputs: str) -> bytes | None:
    positive = result.labels >= REFERABLE_GRADE
    if positive.all() or not positive.any():
        return None
    curves = {
        "referable DR (>= 2)": (positive, referable_score(result.probs)),
        "any DR (>= 1)": (result.labels >= 1, any_dr_score(result.probs)),
    }
    title = f"test ({outputs}), operating point from val"
    return png(lambda f: plot_roc(curves, threshold, f, title=title))


def gallery(run_dir: Path, result: EvalResult, shards: Path | None, count: int, threshold) -> list:
    """(PNG bytes, caption) of the most confidently wrong test photographs, with their maps;
    each referable score printed with the digits that compare it with the threshold."""
    from trainer.base.bestfile import load_best
    from trainer.judging.explain import rank_wrong, write_overlays

    table = result.predictions()
    wrong = [i for i in rank_wrong(table) if table["true"].iloc[i] != table["pred"].iloc[i]]
    chosen = table.iloc[wrong[:count]]
    if chosen.empty or shards is None or not (Path(run_dir) / BEST_FILE).is_file():
        return []
    model, info = load_best(Path(run_dir) / BEST_FILE)
    limit = "" if threshold is None else f" (threshold {score_text(threshold, threshold)})"
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_overlays(model, info, shards, "test", chosen, Path(tmp), captioned=False)
        return [
            (
                p.read_bytes(),
                f"{row.key}: true {row.true}, predicted {row.pred}, referable score "
                f"{score_text(row.referable_score, threshold)}{limit}",
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
.warning { color: #a00; font-weight: bold; } td.zero { background: #fdd; }
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


SELECTED_BY = {"qwk": "the highest {split} kappa", "mse": "the lowest {split} MSE"}


def selection_sentence(best: dict, chooser: str) -> str:
    """How the best epoch was chosen, as summary.json's ``selected_by`` says."""
    key = best.get("selected_by", f"{chooser}_qwk")
    split, statistic = key.split("_", 1)
    how = SELECTED_BY.get(statistic, "the best {split} " + statistic).format(split=split)
    if statistic == "mse":
        how += f" (the regress head on a {split} split under {SMALL_VAL} images)"
    return f"Epoch {best['epoch']}, {how}. Val chooses, test reports."


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
        ["<th>both eyes: partner weight</th>", figure_cell("pair_blend", best)],
    ]
    for key, label in (("cut_points", "cut-points"), ("pair_cut_points", "cut-points, both eyes")):
        if best.get(key):
            chosen.append([f"<th>{label}</th>", *(f"<td>{c:.4f}</td>" for c in best[key])])
    intro = f"<p>{html.escape(selection_sentence(best, chooser))}</p>"
    return section(
        "figures", "Figures at the best epoch", intro + table(rows, ["", *splits]) + table(chosen)
    )


def recall_section(best: dict, present: dict[str, np.ndarray]) -> str:
    """Recall per grade; a grade of the split that no photograph was graded as is marked."""
    rows, missed = [], []
    for split in ("val", "test"):
        if f"{split}_recall" not in best:
            continue
        cells = []
        for grade, r in enumerate(best[f"{split}_recall"]):
            zero = r == 0 and split in present and present[split][grade] > 0
            missed += [f"grade {grade} on {split}"] if zero else []
            mark = ' class="zero" title="no photograph of this grade was graded so"'
            cells.append(f"<td{mark if zero else ''}>{r:.3f}{' (none found)' if zero else ''}</td>")
        rows.append([f"<th>{split}</th>", *cells])
    note = (
        f'<p class="warning">Zero recall: {html.escape(", ".join(missed))}.</p>' if missed else ""
    )
    return section(
        "recall",
        "Recall per grade at the best epoch",
        note + table(rows, ["", *(f"grade {g}" for g in range(NUM_CLASSES))]),
    )


def figure(data: bytes | None, alt: str, caption: str) -> str:
    """A picture and the one caption that states its key numbers."""
    if data is None:
        return f'<p class="note">{html.escape(caption)}</p>'
    return f"<figure>{img(data, alt)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def warnings_block(summary: dict | None, rows: list[dict], run_dir: Path, best, chooser) -> str:
    """Why the run is useless, first on the page: summary.json's, else judged from its files."""
    if summary is not None and "warnings" in summary:
        found = summary["warnings"]
    else:
        matrix = run_dir / CONFUSION_DIR / f"{chooser}_epoch_{best['epoch']:03d}.csv"
        confusion = read_confusion_csv(matrix) if matrix.is_file() else None
        found = run_warnings(rows, chooser, confusion, None)
    items = "".join(f"<li>{html.escape(w)}</li>" for w in found)
    return f'<section id="warnings" class="warning"><ul>{items}</ul></section>' if found else ""


def chosen_row(rows: list[dict], chooser: str) -> dict:
    """The best epoch of an unfinished run, as the trainer chose it (its ``selected_by``)."""
    key = rows[-1].get("selected_by", f"{chooser}_qwk")
    selection = Selection(key, higher_is_better=not key.endswith("_mse"))
    best = None
    for row in rows:
        best = row if selection.better(row, best) else best
    return best


def build_html(run_dir: Path, shards: Path | None = None, gallery_size: int = GALLERY) -> str:
    run_dir = Path(run_dir)
    config = _json(run_dir / CONFIG_FILE) or {}
    summary = _json(run_dir / SUMMARY_FILE)
    if not (run_dir / METRICS_FILE).is_file() or not (rows := read_metrics(run_dir)):
        raise UserError(f"{run_dir} has no finished epoch ({METRICS_FILE}): nothing to report")
    chooser = (
        summary["chosen_on"] if summary else ("val" if rows and "val_qwk" in rows[0] else "test")
    )
    best = summary["best"] if summary else chosen_row(rows, chooser)
    shards = shards or _existing(config.get("config", {}).get("shards"))
    name = html.escape(run_dir.resolve().name)
    parts = [
        warnings_block(summary, rows, run_dir, best, chooser),
        run_section(config, summary, rows),
        figures_section(best, chooser),
    ]
    curves_caption = (
        "Loss, accuracy, quadratic kappa and referable-DR AUC per epoch for train, val and "
        f"test; the grey line marks the best epoch ({best['epoch']})."
    )
    parts.append(
        section(
            "curves",
            "Per epoch",
            figure(png(lambda f: plot_curves(rows, best["epoch"], f)), "curves", curves_caption),
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
    decisions = Decisions.from_dict(best, f"{run_dir}'s best epoch")
    results = best_results(run_dir, best, decisions, config.get("config", {}), shards)
    test = results.get("test")
    missing = "needs the best epoch's predictions, or best.pt and the shards"
    threshold = decisions.referable_threshold
    outputs = outputs_label("alone")  # the trainer's test figures: each eye alone
    roc = roc_png(test, threshold, outputs) if test is not None else None
    parts.append(
        section(
            "roc",
            "Referable DR on test: ROC and the operating point",
            figure(roc, "roc", roc_caption(test, threshold, outputs) if test else missing),
        )
    )
    curves = {f"{s}, {k}": v for s, r in results.items() for k, v in reliability_curves(r).items()}
    captions = " ".join(reliability_caption(s, r) for s, r in results.items())
    reliability_png = png(lambda f: plot_reliability(curves, f, title="val and test"))
    parts.append(
        section(
            "reliability",
            "Reliability: is a 90 % grade right 90 % of the time?",
            figure(reliability_png, "reliability", captions)
            if curves
            else figure(None, "", missing),
        )
    )
    present = {s: np.bincount(r.labels, minlength=NUM_CLASSES) for s, r in results.items()}
    parts.append(recall_section(best, present))
    shown = gallery(run_dir, test, shards, gallery_size, threshold) if test is not None else []
    figures = "".join(figure(data, caption, caption) for data, caption in shown)
    parts.append(
        section(
            "gallery",
            "The most confidently wrong test photographs, and where the model looked",
            f'<div class="gallery">{figures}</div>' if figures else figure(None, "", missing),
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
