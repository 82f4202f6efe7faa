"""Evaluate a trained checkpoint on a split of a shard folder.

    python trainer/evaluate.py --checkpoint runs/resnet18/best.pt --shards shards --out runs/resnet18/eval
    accelerate launch --multi_gpu --num_processes 4 trainer/evaluate.py --checkpoint ... --shards ...

Accuracy, quadratic weighted kappa, per-class recall, loss and the confusion matrix
(CSV + PNG), over every sample of the split exactly once, on 1..N processes; with --out,
also ``predictions.csv``: one row per image (key, patient, eye, true, pred, p0..p4,
referable_score), the file to open to see which photographs were graded wrong, and
``roc.png``. Screening figures: referable DR (grade >= 2, score p2+p3+p4) ROC-AUC, with
sensitivity and specificity at the operating point stored in the checkpoint (chosen on
val by the trainer), and any-DR (grade >= 1) ROC-AUC. Probabilities are calibrated with
the checkpoint's temperature (classify and ordinal heads); ``ece_raw`` and ``ece`` are the
expected calibration error before and after it, ``reliability.png`` draws both. With
``--explain N``, ``cam/<key>.png`` shows where the model looked (trainer/explain.py) in
the N most confidently wrong photographs (largest grade distance first). It
evaluates the way the trainer does (same batch size, precision, loader and loss
weighting, read from the checkpoint), so on the trainer's test split it reproduces the
numbers logged for that epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from accelerate import Accelerator

from pipeline.cli import arg, parse_config, run_cli
from pipeline.errors import UserError
from pipeline.fileio import atomic_write, atomic_write_json
from pipeline.loading.loader import build_loader
from pipeline.manifest import read_manifest
from trainer.calibration import ece_figures, plot_reliability, reliability_curves
from trainer.checkpoint import head_of, load_best
from trainer.config import BACKENDS
from trainer.engine import bare, class_weights_for, evaluate, resolve_precision
from trainer.explain import CAM_DIR, rank_wrong, write_overlays
from trainer.metrics import (
    REFERABLE_GRADE,
    any_dr_score,
    operating_threshold,
    plot_confusion,
    plot_roc,
    referable_score,
    screening,
    write_confusion_csv,
)

PREDICTIONS_FILE = "predictions.csv"
ROC_FILE = "roc.png"
RELIABILITY_FILE = "reliability.png"


@dataclass
class EvalConfig:
    checkpoint: Path = arg(help="best.pt written by trainer/train.py", metavar="FILE")
    shards: Path = arg(help="shard folder", metavar="DIR")
    split: str = arg("test", "split to evaluate: train, val or test")
    out: Path | None = arg(
        None, "write metrics.json and the confusion matrix into this folder", metavar="DIR"
    )
    batch_size: int | None = arg(None, "per process (default: the checkpoint's)")
    backend: str | None = arg(None, "loader backend (default: the checkpoint's)", choices=BACKENDS)
    workers: int | None = arg(None, "loader workers per process")
    pair_eyes: bool = arg(
        False,
        "blend each eye's outputs with its partner's (the weight chosen on val, "
        "stored in the checkpoint); reports kappa with and without, and writes the "
        "blended predictions",
    )
    explain: int = arg(
        0,
        "with --out: write OUT/cam/<key>.png, the class-activation map beside the photograph, "
        "for this many photographs, the most confidently wrong first",
        metavar="N",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_config(
        EvalConfig, argv, prog="trainer/evaluate.py", description=__doc__.splitlines()[0]
    )
    model, info = load_best(args.checkpoint)
    cfg = info.get("config", {})
    batch_size = args.batch_size or cfg.get("batch_size", 8)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if args.explain and not args.out:
        raise UserError("--explain writes pictures: give --out DIR too")
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=not cuda, mixed_precision=resolve_precision(cfg.get("precision", "auto"), cuda)
    )
    manifest = read_manifest(args.shards)
    expected = manifest.split(args.split).samples
    gpu = accelerator.device.type == "cuda"
    loader = build_loader(
        args.shards,
        args.split,
        train=False,
        batch_size=batch_size,
        image_size=int(info["image_size"]),
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=cfg.get("seed", 0),
        backend=args.backend or cfg.get("backend", "auto"),
        device=accelerator.device,
        workers=args.workers,
        channels_last=gpu,
        with_keys=True,
    )
    # the trainer's test loss is weighted as its training loss was, by the train split's counts
    weights_mode = cfg.get("class_weights", "none")
    train_counts = manifest.splits["train"].class_counts if "train" in manifest.splits else None
    class_weights = (
        class_weights_for(train_counts, weights_mode, accelerator.device) if train_counts else None
    )
    model = model.to(accelerator.device)
    if gpu:
        model = model.to(memory_format=torch.channels_last)
    model = accelerator.prepare(model)

    head, cuts = head_of(info)
    alone = evaluate(
        model, loader, accelerator, head, class_weights, expected=expected, cuts=cuts
    ).with_temperature(info.get("temperature"))  # None: regress, or an older checkpoint
    loader.close()
    blend = info.get("pair_blend") or 0.0
    result = alone.paired(blend) if args.pair_eyes else alone
    positive, score = result.labels >= REFERABLE_GRADE, referable_score(result.probs)
    threshold, threshold_from = info.get("referable_threshold"), "the checkpoint (chosen on val)"
    if threshold is None:  # a checkpoint of an older version: choose here, and say so
        threshold, threshold_from = (
            operating_threshold(positive, score),
            f"this split ({args.split})",
        )
    screen = screening(result.labels, result.probs, threshold)
    metrics = {
        "checkpoint": str(args.checkpoint),
        "checkpoint_epoch": info.get("epoch"),
        "arch": info["arch"],
        "shards": str(args.shards),
        "split": args.split,
        "samples": result.samples,
        "loss": result.loss,
        "accuracy": result.accuracy,
        "qwk": result.kappa,
        "qwk_eye_alone": alone.kappa,
        "qwk_both_eyes": alone.paired(blend).kappa,
        "pair_blend": blend,
        "paired": args.pair_eyes,
        "head": head.name,
        "cut_points": cuts,
        "recall": result.recall,
        "confusion": result.confusion.tolist(),
        **screen,
        "referable_threshold": threshold,
        "referable_threshold_from": threshold_from,
        "temperature": alone.temperature,
        **ece_figures(result),
        "world_size": accelerator.num_processes,
        "backend": loader.backend,
    }
    recall = " / ".join(f"{r:.2f}" for r in result.recall)
    accelerator.print(
        f"{info['arch']} epoch {info.get('epoch')} on {args.split} ({result.samples} images): "
        f"accuracy {100 * result.accuracy:.2f} %, kappa {result.kappa:.4f}, loss {result.loss:.4f}, "
        f"recall 0-4 {recall}"
    )
    accelerator.print(
        f"calibration: ECE {metrics['ece_raw']:.4f} before, {metrics['ece']:.4f} after "
        + (f"temperature {result.temperature:.3f}" if result.temperature else "(no temperature)")
    )
    if args.pair_eyes:
        accelerator.print(
            f"both eyes (partner weight {blend:.2f}, chosen on val): kappa {result.kappa:.4f}; "
            f"each eye alone: kappa {alone.kappa:.4f}"
        )
    if screen["referable_auc"] is not None:
        accelerator.print(
            f"referable DR (grade >= 2): AUC {screen['referable_auc']:.4f}"
            + (
                f", sensitivity {screen['sensitivity']:.3f} and specificity {screen['specificity']:.3f} "
                f"at threshold {threshold:.4f} from {threshold_from}"
                if threshold is not None
                else ""
            )
            + (
                f"; any DR AUC {screen['any_dr_auc']:.4f}"
                if screen["any_dr_auc"] is not None
                else ""
            )
        )
    if args.out and accelerator.is_main_process:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "metrics.json", metrics)
        write_confusion_csv(result.confusion, out / f"confusion_{args.split}.csv")
        plot_confusion(
            result.confusion,
            out / f"confusion_{args.split}.png",
            title=(
                f"{info['arch']} on {args.split}: accuracy {100 * result.accuracy:.1f} %, kappa {result.kappa:.3f}"
            ),
        )
        table = result.predictions()
        write_predictions(table, out / PREDICTIONS_FILE)
        if args.explain > 0:
            chosen = table.iloc[rank_wrong(table)[: args.explain]]
            explained = write_overlays(
                bare(accelerator, model),
                info,
                args.shards,
                args.split,
                chosen,
                out / CAM_DIR,
                accelerator.device,
            )
            accelerator.print(
                f"wrote {len(explained)} class-activation overlays into {out / CAM_DIR}"
            )
        curves = {
            "referable DR (>= 2)": (positive, score),
            "any DR (>= 1)": (result.labels >= 1, any_dr_score(result.probs)),
        }
        plot_roc(curves, threshold, out / ROC_FILE, title=f"{info['arch']} on {args.split}")
        plot_reliability(
            reliability_curves(result),
            out / RELIABILITY_FILE,
            title=f"{info['arch']} on {args.split}",
        )
        accelerator.print(
            f"wrote {out / 'metrics.json'}, {PREDICTIONS_FILE}, {ROC_FILE}, {RELIABILITY_FILE} "
            f"and confusion_{args.split}.csv/.png"
        )
    accelerator.end_training()
    return 0


def write_predictions(table: pd.DataFrame, path: Path) -> None:
    """One row per image; 8 decimals keep the scores' ranking (and so the AUC) as computed."""
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.8f"))


def cli() -> None:
    """The ``dr-evaluate`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
