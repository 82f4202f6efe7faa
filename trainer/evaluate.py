"""Evaluate a trained checkpoint on a split of a shard folder.

    python trainer/evaluate.py --checkpoint runs/resnet18/best.pt --shards shards --out runs/resnet18/eval
    accelerate launch --multi_gpu --num_processes 4 trainer/evaluate.py --checkpoint ... --shards ...
    python trainer/evaluate.py --checkpoint best.pt --shards messidor2 aptos idrid --out external/

Accuracy, quadratic weighted kappa, per-class recall, loss and the confusion matrix
(CSV + PNG), over every sample of the split exactly once, on 1..N processes; with --out,
also ``predictions.csv``: one row per image (key, original path, patient, eye, true, pred, p0..p4,
referable_score), the file to open to see which photographs were graded wrong, and
``roc.png``. With --pair-eyes, both eyes of a patient graded together: by the fusion head
that ``dr-fuse`` stored in the checkpoint, or else by blending each eye's outputs with its
partner's; kappa each eye alone, blended and fused are all reported (the loss is each eye
alone's). Screening figures: referable DR (grade >= 2, score p2+p3+p4) ROC-AUC, with
sensitivity and specificity at the operating point stored in the checkpoint (chosen on
val by the trainer, or by dr-fuse for the fused scores), and any-DR (grade >= 1) ROC-AUC.
Probabilities are calibrated with the checkpoint's temperature (classify and ordinal heads);
``ece_raw`` and ``ece`` are the expected calibration error before and after it,
``reliability.png`` draws both; ``figures.md`` gives beside each figure its key numbers and
which outputs it draws (``metrics.json``'s ``outputs``: each eye alone, both eyes blended
w=..., fused). With ``--explain N``, ``cam/<key>.png`` shows where the model
looked (trainer/judging/explain.py) in the N most confidently wrong photographs (largest grade
distance first). It evaluates the way the trainer does (same batch size, precision, loader and loss
weighting, read from the checkpoint), so on the trainer's test split it reproduces the
numbers logged for that epoch. ``--split all`` evaluates every image of the folder (its
splits together). Several folders (``--shards A B C``) are evaluated in turn, each into its
own subfolder of --out, and summed up in one table, a row per dataset (``external.csv``,
``external.md``) with one ROC figure (``trainer/judging/external.py``). A folder whose images were
prepared otherwise than the checkpoint's training images (Graham, border crop, stored
size: manifest.json against best.pt) stops the run, unless --allow-preprocessing-mismatch.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cli import arg, parse_config, run_cli
from pipeline.constants import SPLITS
from pipeline.errors import UserError
from pipeline.fileio import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    check_out_folder,
    folder_lock,
    inside,
    safe_cell,
    staged_outputs,
)
from pipeline.manifest import Manifest, read_manifest
from pipeline.remote import CACHE_HELP, local_shards
from pipeline.samplelist import read_sample_table
from trainer.base.metrics import (
    REFERABLE_GRADE,
    any_dr_score,
    operating_threshold,
    plot_confusion,
    plot_roc,
    referable_score,
    screening,
    write_confusion_csv,
)
from trainer.base.preprocessing import check_preprocessing
from trainer.base.runfiles import PREDICTIONS_FILE
from trainer.fitting.config import BACKENDS
from trainer.judging.options import CAM_DIR, FUSION_KEY

# torch, Accelerate, pandas and the modules that import them load inside the functions that
# use them, after the command line is parsed: --help and option errors are answered at once
if TYPE_CHECKING:
    import pandas as pd
    from accelerate import Accelerator

    from trainer.base.bestfile import Best
    from trainer.judging.evaluation import EvalResult

METRICS_FILE = "metrics.json"
ROC_FILE = "roc.png"
RELIABILITY_FILE = "reliability.png"
FIGURES_FILE = "figures.md"


@dataclass
class EvalConfig:
    checkpoint: Path = arg(help="best.pt written by trainer/train.py", metavar="FILE")
    shards: list[str] = arg(
        help="shard folder (or s3://, gs://, http(s):// URL of one); several: one table row "
        "per folder (external validation)",
        metavar="DIR",
    )
    cache: str | None = arg(None, CACHE_HELP, metavar="DIR")
    split: str = arg(
        "test",
        "split to evaluate: train, val, test, or all (every image of the folder)",
        choices=(*SPLITS, "all"),
    )
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
    tta: bool = arg(
        False,
        "test-time augmentation: average each image's outputs over its eight flips and "
        "90-degree rotations (the stored cut-points and operating point are used as they are)",
    )
    allow_preprocessing_mismatch: bool = arg(
        False, "evaluate shards prepared otherwise than the training images (with a warning)"
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
    with ExitStack() as held:  # --out's lock, released however the run ends
        if args.out and int(os.environ.get("RANK", "0")) == 0:  # the writing process
            check_out_folder(args.out).mkdir(parents=True, exist_ok=True)
            held.enter_context(folder_lock(args.out, "evaluate"))
        return evaluate_all(args)


def evaluate_all(args: EvalConfig) -> int:
    """Every folder of --shards through best.pt, each into its part of --out."""
    import torch

    from trainer.base.bestfile import open_best
    from trainer.base.distributed import cudnn_settings
    from trainer.judging.evaluation import checkpoint_accelerator
    from trainer.judging.external import (
        ROC_FIGURE,
        TABLE_CSV,
        TABLE_MD,
        dataset_names,
        external_row,
        markdown,
        plot_external_roc,
        write_tables,
    )

    best = open_best(args.checkpoint)
    model, info = best.model, best.info
    cfg = info.get("config", {})
    batch_size = args.batch_size or cfg.get("batch_size", 8)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if args.explain and not args.out:
        raise UserError("--explain writes pictures: give --out DIR too")
    if args.explain and args.split == "all":
        raise UserError(
            "--explain reads the photographs of one split: give --split train, val or test"
        )
    args.shards = [local_shards(folder, args.cache) for folder in args.shards]
    if len({Path(folder).resolve() for folder in args.shards}) < len(args.shards):
        raise UserError("--shards names the same folder twice")
    manifests = [read_manifest(folder) for folder in args.shards]  # all checked before any runs
    for manifest in manifests:
        check_preprocessing(
            info.get("preprocess") or {},
            {"size": manifest.image_size, **manifest.preprocess},
            str(args.checkpoint),
            f"{manifest.root} (its manifest.json)",
            allow=args.allow_preprocessing_mismatch,
        )
        for split in splits_of(manifest, args.split):
            manifest.split(split)  # a missing split: one line, before any evaluation
    accelerator = checkpoint_accelerator(info)
    gpu = accelerator.device.type == "cuda"
    cudnn_settings(gpu, info.get("config", {}).get("deterministic", False))  # as trained
    model = model.to(accelerator.device)
    if gpu:
        model = model.to(memory_format=torch.channels_last)
    model = accelerator.prepare(model)

    several = len(manifests) > 1
    names = dataset_names(args.shards)
    rows, results = [], {}
    for manifest, name in zip(manifests, names, strict=True):
        if several:
            accelerator.print(f"{name} ({manifest.root}):")
        # a dataset's name is its folder's: "--shards .." must not name a folder outside --out
        out = (inside(args.out, name) if several else args.out) if args.out else None
        metrics, result = evaluate_folder(model, best, accelerator, manifest, args, batch_size, out)
        rows.append(external_row(name, manifest.root, args.split, metrics))
        results[name] = result
    if several:
        threshold, threshold_from = (
            best.decisions.referable_threshold,
            "the checkpoint (chosen on val)",
        )
        if threshold is None:
            threshold_from = "each dataset itself (the checkpoint stores none)"
        accelerator.print(markdown(rows, threshold, threshold_from))
        if args.out and accelerator.is_main_process:
            write_tables(rows, Path(args.out), threshold, threshold_from)
            plot_external_roc(
                results,
                threshold,
                Path(args.out) / ROC_FIGURE,
                title=f"{info['arch']} epoch {info.get('epoch')}: referable DR, {args.split} split",
            )
            accelerator.print(f"wrote {args.out}/{TABLE_CSV}, {TABLE_MD} and {ROC_FIGURE}")
    accelerator.end_training()
    return 0


def splits_of(manifest: Manifest, split: str) -> list[str]:
    """``split``, or with ``all`` every split the folder holds."""
    return [s for s in SPLITS if manifest.has(s)] if split == "all" else [split]


def evaluate_folder(
    model,
    best: Best,
    accelerator: Accelerator,
    manifest: Manifest,
    args: EvalConfig,
    batch_size: int,
    out: Path | None,
) -> tuple[dict, EvalResult]:
    """One folder's split (or all of its splits): printed, and written into ``out``."""
    from trainer.fitting.engine import class_weights_for
    from trainer.judging.calibration import ece_figures
    from trainer.judging.captions import outputs_label
    from trainer.judging.evaluation import evaluate_best
    from trainer.judging.external import combined
    from trainer.judging.fusion import fused_result

    info, decisions = best.info, best.decisions
    cfg = info.get("config", {})
    # the trainer's test loss is weighted as its training loss was, by the train split's counts
    weights_mode = cfg.get("class_weights", "none")
    train_counts = manifest.splits["train"].class_counts if manifest.has("train") else None
    class_weights = (
        class_weights_for(train_counts, weights_mode, accelerator.device) if train_counts else None
    )
    fusion = info.get(FUSION_KEY) if args.pair_eyes else None
    options = {"batch_size": batch_size, "backend": args.backend, "workers": args.workers}
    parts, backend = [], None
    for split in splits_of(manifest, args.split):
        part, backend = evaluate_best(
            best,
            model,
            accelerator,
            manifest.root,
            split,
            expected=manifest.split(split).samples,
            class_weights=class_weights,
            loader_options=options,
            with_features=fusion is not None,
            tta=args.tta,
        )
        parts.append(part)
    alone = combined(parts)
    expected = sum(manifest.split(split).samples for split in splits_of(manifest, args.split))
    if alone.samples != expected or len(set(alone.keys)) != expected:
        raise RuntimeError(
            f"evaluated {alone.samples} images ({len(set(alone.keys))} distinct) of "
            f"{manifest.root}, whose manifest lists {expected}"
        )
    blended = alone.both_eyes(decisions)
    fused = fused_result(fusion, alone) if fusion else None
    method = ("blend" if fused is None else "fused") if args.pair_eyes else "alone"
    result = {"alone": alone, "blend": blended, "fused": fused}[method]
    positive, score = result.labels >= REFERABLE_GRADE, referable_score(result.probs)
    threshold, threshold_from = decisions.referable_threshold, "the checkpoint (chosen on val)"
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
        "shards": str(manifest.root),
        "split": args.split,
        "samples": result.samples,
        "loss": result.loss,
        "accuracy": result.accuracy,
        "qwk": result.kappa,
        "qwk_eye_alone": alone.kappa,
        "qwk_both_eyes": blended.kappa,  # the blend
        "qwk_fused": None if fused is None else fused.kappa,
        "pair_blend": decisions.pair_blend,
        "paired": args.pair_eyes,
        "tta": args.tta,
        "pair_method": ("blend" if fused is None else "fusion") if args.pair_eyes else None,
        "outputs": outputs_label(method, decisions),  # what every figure and headline shows
        "head": best.head.name,
        "cut_points": decisions.to_dict()["cut_points"],  # each eye alone's
        "pair_cut_points": decisions.to_dict()["pair_cut_points"],  # blended (None: the same)
        "recall": result.recall,
        "confusion": result.confusion.tolist(),
        **screen,
        "referable_threshold": threshold,
        "referable_threshold_from": threshold_from,
        "temperature": alone.temperature,
        **ece_figures(result),
        "world_size": accelerator.num_processes,
        "backend": backend,
    }
    report(accelerator, info, args, metrics, alone, result)
    if out and accelerator.is_main_process:
        # assembled beside and moved in at the end: an interrupted run leaves the previous
        # outputs or none, never a new metrics.json beside an old predictions.csv
        Path(out).mkdir(parents=True, exist_ok=True)
        with staged_outputs(out, last=METRICS_FILE) as stage:
            write_folder(
                stage, info, args.split, metrics, result, positive, score, threshold, manifest.root
            )
            if args.explain > 0:
                explain_wrong(
                    model, info, accelerator, result, manifest.root, args.split, args.explain, stage
                )
        accelerator.print(
            f"wrote {out / 'metrics.json'}, {PREDICTIONS_FILE}, {ROC_FILE}, {RELIABILITY_FILE}, "
            f"{FIGURES_FILE} and confusion_{args.split}.csv/.png"
        )
    return metrics, result


