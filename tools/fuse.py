"""Both eyes by feature fusion: train a second-stage head on a trained checkpoint's features.

    dr-fuse --checkpoint runs/r50/best.pt --shards shards
    accelerate launch --multi_gpu --num_processes 4 tools/fuse.py --checkpoint ... --shards ...

Extracts the backbone features of every train, val and test image once (the trainer's
evaluation path: no augmentation, every image exactly once over all processes), trains the
fusion head of trainer/judging/fusion.py on [own eye, partner eye] features of the train split,
chooses its epoch (and, for the regress head, its cut-points) on val, and stores it in the
checkpoint under "fusion", so that ``evaluate.py --pair-eyes`` and ``predict.py
--pair-eyes`` use it. Prints, for val and test, kappa each eye alone, both eyes blended
(the trainer's choice) and fused; with --out also writes them to ``OUT/fusion.json``.
Running it again replaces the stored head.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cli import arg, parse_config, run_cli
from pipeline.errors import UserError
from pipeline.fileio import atomic_write_json, check_out_folder, folder_lock
from pipeline.manifest import read_manifest
from pipeline.remote import CACHE_HELP, local_shards
from trainer.base.runfiles import FUSION_FILE
from trainer.fitting.config import BACKENDS
from trainer.judging.options import FUSION_KEY, HIDDEN

# torch and the modules that import it load in main, after the command line is parsed
if TYPE_CHECKING:
    from trainer.base.decisions import Decisions
    from trainer.judging.evaluation import EvalResult


@dataclass
class FuseConfig:
    checkpoint: Path = arg(help="best.pt written by trainer/train.py (rewritten)", metavar="FILE")
    shards: str = arg(
        help="the shard folder it was trained on (or an s3://, gs://, http(s):// URL of it)",
        metavar="DIR",
    )
    cache: str | None = arg(None, CACHE_HELP, metavar="DIR")
    epochs: int = arg(30, "epochs of the fusion head")
    lr: float = arg(0.01, "its learning rate (SGD, Nesterov momentum 0.9, clipped at norm 1)")
    batch_size: int = arg(64, "its batch size (pairs of feature vectors)")
    hidden: int = arg(HIDDEN, "its hidden width")
    weight_decay: float = arg(5e-4, "its weight decay")
    seed: int = arg(0, "seed of its initialisation and order")
    eval_batch_size: int | None = arg(
        None, "images per forward pass when extracting features (default: the checkpoint's)"
    )
    backend: str | None = arg(None, "loader backend (default: the checkpoint's)", choices=BACKENDS)
    workers: int | None = arg(None, "loader workers per process")
    out: Path | None = arg(None, f"also write {FUSION_FILE} into this folder", metavar="DIR")

    def __post_init__(self):
        for name in ("epochs", "batch_size", "hidden"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")


def main(argv: list[str] | None = None) -> int:
    args = parse_config(FuseConfig, argv, prog="fuse.py", description=__doc__.splitlines()[0])
    with ExitStack() as held:  # the folders it writes into: best.pt's and --out
        if int(os.environ.get("RANK", "0")) == 0:
            folders = {Path(args.checkpoint).resolve().parent}
            if args.out:
                folders.add(check_out_folder(args.out).resolve())
            for folder in sorted(folders):
                folder.mkdir(parents=True, exist_ok=True)
                held.enter_context(folder_lock(folder, "fuse"))
        return fuse(args)


def fuse(args: FuseConfig) -> int:
    from trainer.base.bestfile import add_to_best, open_best
    from trainer.judging.evaluation import checkpoint_accelerator, evaluate_best
    from trainer.judging.fusion import FusionSettings, has_pairs, train_fusion

    best = open_best(args.checkpoint)
    info = best.info
    accelerator = checkpoint_accelerator(info)
    args.shards = local_shards(args.shards, args.cache)
    manifest = read_manifest(args.shards)
    for split in ("train", "val"):
        if not manifest.has(split):
            raise UserError(
                f"{args.shards} has no {split} split: the fusion head trains on train and "
                "chooses on val"
            )
    model = accelerator.prepare(best.model.to(accelerator.device))
    splits = [s for s in ("train", "val", "test") if manifest.has(s)]
    options = {"batch_size": args.eval_batch_size, "backend": args.backend, "workers": args.workers}
    results = {}
    for split in splits:
        results[split], _ = evaluate_best(
            best,
            model,
            accelerator,
            args.shards,
            split,
            expected=manifest.split(split).samples,
            loader_options=options,
            with_features=True,
        )
        accelerator.print(f"features of {split}: {results[split].features.shape}")
    if not has_pairs(results["train"].keys):
        raise UserError(
            "no patient has both eyes in the train split (keys like 10_left / 10_right): "
            "there is nothing to fuse"
        )
    settings = FusionSettings(
        args.epochs, args.lr, args.batch_size, args.hidden, args.weight_decay, args.seed
    )
    fusion = train_fusion(results["train"], results["val"], best.head, settings)
    kappa = {
        split: kappas(best.decisions, fusion, results[split])
        for split in splits
        if split != "train"
    }
    fusion |= {"kappa": kappa, "settings": asdict(settings)}
    accelerator.print(
        f"fusion head: epoch {fusion['epoch']} of {args.epochs} chosen by {fusion['selected_by']}"
    )
    for split, k in kappa.items():
        accelerator.print(
            f"{split}: kappa each eye alone {k['eye_alone']:.4f}, both eyes blended "
            f"{k['blend']:.4f}, both eyes fused {k['fused']:.4f}"
        )
    if accelerator.is_main_process:
        add_to_best(args.checkpoint, FUSION_KEY, fusion)
        accelerator.print(f"stored the fusion head in {args.checkpoint}")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            report = {k: v for k, v in fusion.items() if k != "state"}
            atomic_write_json(args.out / FUSION_FILE, report | {"checkpoint": str(args.checkpoint)})
    accelerator.end_training()
    return 0


def kappas(decisions: Decisions, fusion: dict, alone: EvalResult) -> dict[str, float]:
    """A split's kappa each eye alone, blended (the trainer's weight and cut-points) and fused."""
    from trainer.judging.fusion import fused_result

    return {
        "eye_alone": alone.kappa,
        "blend": alone.both_eyes(decisions).kappa,
        "fused": fused_result(fusion, alone).kappa,
    }


def cli() -> None:
    """The ``dr-fuse`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
