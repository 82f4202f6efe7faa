"""Evaluate a trained checkpoint on a split of a shard folder.

    python trainer/evaluate.py --checkpoint runs/resnet18/best.pt --shards shards --out runs/resnet18/eval
    accelerate launch --multi_gpu --num_processes 4 trainer/evaluate.py --checkpoint ... --shards ...

Accuracy, quadratic weighted kappa, per-class recall, loss and the confusion matrix
(CSV + PNG), over every sample of the split exactly once, on 1..N processes; with --out,
also ``predictions.csv``: one row per image (key, patient, eye, true, pred, p0..p4,
referable_score), the file to open to see which photographs were graded wrong, and
``roc.png``. With --pair-eyes, both eyes of a patient graded together: by the fusion head
that ``dr-fuse`` stored in the checkpoint, or else by blending each eye's outputs with its
partner's; kappa each eye alone, blended and fused are all reported (the loss is each eye
alone's). Screening figures: referable DR (grade >= 2, score p2+p3+p4) ROC-AUC, with
sensitivity and specificity at the operating point stored in the checkpoint (chosen on
val by the trainer, or by dr-fuse for the fused scores), and any-DR (grade >= 1) ROC-AUC.
It evaluates the way the trainer does (same batch size, precision, loader and loss
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
from pipeline.loading.contract import Loader
from pipeline.loading.loader import build_loader
from pipeline.manifest import read_manifest
from trainer.checkpoint import head_of, load_best
from trainer.config import BACKENDS
from trainer.engine import class_weights_for, evaluate, resolve_precision
from trainer.fusion import FUSION_KEY, fused_result
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
        "both eyes of a patient: the fusion head stored by dr-fuse if the checkpoint has "
        "one, else each eye's outputs blended with its partner's (the weight chosen on "
        "val); reports kappa with and without, and writes the paired predictions",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_config(
        EvalConfig, argv, prog="trainer/evaluate.py", description=__doc__.splitlines()[0]
    )
    model, info = load_best(args.checkpoint)
    cfg = info.get("config", {})
    accelerator = checkpoint_accelerator(info)
    manifest = read_manifest(args.shards)
    expected = manifest.split(args.split).samples
    gpu = accelerator.device.type == "cuda"
    loader = checkpoint_loader(
        info, args.shards, args.split, accelerator, args.batch_size, args.backend, args.workers
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
    fusion = info.get(FUSION_KEY) if args.pair_eyes else None
    alone = evaluate(
        model,
        loader,
        accelerator,
        head,
        class_weights,
        expected=expected,
        cuts=cuts,
        with_features=fusion is not None,
    )
    loader.close()
    blend = info.get("pair_blend") or 0.0
    blended = alone.paired(blend, info.get("pair_cut_points"))
    fused = fused_result(fusion, alone) if fusion else None
    result = (blended if fused is None else fused) if args.pair_eyes else alone
    positive, score = result.labels >= REFERABLE_GRADE, referable_score(result.probs)
    threshold, threshold_from = info.get("referable_threshold"), "the checkpoint (chosen on val)"
    if fused is not None:
        threshold, threshold_from = fusion["referable_threshold"], "the fusion head (chosen on val)"
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
        "qwk_both_eyes": blended.kappa,  # the blend
        "qwk_fused": None if fused is None else fused.kappa,
        "pair_blend": blend,
        "paired": args.pair_eyes,
        "pair_method": ("blend" if fused is None else "fusion") if args.pair_eyes else None,
        "head": head.name,
        "cut_points": cuts,
        "recall": result.recall,
        "confusion": result.confusion.tolist(),
        **screen,
        "referable_threshold": threshold,
        "referable_threshold_from": threshold_from,
        "world_size": accelerator.num_processes,
        "backend": loader.backend,
    }
    recall = " / ".join(f"{r:.2f}" for r in result.recall)
    accelerator.print(
        f"{info['arch']} epoch {info.get('epoch')} on {args.split} ({result.samples} images): "
        f"accuracy {100 * result.accuracy:.2f} %, kappa {result.kappa:.4f}, loss {result.loss:.4f}, "
        f"recall 0-4 {recall}"
    )
    if args.pair_eyes:
        accelerator.print(
            (
                f"both eyes fused (dr-fuse's head): kappa {fused.kappa:.4f}; "
                if fused is not None
                else ""
            )
            + f"both eyes blended (partner weight {blend:.2f}, chosen on val): kappa "
            f"{blended.kappa:.4f}; each eye alone: kappa {alone.kappa:.4f}"
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
        write_predictions(result.predictions(), out / PREDICTIONS_FILE)
        curves = {
            "referable DR (>= 2)": (positive, score),
            "any DR (>= 1)": (result.labels >= 1, any_dr_score(result.probs)),
        }
        plot_roc(curves, threshold, out / ROC_FILE, title=f"{info['arch']} on {args.split}")
        accelerator.print(
            f"wrote {out / 'metrics.json'}, {PREDICTIONS_FILE}, {ROC_FILE} and "
            f"confusion_{args.split}.csv/.png"
        )
    accelerator.end_training()
    return 0


def checkpoint_accelerator(info: dict) -> Accelerator:
    """An Accelerator with the checkpoint's precision (the trainer's), every GPU or the CPU."""
    cuda = torch.cuda.is_available()
    precision = (info.get("config") or {}).get("precision", "auto")
    return Accelerator(cpu=not cuda, mixed_precision=resolve_precision(precision, cuda))


def checkpoint_loader(
    info: dict,
    shards: Path,
    split: str,
    accelerator: Accelerator,
    batch_size: int | None = None,
    backend: str | None = None,
    workers: int | None = None,
) -> Loader:
    """This rank's evaluation loader (with keys) of ``split``, as the trainer built it: the
    checkpoint's batch size, image size, seed and backend unless given."""
    cfg = info.get("config") or {}
    batch_size = batch_size or cfg.get("batch_size", 8)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    return build_loader(
        shards,
        split,
        train=False,
        batch_size=batch_size,
        image_size=int(info["image_size"]),
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=cfg.get("seed", 0),
        backend=backend or cfg.get("backend", "auto"),
        device=accelerator.device,
        workers=workers,
        channels_last=accelerator.device.type == "cuda",
        with_keys=True,
    )


def write_predictions(table: pd.DataFrame, path: Path) -> None:
    """One row per image; 8 decimals keep the scores' ranking (and so the AUC) as computed."""
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.8f"))


def cli() -> None:
    """The ``dr-evaluate`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