def report(accelerator, info, args, metrics, alone: EvalResult, result: EvalResult) -> None:
    """The figures, printed as lines."""
    recall = " / ".join(f"{r:.2f}" for r in result.recall)
    accelerator.print(
        f"{info['arch']} epoch {info.get('epoch')} on {args.split} ({result.samples} images, "
        f"{metrics['outputs']}): "
        f"accuracy {100 * result.accuracy:.2f} %, kappa {result.kappa:.4f}, loss {result.loss:.4f}, "
        f"recall 0-4 {recall}"
    )
    accelerator.print(
        f"calibration: ECE {metrics['ece_raw']:.4f} before, {metrics['ece']:.4f} after "
        + (f"temperature {result.temperature:.3f}" if result.temperature else "(no temperature)")
    )
    if args.pair_eyes:
        accelerator.print(
            (
                f"both eyes fused (dr-fuse's head): kappa {metrics['qwk_fused']:.4f}; "
                if metrics["qwk_fused"] is not None
                else ""
            )
            + f"both eyes blended (partner weight {metrics['pair_blend']:.2f}, chosen on val): "
            f"kappa {metrics['qwk_both_eyes']:.4f}; each eye alone: kappa {alone.kappa:.4f}"
        )
    threshold = metrics["referable_threshold"]
    if metrics["referable_auc"] is not None:
        accelerator.print(
            f"referable DR (grade >= 2): AUC {metrics['referable_auc']:.4f}"
            + (
                f", sensitivity {metrics['sensitivity']:.3f} and specificity "
                f"{metrics['specificity']:.3f} at threshold {threshold:.4f} from "
                f"{metrics['referable_threshold_from']}"
                if threshold is not None
                else ""
            )
            + (
                f"; any DR AUC {metrics['any_dr_auc']:.4f}"
                if metrics["any_dr_auc"] is not None
                else ""
            )
        )


