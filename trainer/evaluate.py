"""Evaluate a trained checkpoint on a split of a shard folder.

    python trainer/evaluate.py --checkpoint runs/resnet18/best.pt --shards shards --out runs/resnet18/eval
    accelerate launch --multi_gpu --num_processes 4 trainer/evaluate.py --checkpoint ... --shards ...

Accuracy, quadratic weighted kappa, per-class recall, loss and the confusion matrix
(CSV + PNG), over every sample of the split exactly once, on 1..N processes; with --out,
also ``predictions.csv``: one row per image (key, patient, eye, true, pred, p0..p4), the
file to open to see which photographs were graded wrong. It
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
from trainer.checkpoint import load_best
from trainer.config import BACKENDS
from trainer.engine import class_weights_for, evaluate, resolve_precision
from trainer.metrics import plot_confusion, write_confusion_csv

PREDICTIONS_FILE = "predictions.csv"


@dataclass
class EvalConfig:
    checkpoint: Path = arg(help="best.pt written by trainer/train.py", metavar="FILE")
    shards: Path = arg(help="shard folder", metavar="DIR")
    split: str = arg("test", "split to evaluate")
    out: Path | None = arg(
        None, "write metrics.json and the confusion matrix into this folder", metavar="DIR"
    )
    batch_size: int | None = arg(None, "per process (default: the checkpoint's)")
    backend: str | None = arg(None, "loader backend (default: the checkpoint's)", choices=BACKENDS)
    workers: int | None = arg(None, "loader workers per process")


def main(argv: list[str] | None = None) -> int:
    args = parse_config(
        EvalConfig, argv, prog="trainer/evaluate.py", description=__doc__.splitlines()[0]
    )
    model, info = load_best(args.checkpoint)
    cfg = info.get("config", {})
    batch_size = args.batch_size or cfg.get("batch_size", 8)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
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

    result = evaluate(model, loader, accelerator, class_weights, expected=expected)
    loader.close()
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
        "recall": result.recall,
        "confusion": result.confusion.tolist(),
        "world_size": accelerator.num_processes,
        "backend": loader.backend,
    }
    recall = " / ".join(f"{r:.2f}" for r in result.recall)
    accelerator.print(
        f"{info['arch']} epoch {info.get('epoch')} on {args.split} ({result.samples} images): "
        f"accuracy {100 * result.accuracy:.2f} %, kappa {result.kappa:.4f}, loss {result.loss:.4f}, "
        f"recall 0-4 {recall}"
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
        accelerator.print(
            f"wrote {out / 'metrics.json'}, {PREDICTIONS_FILE} and confusion_{args.split}.csv/.png"
        )
    accelerator.end_training()
    return 0


def write_predictions(table: pd.DataFrame, path: Path) -> None:
    """One row per image, probabilities to 6 decimals (enough to compare with predict.py)."""
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))


def cli() -> None:
    """The ``dr-evaluate`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
