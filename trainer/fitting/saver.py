"""What a run writes as it goes: a saver built once with the objects a checkpoint holds,
saving each epoch with ``(row, confusions, best)`` and restoring them on --resume (as timm's
CheckpointSaver is built once and saves with ``(epoch, metric)``); and the summary at the end.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.optim.lr_scheduler import LRScheduler

from pipeline.fileio import atomic_write_json, reporting_disk_full
from trainer.base.bestfile import BEST_FILE
from trainer.base.distributed import bare
from trainer.base.metrics import plot_confusion, write_confusion_csv
from trainer.base.normalize import normalization_for
from trainer.base.runfiles import CONFUSION_DIR, SUMMARY_FILE, append_metrics, read_metrics
from trainer.fitting.checkpoint import (
    repair_best,
    rng_state,
    save_best,
    save_last,
    set_rng_state,
)
from trainer.fitting.config import TrainConfig
from trainer.fitting.ema import EMA
from trainer.fitting.engine import TrainResult, seek_schedule
from trainer.fitting.resume import restore_metrics


class CheckpointSaver:
    """The run's checkpoints: ``save`` after each epoch, ``restore`` once on --resume."""

    def __init__(
        self,
        accelerator: Accelerator,
        cfg: TrainConfig,
        out: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler,
        ema: EMA | None,
        preprocess: dict,
    ):
        self.accelerator, self.cfg, self.out = accelerator, cfg, out
        self.model, self.optimizer, self.scheduler, self.ema = model, optimizer, scheduler, ema
        self.preprocess = preprocess

    def save(
        self,
        row: dict,
        confusions: dict[str, np.ndarray],
        evaluated: torch.nn.Module,
        best: dict,
        is_best: bool,
    ) -> None:
        """Rank 0 writes the epoch's files: the confusion matrix, the checkpoint, best.pt, and
        last the metrics line, so that a line never exists without its checkpoint."""
        accelerator, out, cfg, preprocess = self.accelerator, self.out, self.cfg, self.preprocess
        rngs = gather_object([rng_state()])  # a collective: every rank takes part
        if not accelerator.is_main_process:
            return
        folder = out / CONFUSION_DIR
        folder.mkdir(exist_ok=True)
        for split, confusion in confusions.items():
            name = folder / f"{split}_epoch_{row['epoch']:03d}"
            with reporting_disk_full(name.with_suffix(".csv")):
                write_confusion_csv(confusion, name.with_suffix(".csv"))
            with reporting_disk_full(name.with_suffix(".png")):
                title = (
                    f"{cfg.arch} epoch {row['epoch']}, {split}: accuracy {100 * row[f'{split}_acc']:.1f} %, "
                    f"kappa {row[f'{split}_qwk']:.3f}"
                )
                plot_confusion(confusion, name.with_suffix(".png"), title=title)
        augment = asdict(cfg.augment_config())
        save_last(out, self._state(row["epoch"], row, best, rngs))
        if is_best:
            save_best(
                out / BEST_FILE,
                bare(accelerator, evaluated).state_dict(),  # the EMA's weights with --ema
                arch=cfg.arch,
                image_size=cfg.image_size,
                epoch=row["epoch"],
                metrics=row,
                config=cfg.to_dict(),
                preprocess=preprocess,
                augment=augment,
                head=cfg.head,
                normalize=normalization_for(cfg.normalize, cfg.shards),
            )
        append_metrics(out, row)

    def save_position(
        self, epochs_done: int, train: TrainResult, last_row: dict | None, best: dict | None
    ) -> None:
        """checkpoints/last/ inside an epoch (preemption): ``epochs_done`` whole epochs and
        ``train.stopped_after`` steps more, with every rank's sums so far; no metrics line and
        no best.pt, the epoch is not over."""
        rngs = gather_object([rng_state()])
        partial = gather_object([train.partial])  # collectives: every rank takes part
        if self.accelerator.is_main_process:
            state = self._state(epochs_done, last_row, best, rngs)
            save_last(self.out, state | {"step": train.stopped_after, "partial": partial})

    def _state(self, epoch: int, row: dict | None, best: dict | None, rngs: list) -> dict:
        """What checkpoints/last/ holds after ``epoch`` whole epochs."""
        accelerator, cfg = self.accelerator, self.cfg
        state = {
            "epoch": epoch,
            "row": row,
            "model": bare(accelerator, self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best": best,
            "rng": rngs,
            "world_size": accelerator.num_processes,
            "config": cfg.to_dict(),
            "preprocess": self.preprocess,
            "augment": asdict(cfg.augment_config()),
        }
        if accelerator.scaler is not None:
            state["scaler"] = accelerator.scaler.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def restore(self, state: dict, steps_per_epoch: int) -> tuple[int, dict | None]:
        """Load last/ into the prepared objects; the epochs it completed and the best row so far."""
        accelerator, cfg, out = self.accelerator, self.cfg, self.out
        model, optimizer, scheduler, ema = self.model, self.optimizer, self.scheduler, self.ema
        bare(accelerator, model).load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and "scaler" in state:
            accelerator.scaler.load_state_dict(state["scaler"])
        # the schedule's position is a number of epochs, whatever the world size that wrote it
        # (and the steps of a stopped epoch, which only its own world size resumes)
        done = state["epoch"] * steps_per_epoch + state.get("step", 0) // cfg.grad_accumulation
        seek_schedule(optimizer, scheduler, done, cfg.lr)
        rngs, rank = state["rng"], accelerator.process_index
        if len(rngs) != accelerator.num_processes:
            accelerator.print(
                f"warning: resuming a run of {len(rngs)} process(es) on "
                f"{accelerator.num_processes}: it continues, but not bit for bit"
            )
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        if accelerator.is_main_process:
            restore_metrics(out, state)
            repair_best(out, state)
        inside = (
            f" and step {state['step']} of epoch {state['epoch'] + 1}" if state.get("step") else ""
        )
        accelerator.print(f"resuming {out} after epoch {state['epoch']}{inside} of {cfg.epochs}")
        return state["epoch"], state["best"]


def write_summary(
    out: Path,
    cfg: TrainConfig,
    env: dict,
    best: dict,
    checksums: list[str],
    chooser: str,
    warnings: list[str],
) -> None:
    rows = read_metrics(out)
    atomic_write_json(
        out / SUMMARY_FILE,
        {
            "arch": cfg.arch,
            "epochs": cfg.epochs,
            "chosen_on": chooser,
            "selected_by": best.get("selected_by", f"{chooser}_qwk"),
            "best_epoch": best["epoch"],
            "test_split": "test_qwk" in best,  # false: the shards had none, val alone is reported
            "test_at_best_epoch": {k[5:]: v for k, v in best.items() if k.startswith("test_")}
            or None,
            "best": best,
            "last": rows[-1],
            "world_size": env["world_size"],
            "backend": env["backend"],
            "device": env["device"],
            "weights_sha256_per_rank": checksums,
            "best_checkpoint": str(out / BEST_FILE),
            "warnings": warnings,  # why the run is useless (trainer/judging/sanity.py), if it is
        },
    )
