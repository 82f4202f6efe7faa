"""Train a ResNet diabetic-retinopathy grader on WebDataset shards, with Accelerate.

    accelerate launch trainer/train.py --arch resnet18            # every GPU here (no accelerate
                                                                  # config yet), else the CPU
    accelerate launch --config_file accelerate_config.yaml --num_processes 4 \\
        trainer/train.py --arch resnet50 --pretrained             # DDP + bf16 on 4 GPUs
    python trainer/train.py --arch resnet18 --image-size 128      # one process, no launcher
    accelerate launch trainer/train.py --arch resnet18 --smoke    # does training work here?
    accelerate launch --multi_gpu --num_processes 2 trainer/train.py ...   # 2 DDP ranks on a CPU
    accelerate launch --config_file accelerate_config.yaml --num_machines 2 --machine_rank R \\
        --main_process_ip HOST --main_process_port 29500 --num_processes 16 \\
        trainer/train.py --shards /shared/shards --out /shared/runs/r50   # 2 machines x 8 GPUs

Each epoch trains on the train split, evaluates the test split and writes into --out
(default ``runs/ARCH-YYYYmmdd-HHMMSS``): a line of ``metrics.jsonl`` (epoch, train_loss,
train_acc, test_loss, test_acc, test_qwk, test_recall[5], images_per_s, epoch_s, and lr
of the epoch's last step; accuracies as fractions), ``confusion/epoch_NNN.csv`` and
``.png`` (summed over ranks), ``checkpoints/last/`` (atomic) and ``best.pt`` (highest
test kappa). ``config.json`` (config + environment) is written at the start and
``summary.json`` at the end. Every rank computes; rank 0 writes. ``images_per_s``
counts the training images of all ranks per second of the training loop; ``epoch_s``
is training plus evaluation.

``--resume --out DIR`` continues from ``DIR/checkpoints/last/`` with the run's saved
config and ends in the state an uninterrupted run ends in; only --epochs, --lr,
--workers, --backend, --shards and --quiet may be given anew. A user error (no shards,
bad --weights, ...) is one line and exit 2, a run that fails (the loss diverged) one line
and exit 1; ``accelerate launch`` then adds its own traceback and exits 1 (for one
process ``accelerate launch --quiet`` keeps it to the line).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch.optim.lr_scheduler import LRScheduler

from pipeline.cli import run_cli
from pipeline.errors import UserError
from pipeline.fileio import atomic_write_json, reporting_disk_full
from pipeline.loading.contract import Loader
from pipeline.loading.loader import build_loader
from pipeline.manifest import read_manifest
from pipeline.verify import verify_shards
from trainer import smoke
from trainer.checkpoint import (
    BEST_FILE,
    last_dir,
    load_last,
    repair_best,
    rng_state,
    save_best,
    save_last,
    set_rng_state,
    state_checksum,
)
from trainer.config import TrainConfig, merge_for_resume, parse_args
from trainer.engine import (
    EvalResult,
    NonFiniteLossError,
    TrainResult,
    build_optimizer,
    build_scheduler,
    class_weights_for,
    evaluate,
    resolve_precision,
    seek_schedule,
    train_one_epoch,
)
from trainer.metrics import plot_confusion, write_confusion_csv
from trainer.model import build_model, imagenet_state_dict
from trainer.runfiles import (
    CONFIG_FILE,
    CONFUSION_DIR,
    METRICS_FILE,
    SUMMARY_FILE,
    append_metrics,
    read_metrics,
    truncate_metrics,
)

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")
HEADER = (
    f"{'epoch':>7} {'train loss':>10} {'train acc':>9} {'test loss':>9} {'test acc':>8} "
    f"{'kappa':>6} {'img/s':>8} {'time':>7} {'lr':>9}  recall 0-4"
)


def main(argv: list[str] | None = None) -> int:
    cfg, given = parse_args(argv)
    if cfg.smoke:
        cfg = smoke.smoke_config(cfg, given)
    if cfg.deterministic:
        make_deterministic()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=resolve_precision(cfg.precision, torch.cuda.is_available()),
    )
    out = choose_run_folder(cfg, accelerator)
    state = load_last(out) if cfg.resume else None
    if cfg.resume:
        cfg = merge_for_resume(state["config"] if state else saved_config(out), cfg, given)
        if state is None:
            accelerator.print(f"{out} has no complete epoch to resume from; starting at epoch 1")
    cfg.out = str(out)
    manifest = read_manifest(cfg.shards)
    if cfg.verify_shards:
        on_leader(accelerator, lambda: check_shards(cfg.shards))
    test_count = manifest.split("test").samples
    set_seed(cfg.seed)

    gpu = accelerator.device.type == "cuda"
    torch.backends.cudnn.benchmark = (
        gpu and not cfg.deterministic
    )  # autotuning picks kernels by timing
    train_loader, test_loader = build_loaders(cfg, accelerator, channels_last=gpu)
    model = build_model_on_every_rank(cfg, accelerator)
    if gpu:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    steps = len(train_loader)  # per rank: the schedule steps once per optimizer step
    scheduler = build_scheduler(
        optimizer, cfg.schedule, round(cfg.warmup_epochs * steps), cfg.epochs * steps
    )
    class_weights = class_weights_for(
        manifest.split("train").class_counts, cfg.class_weights, accelerator.device
    )
    model, optimizer = accelerator.prepare(model, optimizer)  # never the loaders

    env = environment(accelerator, train_loader.backend)
    accelerator.print(f"config: {json.dumps(cfg.to_dict())}\nenvironment: {json.dumps(env)}")
    start, best = 0, None
    if state:
        start, best = restore(state, cfg, accelerator, model, optimizer, scheduler, out, steps)
    if accelerator.is_main_process:
        atomic_write_json(
            out / CONFIG_FILE,
            {
                "config": cfg.to_dict(),
                "augment": asdict(cfg.augment_config()),
                "environment": env,
                "resumed_after_epoch": start if state else None,
            },
        )
    accelerator.print(HEADER)
    progress = EpochProgress(
        enabled=accelerator.is_main_process and not cfg.quiet and sys.stdout.isatty()
    )

    for epoch in range(start + 1, cfg.epochs + 1):
        begin = time.perf_counter()
        train_loader.set_epoch(epoch - 1)
        progress.start(f"epoch {epoch}/{cfg.epochs}", len(train_loader))
        try:
            train = train_one_epoch(
                model,
                train_loader,
                optimizer,
                scheduler,
                accelerator,
                class_weights,
                on_step=progress.advance,
            )
        except NonFiniteLossError as err:
            raise NonFiniteLossError(stopped_message(err, epoch, out)) from None
        finally:
            progress.stop()
        test = evaluate(model, test_loader, accelerator, class_weights, expected=test_count)
        row = metrics_row(epoch, train, test, time.perf_counter() - begin)
        accelerator.print(format_row(row, cfg.epochs))
        is_best = best is None or row["test_qwk"] > best["test_qwk"]
        best = row if is_best else best
        save_epoch(
            accelerator,
            out,
            cfg,
            model,
            optimizer,
            scheduler,
            row,
            test.confusion,
            best,
            is_best,
            preprocess=manifest.preprocess,
        )

    checksums = gather_object([state_checksum(accelerator.unwrap_model(model).state_dict())])
    if len(set(checksums)) > 1:
        raise RuntimeError(f"the ranks ended with different weights: {checksums}")
    if accelerator.is_main_process:
        write_summary(out, cfg, env, best, checksums)
    accelerator.print(
        f"best test kappa {best['test_qwk']:.4f} at epoch {best['epoch']}; run folder {out}"
    )
    train_loader.close()
    test_loader.close()
    if cfg.smoke:
        smoke.finish(accelerator, cfg, out, env)
    accelerator.end_training()
    return 0


# ---------------------------------------------------------------- set-up


def on_leader(accelerator: Accelerator, fn: Callable[[], T], local: bool = False) -> T | None:
    """Run ``fn`` on the main process (of each machine, if ``local``) and share its result.

    A UserError there is raised on every rank, so no rank waits for one that has left.
    """
    leader = accelerator.is_local_main_process if local else accelerator.is_main_process
    result = error = None
    if leader:
        try:
            result = fn()
        except UserError as err:
            error = str(err)
    errors = [e for e in gather_object([error]) if e]
    if errors:
        raise UserError(errors[0])
    return None if local else broadcast_object_list([result])[0]


def choose_run_folder(cfg: TrainConfig, accelerator: Accelerator) -> Path:
    """--out, or runs/ARCH-TIMESTAMP from rank 0's clock; a new run never appends to an old one."""

    def choose():
        default = f"runs/{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
        out = Path(cfg.out or (smoke.run_folder() if cfg.smoke else default))
        if not cfg.resume and ((out / METRICS_FILE).exists() or last_dir(out).exists()):
            raise UserError(
                f"{out} already holds a run; add --resume to continue it, or pick another --out"
            )
        if not cfg.resume:
            out.mkdir(parents=True, exist_ok=True)
        return str(out)

    if cfg.resume and not cfg.out:
        raise UserError("--resume needs --out DIR, the folder of the run to continue")
    return Path(on_leader(accelerator, choose))


