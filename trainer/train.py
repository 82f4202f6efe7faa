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

Each epoch trains on the train split, evaluates the val and test splits and writes into
--out (default ``runs/ARCH-YYYYmmdd-HHMMSS``): a line of ``metrics.jsonl`` (train loss and
accuracy; for val and test: loss, accuracy, kappa, kappa with both eyes blended, recall per
grade, referable-DR AUC, sensitivity and specificity, any-DR AUC, the calibration error before
and after the temperature (``ece_raw``, ``ece``); what val chose: the referable threshold (on
calibrated scores), the regress head's cut-points, the both-eyes weight, the temperature
(``trainer/judging/calibration.py``); images_per_s, epoch_s, lr, first_batch_s: the wait for the
epoch's first batch), ``confusion/{val,test}_epoch_NNN.csv`` and ``.png`` (summed over ranks),
``checkpoints/last/`` (atomic, the one before kept as ``previous/``) and ``best.pt``
(highest val kappa, or lowest val MSE for a regress head on a val split under 500 images:
trainer/judging/selection.py; test's when the shards have no val split, with a warning).
``--recipe huang2023`` sets another recipe's defaults at once (trainer/fitting/recipes.py).
``config.json`` (config + environment) is written at the start, ``summary.json`` (with
the test figures at the best-val epoch) and ``report.html`` (trainer/judging/run_page.py: the run
on one page) at the end; ``predictions/{val,test}_epoch_NNN.csv`` keeps the best epoch's
per-image outputs for it. Every rank computes; rank 0 writes.
``images_per_s`` counts the training images of all ranks per second of the training
loop; ``epoch_s`` is training plus evaluation.

``--resume --out DIR`` continues from ``DIR/checkpoints/last/`` with the run's saved
config and ends in the state an uninterrupted run ends in (on the CPU; on a GPU with
--deterministic), also on another number of processes; only --epochs, --lr, --workers,
--backend, --shards, --quiet and the other options of ``config.RESUMABLE`` may be given anew. A user error (no shards,
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
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from PIL import Image
from torch.optim.lr_scheduler import LRScheduler

from pipeline.cli import run_cli
from pipeline.errors import UserError
from pipeline.fileio import (
    atomic_write_json,
    check_out_folder,
    folder_lock,
    own_entries,
    reporting_disk_full,
)
from pipeline.loading.contract import Loader
from pipeline.loading.loader import build_loader
from pipeline.manifest import Manifest, read_manifest
from pipeline.verify import verify_shards
from trainer import smoke
from trainer.base.bestfile import BEST_FILE
from trainer.base.distributed import bare, resolve_precision
from trainer.base.heads import build_head, tune_cuts
from trainer.base.metrics import (
    REFERABLE_GRADE,
    kappa_of,
    operating_threshold,
    plot_confusion,
    referable_score,
    screening,
    write_confusion_csv,
)
from trainer.base.model import build_model, imagenet_state_dict
from trainer.base.normalize import normalization_for
from trainer.base.runfiles import (
    CONFIG_FILE,
    CONFUSION_DIR,
    METRICS_FILE,
    SUMMARY_FILE,
    append_metrics,
    read_metrics,
    truncate_metrics,
)
from trainer.fitting.checkpoint import (
    last_dir,
    load_last,
    repair_best,
    rng_state,
    save_best,
    save_last,
    set_rng_state,
    state_checksum,
)
from trainer.fitting.config import TrainConfig, merge_for_resume, parse_args
from trainer.fitting.ema import EMA
from trainer.fitting.engine import (
    NonFiniteLossError,
    TrainResult,
    build_optimizer,
    build_scheduler,
    class_weights_for,
    seek_schedule,
    train_one_epoch,
)
from trainer.fitting.scaling import batch_line, process_group_kwargs
from trainer.judging.calibration import calibrate_on, ece_figures
from trainer.judging.evaluation import EvalResult, evaluate
from trainer.judging.pairing import choose_blend, choose_blend_and_cuts
from trainer.judging.run_page import save_predictions, write_report
from trainer.judging.selection import SMALL_VAL, selection_for, squared_error

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")
HEADER = (
    f"{'epoch':>7} {'train loss':>10} {'train acc':>9} {'val kappa':>9} {'test loss':>9} "
    f"{'test acc':>8} {'kappa':>6} {'ref AUC':>7} {'img/s':>8} {'time':>7} {'lr':>9}  test recall 0-4"
)


def main(argv: list[str] | None = None) -> int:
    with ExitStack() as held:  # the run folder's lock, released however the run ends
        return run(argv, held)


def run(argv: list[str] | None, held: ExitStack) -> int:
    cfg, given = parse_args(argv)
    if cfg.smoke:
        cfg = smoke.smoke_config(cfg, given)
    state, note = resumed(cfg, given) if cfg.resume else (None, None)
    if state is not None or note:
        cfg = merge_for_resume(
            state["config"] if state else saved_config(Path(cfg.out)), cfg, given
        )
    accelerator = build_accelerator(cfg)
    out = choose_run_folder(cfg, accelerator, held)
    cfg.out = str(out)
    if note:
        accelerator.print(note)
    manifest = read_manifest(cfg.shards)
    if cfg.verify_shards:
        on_leader(accelerator, lambda: check_shards(cfg.shards))
    chooser = choosing_split(manifest, accelerator)
    selection = selection_for(cfg.head, chooser, manifest.split(chooser).samples)
    set_seed(cfg.seed)

    gpu = accelerator.device.type == "cuda"
    torch.backends.cudnn.benchmark = gpu and not cfg.deterministic  # autotuning: kernels by timing
    train_loader, eval_loaders = build_loaders(cfg, manifest, accelerator, channels_last=gpu)
    head = build_head(cfg.head, cfg.label_smoothing, cfg.regress_loss)
    model = build_model_on_every_rank(cfg, head.outputs, accelerator)
    if gpu:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(
        model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.optimizer, cfg.nesterov
    )
    steps = optimizer_steps_per_epoch(len(train_loader), cfg.grad_accumulation)
    scheduler = build_scheduler(
        optimizer,
        cfg.schedule,
        round(cfg.warmup_epochs * steps),
        cfg.epochs * steps,
        floor=cfg.min_lr / cfg.lr,
    )
    class_weights = class_weights_for(
        manifest.split("train").class_counts, cfg.class_weights, accelerator.device
    )
    model, optimizer = accelerator.prepare(model, optimizer)  # never the loaders
    ema = build_ema(bare(accelerator, model), cfg.ema) if cfg.ema else None

    env = environment(accelerator, train_loader.backend)
    accelerator.print(f"config: {json.dumps(cfg.to_dict())}\nenvironment: {json.dumps(env)}")
    accelerator.print(
        batch_line(cfg.batch_size, accelerator.num_processes, cfg.grad_accumulation, cfg.lr)
    )
    if selection.key.endswith("_mse"):
        accelerator.print(
            f"{chooser} has fewer than {SMALL_VAL} images: the best epoch is the one with the "
            f"lowest {chooser} MSE (tuned cut-points would fit its noise); see docs/recipes.md"
        )
    start, best = 0, None
    if state:
        start, best = restore(state, cfg, accelerator, model, optimizer, scheduler, ema, out, steps)
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
    trackers = Trackers(accelerator, cfg, out)
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
                head,
                class_weights,
                on_step=progress.advance,
                clip_grad=cfg.clip_grad,
                ema=ema,
            )
        except NonFiniteLossError as err:
            raise NonFiniteLossError(stopped_message(err, epoch, out)) from None
        finally:
            progress.stop()
        evaluated = ema.module if ema else model  # with --ema, the average is what is judged
        results = {
            split: evaluate(
                evaluated, loader, accelerator, head, class_weights, manifest.split(split).samples
            )
            for split, loader in eval_loaders.items()
        }
        results, choices = choose_on(chooser, results)
        row = metrics_row(epoch, train, results, choices, time.perf_counter() - begin)
        accelerator.print(format_row(row, cfg.epochs))
        row["selected_by"] = selection.key
        is_best = selection.better(row, best)
        best = row if is_best else best
        save_epoch(
            accelerator,
            out,
            cfg,
            evaluated,
            model,
            optimizer,
            scheduler,
            ema,
            row,
            {split: result.confusion for split, result in results.items()},
            best,
            is_best,
            preprocess=manifest.preprocess,
        )
        if is_best and accelerator.is_main_process:  # for the report's per-image figures
            save_predictions(out, epoch, results)
        trackers.log(row, out)

    checksums = gather_object([state_checksum(bare(accelerator, evaluated).state_dict())])
    if len(set(checksums)) > 1:
        raise RuntimeError(f"the ranks ended with different weights: {checksums}")
    if accelerator.is_main_process:
        write_summary(out, cfg, env, best, checksums, chooser)
        report(out)
    accelerator.print(final_line(best, chooser, out))
    for loader in (train_loader, *eval_loaders.values()):
        loader.close()
    if cfg.smoke:
        smoke.finish(accelerator, cfg, out, env)
    accelerator.end_training()  # also closes the trackers
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


def choose_run_folder(cfg: TrainConfig, accelerator: Accelerator, held: ExitStack) -> Path:
    """--out, or runs/ARCH-TIMESTAMP from rank 0's clock; a new run never appends to an old one,
    never writes into a folder of other files, and holds the folder's lock (in ``held``)."""

    def choose():
        default = f"runs/{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
        out = check_out_folder(cfg.out or (smoke.run_folder() if cfg.smoke else default))
        if not cfg.resume and ((out / METRICS_FILE).exists() or last_dir(out).exists()):
            raise UserError(
                f"{out} already holds a run; add --resume to continue it, or pick another --out"
            )
        if not cfg.resume and (names := own_entries(out)) and not started_run(out):
            raise UserError(
                f"{out} holds files that are not a run of this project ({', '.join(names[:3])}"
                f"{', ...' if len(names) > 3 else ''}); name a new or empty folder with --out"
            )
        if not cfg.resume:
            out.mkdir(parents=True, exist_ok=True)
        held.enter_context(folder_lock(out, "train"))
        return str(out)

    if cfg.resume and not cfg.out:
        raise UserError("--resume needs --out DIR, the folder of the run to continue")
    return Path(on_leader(accelerator, choose))


def started_run(out: Path) -> bool:
    """Whether ``out`` holds a run of this trainer that stopped before its first epoch (its
    config.json, written at start)."""
    try:
        saved = json.loads((out / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"config", "environment"} <= saved.keys()


def resumed(cfg: TrainConfig, given: set[str]) -> tuple[dict | None, str | None]:
    """--resume: the run's last checkpoint, or (a run that never finished an epoch) a note
    saying that it starts again at epoch 1. Every rank reads it: the saved config decides
    how the accelerator is built."""
    if not cfg.out:
        raise UserError("--resume needs --out DIR, the folder of the run to continue")
    state = load_last(cfg.out)
    if state is not None:
        return state, None
    saved_config(Path(cfg.out))  # no run there at all: "nothing to resume"
    return None, f"{cfg.out} has no complete epoch to resume from; starting at epoch 1"


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """DDP, precision, gradient accumulation, torch.compile and trackers: all through Accelerate."""
    if cfg.deterministic:
        make_deterministic()
    cuda = torch.cuda.is_available()
    return Accelerator(
        cpu=not cuda,
        mixed_precision=resolve_precision(cfg.precision, cuda),
        gradient_accumulation_steps=cfg.grad_accumulation,
        dynamo_backend="inductor" if cfg.compile else "no",
        log_with=cfg.log_with,
        # trackers need a folder when named; the run folder, once chosen, replaces this one
        project_dir=cfg.out or "runs",
        # rank 0's long work (--verify-shards, plots) must not trip NCCL's 10 minutes
        kwargs_handlers=[process_group_kwargs()],
    )


def optimizer_steps_per_epoch(batches: int, accumulation: int) -> int:
    if batches < accumulation:
        raise UserError(
            f"--grad-accumulation {accumulation} is more than the {batches} batch(es) of an epoch "
            "per process; lower it or the batch size"
        )
    return batches // accumulation


def build_ema(model: torch.nn.Module, decay: float) -> EMA:
    """An exponential moving average of the weights, BatchNorm statistics included, its decay
    warmed up, updated without a host synchronisation (``trainer.fitting.ema``)."""
    return EMA(model, decay)


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


def choosing_split(manifest: Manifest, accelerator: Accelerator) -> str:
    """val, which chooses best.pt and the operating point; test when the shards have no val.

    A folder without a train split (packed for evaluation only) or with nothing to choose on
    is refused; one without a test split trains, and reports val alone.
    """
    if not manifest.has("train"):
        raise UserError(
            f"{manifest.root} has no train split, nothing to train on (a folder packed for "
            "evaluation only is for trainer/evaluate.py --shards)"
        )
    if not manifest.has("val") and not manifest.has("test"):
        raise UserError(
            f"{manifest.root} has neither a val nor a test split, nothing to choose best.pt on; "
            "pack it again with --val-fraction above 0"
        )
    if not manifest.has("test"):
        accelerator.print(
            f"note: {manifest.root} has no test split: val chooses best.pt and is the only "
            "split reported (evaluate an external set with trainer/evaluate.py --shards)"
        )
    if manifest.has("val"):
        return "val"
    accelerator.print(
        f"warning: {manifest.root} has no val split (made with --val-fraction 0): best.pt and "
        "the screening threshold are chosen on test, so the test figures are optimistic"
    )
    return "test"


def build_loaders(
    cfg: TrainConfig, manifest: Manifest, accelerator: Accelerator, channels_last: bool
) -> tuple[Loader, dict[str, Loader]]:
    """This rank's train loader and its val/test loaders (with keys): each rank reads its own
    slice (Accelerate shards none of them)."""
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
        normalize=normalization_for(cfg.normalize, manifest=manifest),
    )
    train = build_loader(cfg.shards, "train", train=True, augment=cfg.augment_config(), **args)
    evals = {
        split: build_loader(cfg.shards, split, train=False, with_keys=True, **args)
        for split in ("val", "test")
        if manifest.has(split)
    }
    return train, evals


def build_model_on_every_rank(
    cfg: TrainConfig, outputs: int, accelerator: Accelerator
) -> torch.nn.Module:
    """With --pretrained the first process of each machine fills the hub cache; then all build."""
    if cfg.pretrained:
        on_leader(
            accelerator,
            lambda: imagenet_state_dict(
                cfg.arch, progress=not cfg.quiet, imagenet=cfg.imagenet_weights
            ),
            local=True,
        )
    return build_model(
        cfg.arch,
        outputs,
        pretrained=cfg.pretrained,
        weights=cfg.weights,
        imagenet=cfg.imagenet_weights,
    )


def restore(
    state: dict,
    cfg: TrainConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    ema: EMA | None,
    out: Path,
    steps_per_epoch: int,
) -> tuple[int, dict | None]:
    """Load last/ into the prepared objects; the epochs it completed and the best row so far."""
    bare(accelerator, model).load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
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


def referable(result: EvalResult) -> tuple[np.ndarray, np.ndarray]:
    """(referable DR or not, referable score) per image of a split."""
    return result.labels >= REFERABLE_GRADE, referable_score(result.probs)


def choose_on(chooser: str, results: dict[str, EvalResult]) -> tuple[dict[str, EvalResult], dict]:
    """What the choosing split (val; test without one) decides, applied unchanged to every
    split: the regress head's cut-points, the both-eyes blend weight, the screening threshold."""
    base = results[chooser]
    cuts = tune_cuts(base.outputs[:, 0], base.labels) if base.head.name == "regress" else None
    results = {split: result.with_cuts(cuts) for split, result in results.items()}
    results, temperature = calibrate_on(chooser, results)  # the threshold is chosen calibrated
    base = results[chooser]
    pair_cuts = None
    if cuts:  # the blend and the cut-points that go with it, chosen together
        blend, pair_cuts = choose_blend_and_cuts(base.keys, base.outputs, base.labels, cuts)
    else:
        blend = choose_blend(
            base.keys, base.outputs, lambda o: kappa_of(base.labels, base.head.grades(o))
        )
    threshold = operating_threshold(*referable(base))
    return results, {
        "cut_points": list(cuts) if cuts else None,  # lists, as in metrics.jsonl
        "pair_blend": blend,
        "pair_cut_points": list(pair_cuts) if pair_cuts else None,
        "referable_threshold": threshold,
        "temperature": temperature,
    }


def metrics_row(
    epoch: int, train: TrainResult, results: dict[str, EvalResult], choices: dict, epoch_s: float
) -> dict:
    """The epoch's line of metrics.jsonl: train, then per split the grading and screening
    figures (and kappa with both eyes blended), then what was chosen on val."""
    row = {"epoch": epoch, "train_loss": train.loss, "train_acc": train.accuracy}
    for split, r in results.items():
        screen = screening(r.labels, r.probs, choices["referable_threshold"])
        row |= {
            f"{split}_loss": r.loss,
            f"{split}_acc": r.accuracy,
            f"{split}_qwk": r.kappa,
            f"{split}_qwk_paired": r.paired(
                choices["pair_blend"], choices["pair_cut_points"]
            ).kappa,
            f"{split}_recall": r.recall,
            **{f"{split}_{k}": v for k, v in screen.items()},
            **ece_figures(r, f"{split}_"),
        }
        if r.head.name == "regress":
            row[f"{split}_mse"] = squared_error(r.outputs, r.labels)
    timing = {"images_per_s": train.images_per_s, "epoch_s": epoch_s, "lr": train.lr}
    return row | choices | timing | {"first_batch_s": train.first_batch_s}


def format_row(row: dict, epochs: int) -> str:
    """The epoch's line under HEADER: test's figures, or dashes when the shards have no test."""
    val = f"{row['val_qwk']:>9.3f}" if "val_qwk" in row else f"{'-':>9}"
    if "test_qwk" in row:
        recall = "/".join(f"{r:.2f}" for r in row["test_recall"])
        auc = row["test_referable_auc"]
        test = (
            f"{row['test_loss']:>9.4f} {100 * row['test_acc']:>7.1f}% {row['test_qwk']:>6.3f} "
            + (f"{auc:>7.3f}" if auc is not None else f"{'-':>7}")
        )
    else:
        recall, test = "(no test split)", f"{'-':>9} {'-':>8} {'-':>6} {'-':>7}"
    return (
        f"{row['epoch']:>3}/{epochs:<3} {row['train_loss']:>10.4f} {100 * row['train_acc']:>8.1f}% {val} "
        f"{test} {row['images_per_s']:>8.1f} {row['epoch_s']:>6.1f}s {row['lr']:>9.2e}  {recall}"
    )


def final_line(best: dict, chooser: str, out: Path) -> str:
    """The run's verdict: the test figures at the epoch chosen on ``chooser``."""
    screening_part = ""
    if best.get("test_referable_auc") is not None:
        screening_part = f", referable DR AUC {best['test_referable_auc']:.3f}"
        if best.get("test_sensitivity") is not None and best.get("test_specificity") is not None:
            screening_part += (
                f" (sensitivity {best['test_sensitivity']:.2f}, "
                f"specificity {best['test_specificity']:.2f})"
            )
    chosen = f"best {chooser} kappa {best[f'{chooser}_qwk']:.4f}"
    if best.get("selected_by", "").endswith("_mse"):
        chosen = f"lowest {chooser} MSE {best[f'{chooser}_mse']:.4f} ({chooser} kappa {best[f'{chooser}_qwk']:.4f})"
    chosen = f"{chosen} at epoch {best['epoch']}"
    if "test_qwk" not in best:
        return f"{chosen}; no test split to report; run folder {out}"
    return (
        f"{chosen}; test at that epoch: kappa {best['test_qwk']:.4f}, accuracy "
        f"{100 * best['test_acc']:.1f} %{screening_part}; run folder {out}"
    )


def save_epoch(
    accelerator: Accelerator,
    out: Path,
    cfg: TrainConfig,
    evaluated: torch.nn.Module,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    ema: EMA | None,
    row: dict,
    confusions: dict[str, np.ndarray],
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
    state = {
        "epoch": row["epoch"],
        "row": row,
        "model": bare(accelerator, model).state_dict(),
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
    if ema is not None:
        state["ema"] = ema.state_dict()
    save_last(out, state)
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


class Trackers:
    """--log-with: every epoch's figures and confusion matrices through Accelerate's trackers
    (metrics.jsonl stays the record)."""

    def __init__(self, accelerator: Accelerator, cfg: TrainConfig, out: Path):
        self.accelerator, self.on = accelerator, bool(cfg.log_with)
        if self.on:
            accelerator.project_configuration.set_directories(str(out))
            hparams = {
                k: v if isinstance(v, int | float | str | bool) else str(v)
                for k, v in cfg.to_dict().items()
                if v is not None
            }
            accelerator.init_trackers(out.name, config=hparams)

    def log(self, row: dict, out: Path) -> None:
        if not self.on:
            return
        scalars = {}
        for key, value in row.items():
            if isinstance(value, list | tuple):
                scalars |= {f"{key}_{i}": v for i, v in enumerate(value)}
            elif isinstance(value, int | float) and key != "epoch":
                scalars[key] = value
        self.accelerator.log(scalars, step=row["epoch"])
        if not self.accelerator.is_main_process:
            return
        images = {
            f"confusion/{png.name.split('_epoch')[0]}": np.asarray(Image.open(png).convert("RGB"))[
                None
            ]
            for png in sorted((out / CONFUSION_DIR).glob(f"*_epoch_{row['epoch']:03d}.png"))
        }
        for tracker in self.accelerator.trackers:
            options = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
            tracker.log_images(images, step=row["epoch"], **options)


def stopped_message(err: Exception, epoch: int, out: Path) -> str:
    last = last_dir(out)
    kept = (
        f"the last good checkpoint, {last}, is kept" if last.exists() else "no epoch had finished"
    )
    return (
        f"{err} of epoch {epoch}; training stopped and {kept}. Lower --lr (or add "
        "--warmup-epochs) and start again, or continue with --resume --lr SMALLER"
    )


def report(out: Path) -> None:
    """report.html; a failure there costs the page, not the run (dr-report writes it again)."""
    try:
        write_report(out)
    except Exception as err:  # the run's own files are all written by now
        print(f"warning: report.html not written ({type(err).__name__}: {err}); dr-report {out}")


def write_summary(
    out: Path, cfg: TrainConfig, env: dict, best: dict, checksums: list[str], chooser: str
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