def write_folder(
    out: Path, info, split: str, metrics, result, positive, score, threshold, shards: Path
) -> None:
    """metrics.json, the confusion matrix (CSV, PNG), predictions.csv (with the original paths
    of ``shards``' samples.csv), roc.png and reliability.png, and figures.md: the text
    beside each figure (its key numbers, the outputs it draws)."""
    from trainer.judging.calibration import plot_reliability, reliability_curves
    from trainer.judging.captions import reliability_caption, roc_caption

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{info['arch']} on {split}: {metrics['outputs']}"  # which outputs each figure shows
    atomic_write_json(out / METRICS_FILE, metrics)
    write_confusion_csv(result.confusion, out / f"confusion_{split}.csv")
    plot_confusion(
        result.confusion,
        out / f"confusion_{split}.png",
        title=f"{title}; accuracy {100 * result.accuracy:.1f} %, kappa {result.kappa:.3f}",
    )
    write_predictions(with_originals(result.predictions(), shards), out / PREDICTIONS_FILE)
    curves = {
        "referable DR (>= 2)": (positive, score),
        "any DR (>= 1)": (result.labels >= 1, any_dr_score(result.probs)),
    }
    plot_roc(curves, threshold, out / ROC_FILE, title=title)
    plot_reliability(reliability_curves(result), out / RELIABILITY_FILE, title=title)
    captions = {
        ROC_FILE: roc_caption(result, threshold, metrics["outputs"]),
        RELIABILITY_FILE: reliability_caption(split, result),
    }
    text = "".join(f"![{name}]({name})\n\n{caption}\n\n" for name, caption in captions.items())
    atomic_write_text(out / FIGURES_FILE, text)