def make_deterministic() -> None:
    """Kernels that give the same bits every run (cuBLAS needs its workspace fixed before CUDA
    starts); a kernel without such a version then raises instead of running."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def check_shards(shards: str) -> None:
    """--verify-shards: the full verification of ``make_shards --verify``, or a UserError."""
    report = verify_shards(shards)
    if report.problems:
        raise UserError(
            f"{len(report.problems)} problem(s) in {shards}, the first: {report.problems[0]}; "
            f"run tools/make_shards.py --verify {shards} for the list"
        )


def saved_config(out: Path) -> dict:
    """The config of a run that never finished an epoch (its config.json), for --resume."""
    try:
        return json.loads((out / CONFIG_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"nothing to resume: {out} holds no run (no checkpoint, no {CONFIG_FILE})"
        ) from None


def build_loaders(
    cfg: TrainConfig, accelerator: Accelerator, channels_last: bool
) -> tuple[Loader, Loader]:
    """This rank's train and test loaders: it reads its own slice (Accelerate shards neither)."""
    args = dict(
        batch_size=cfg.batch_size,
        image_size=cfg.image_size,
        seed=cfg.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        backend=cfg.backend,
        device=accelerator.device,
        workers=cfg.workers,
        channels_last=channels_last,
        mmap={"auto": None, "mmap": True, "read": False}[cfg.shard_io],
    )
    return (
        build_loader(cfg.shards, "train", train=True, augment=cfg.augment_config(), **args),
        build_loader(cfg.shards, "test", train=False, with_keys=True, **args),
    )


def build_model_on_every_rank(cfg: TrainConfig, accelerator: Accelerator) -> torch.nn.Module:
    """With --pretrained the first process of each machine fills the hub cache; then all build."""
    if cfg.pretrained:
        on_leader(
            accelerator, lambda: imagenet_state_dict(cfg.arch, progress=not cfg.quiet), local=True
        )
    return build_model(cfg.arch, pretrained=cfg.pretrained, weights=cfg.weights)


def restore(
    state: dict,
    cfg: TrainConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    out: Path,
    steps_per_epoch: int,
) -> tuple[int, dict | None]:
    """Load last/ into the prepared objects; the epochs it completed and the best row so far."""
    accelerator.unwrap_model(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and "scaler" in state:
        accelerator.scaler.load_state_dict(state["scaler"])
    # the schedule's position is a number of epochs, whatever the world size that wrote it
    seek_schedule(optimizer, scheduler, state["epoch"] * steps_per_epoch, cfg.lr)
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
    accelerator.print(f"resuming {out} after epoch {state['epoch']} of {cfg.epochs}")
    return state["epoch"], state["best"]


def restore_metrics(out: Path, state: dict) -> None:
    """metrics.jsonl as of the checkpoint: lines of a later, unfinished epoch go (a run of an
    older version wrote them first), and the checkpoint's own epoch line is added back if a
    kill fell between the checkpoint and its line."""
    truncate_metrics(out, state["epoch"])
    rows = read_metrics(out) if (out / METRICS_FILE).is_file() else []
    if state.get("row") and (not rows or rows[-1]["epoch"] < state["epoch"]):
        append_metrics(out, state["row"])


def environment(accelerator: Accelerator, backend: str) -> dict:
    import accelerate
    import torchvision

    try:
        from nvidia import dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    device = accelerator.device
    return {
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "accelerate": accelerate.__version__,
        "dali": dali_version,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "backend": backend,
        "hostname": platform.node(),
        "argv": sys.argv,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """HEAD of the checkout this file is in, with "-dirty" if tracked files changed."""
    try:
        commit = _git("rev-parse", "HEAD")
        return commit + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


# ---------------------------------------------------------------- per epoch


def metrics_row(epoch: int, train: TrainResult, test: EvalResult, epoch_s: float) -> dict:
    return {
        "epoch": epoch,
        "train_loss": train.loss,
        "train_acc": train.accuracy,
        "test_loss": test.loss,
        "test_acc": test.accuracy,
        "test_qwk": test.kappa,
        "test_recall": test.recall,
        "images_per_s": train.images_per_s,
        "epoch_s": epoch_s,
        "lr": train.lr,
    }


def format_row(row: dict, epochs: int) -> str:
    recall = "/".join(f"{r:.2f}" for r in row["test_recall"])
    return (
        f"{row['epoch']:>3}/{epochs:<3} {row['train_loss']:>10.4f} {100 * row['train_acc']:>8.1f}% "
        f"{row['test_loss']:>9.4f} {100 * row['test_acc']:>7.1f}% {row['test_qwk']:>6.3f} "
        f"{row['images_per_s']:>8.1f} {row['epoch_s']:>6.1f}s {row['lr']:>9.2e}  {recall}"
    )


def save_epoch(
    accelerator: Accelerator,
    out: Path,
    cfg: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    row: dict,
    confusion: np.ndarray,
    best: dict,
    is_best: bool,
    preprocess: dict,
) -> None:
    """Rank 0 writes the epoch's files: the confusion matrix, the checkpoint, best.pt, and
    last the metrics line, so that a line never exists without its checkpoint."""
    rngs = gather_object([rng_state()])  # a collective: every rank takes part
    if not accelerator.is_main_process:
        return
    folder = out / CONFUSION_DIR
    folder.mkdir(exist_ok=True)
    name = folder / f"epoch_{row['epoch']:03d}"
    with reporting_disk_full(name.with_suffix(".csv")):
        write_confusion_csv(confusion, name.with_suffix(".csv"))
    with reporting_disk_full(name.with_suffix(".png")):
        title = f"{cfg.arch} epoch {row['epoch']}: accuracy {100 * row['test_acc']:.1f} %, kappa {row['test_qwk']:.3f}"
        plot_confusion(confusion, name.with_suffix(".png"), title=title)
    model_state = accelerator.unwrap_model(model).state_dict()
    augment = asdict(cfg.augment_config())
    state = {
        "epoch": row["epoch"],
        "row": row,
        "model": model_state,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "best": best,
        "rng": rngs,
        "world_size": accelerator.num_processes,
        "config": cfg.to_dict(),
        "preprocess": preprocess,
        "augment": augment,
    }
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler.state_dict()
    save_last(out, state)
    if is_best:
        save_best(
            out / BEST_FILE,
            model_state,
            arch=cfg.arch,
            image_size=cfg.image_size,
            epoch=row["epoch"],
            metrics=row,
            config=cfg.to_dict(),
            preprocess=preprocess,
            augment=augment,
        )
    append_metrics(out, row)


def stopped_message(err: Exception, epoch: int, out: Path) -> str:
    last = last_dir(out)
    kept = (
        f"the last good checkpoint, {last}, is kept" if last.exists() else "no epoch had finished"
    )
    return (
        f"{err} of epoch {epoch}; training stopped and {kept}. Lower --lr (or add "
        "--warmup-epochs) and start again, or continue with --resume --lr SMALLER"
    )


def write_summary(out: Path, cfg: TrainConfig, env: dict, best: dict, checksums: list[str]) -> None:
    rows = read_metrics(out)
    atomic_write_json(
        out / SUMMARY_FILE,
        {
            "arch": cfg.arch,
            "epochs": cfg.epochs,
            "best_epoch": best["epoch"],
            "best": best,
            "last": rows[-1],
            "world_size": env["world_size"],
            "backend": env["backend"],
            "device": env["device"],
            "weights_sha256_per_rank": checksums,
            "best_checkpoint": str(out / BEST_FILE),
        },
    )


class EpochProgress:
    """A rich bar with the running loss on a terminal (rank 0, not --quiet); nothing otherwise."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            import rich.progress as rp

            self.bar = rp.Progress(
                rp.TextColumn("{task.description}"),
                rp.BarColumn(),
                rp.MofNCompleteColumn(),
                rp.TextColumn("loss {task.fields[loss]}"),
                rp.TimeRemainingColumn(),
                transient=True,
            )

    def start(self, description: str, total: int) -> None:
        if self.bar:
            self.task = self.bar.add_task(description, total=total, loss="-")
            self.bar.start()

    def advance(self, loss: float | None) -> None:
        if self.bar:
            fields = {"loss": f"{loss:.4f}"} if loss is not None else {}
            self.bar.update(self.task, advance=1, **fields)

    def stop(self) -> None:
        if self.bar:
            self.bar.stop()
            self.bar.remove_task(self.task)


def cli() -> None:
    """The ``dr-train`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