def explain_wrong(model, info, accelerator, result: EvalResult, shards: Path, split, n, out):
    """``out/cam/<key>.png`` for the ``n`` most confidently wrong photographs."""
    from trainer.base.distributed import bare
    from trainer.judging.explain import rank_wrong, write_overlays

    table = result.predictions()
    chosen = table.iloc[rank_wrong(table)[:n]]
    explained = write_overlays(
        bare(accelerator, model), info, shards, split, chosen, out / CAM_DIR, accelerator.device
    )
    accelerator.print(f"wrote {len(explained)} class-activation overlays")


def with_originals(table: pd.DataFrame, shards: Path) -> pd.DataFrame:
    """Each image's patient and original path as the shard folder's samples.csv lists them
    (a patient column of the labels, not only 10_left/10_right); unchanged without one."""
    samples = read_sample_table(shards)
    if samples is None:
        return table
    known = [samples.get(k) for k in table["key"]]
    table["patient"] = [r.patient if r else p for r, p in zip(known, table["patient"], strict=True)]
    table.insert(1, "path", [r.path if r else "" for r in known])
    return table


def write_predictions(table: pd.DataFrame, path: Path) -> None:
    """One row per image; 9 significant digits give back each float32 score exactly (its
    ranking, the AUC, and which side of the threshold it falls on); the cells from the
    user's files (keys, paths, patients) formula-safe."""
    table = table.map(safe_cell)
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.9g"))


def cli() -> None:
    """The ``dr-evaluate`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
