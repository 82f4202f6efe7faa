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
the test figures at the best-val epoch, and ``warnings`` when the run is useless: its val
predictions on one grade, or its loss diverged; also in the log and atop the report) and ``report.html`` (trainer/judging/run_page.py: the run
on one page) at the end; ``predictions/{val,test}_epoch_NNN.csv`` keeps the best epoch's
per-image outputs for it. Every rank computes; rank 0 writes.
``images_per_s`` counts the training images of all ranks per second of the training
loop once its first batch arrived (the wait for it is ``first_batch_s``); ``epoch_s`` is
training plus evaluation.

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
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cli import run_cli
from pipeline.errors import UserError
from pipeline.fileio import atomic_write_json, check_out_folder, folder_lock, own_entries
from pipeline.manifest import Manifest, read_manifest
from pipeline.remote import is_remote, local_shards, shown
from pipeline.verify import verify_shards
from trainer import smoke
from trainer.base.metrics import (
    screening,
)
from trainer.base.normalize import normalization_for
from trainer.base.runfiles import CONFIG_FILE, METRICS_FILE
from trainer.fitting.config import TrainConfig, merge_for_resume, parse_args
from trainer.fitting.scaling import batch_line
from trainer.judging.selection import SMALL_VAL, selection_for, squared_error

# torch, Accelerate and the modules that import them load inside the functions that use them,
# after the command line is parsed: --help and option errors are answered at once.
if TYPE_CHECKING:
    from accelerate import Accelerator

    from pipeline.loading.contract import Loader
    from trainer.base.decisions import Decisions
    from trainer.fitting.engine import TrainResult
    from trainer.judging.evaluation import EvalResult


def main(argv: list[str] | None = None) -> int:
    cfg, given = parse_args(argv)  # --help and option errors are answered before torch loads
    with ExitStack() as held:  # the run folder's lock, released however the run ends
        return fit(cfg, given, held)


def fit(cfg: TrainConfig, given: set[str], held: ExitStack) -> int:
    """Build, prepare, then per epoch: train, evaluate val and test, choose on val, save."""
    import torch
    from accelerate.utils import gather_object, set_seed

    from trainer.base.distributed import bare, cudnn_settings, on_leader
    from trainer.base.heads import build_head
    from trainer.fitting.building import (
        build_accelerator,
        build_ema,
        build_model_on_every_rank,
        optimizer_steps_per_epoch,
    )
    from trainer.fitting.checkpoint import state_checksum
    from trainer.fitting.console import (
        HEADER,
        EpochProgress,
        final_line,
        format_row,
        setup_block,
        stopped_message,
    )
    from trainer.fitting.engine import (
        NonFiniteLossError,
        build_optimizer,
        build_scheduler,
        class_weights_for,
        train_one_epoch,
    )
    from trainer.fitting.environment import environment
    from trainer.fitting.preemption import StopFlag, stopped_here
    from trainer.fitting.resume import holds_run, position_in_epoch, resumed, saved_config
    from trainer.fitting.saver import CheckpointSaver, write_summary
    from trainer.fitting.trackers import Trackers
    from trainer.judging.deciding import tunes_cuts
    from trainer.judging.evaluation import evaluate
    from trainer.judging.run_page import save_predictions

    if cfg.smoke:
        cfg = smoke.smoke_config(cfg, given)
    if cfg.resume == "auto":  # a requeued job: continue the run in --out, or start it
        cfg.resume = "last" if holds_run(cfg) else None
    state, note = resumed(cfg, given) if cfg.resume else (None, None)
    if state is not None or note:
        cfg = merge_for_resume(
            state["config"] if state else saved_config(Path(cfg.out)), cfg, given
        )
    source = cfg.shards  # a URL's copy is fetched once per node (every rank waits for it)
    cfg.shards = str(local_shards(cfg.shards, cfg.cache, quiet=cfg.quiet))
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
    tune = tunes_cuts(cfg.head, manifest.split(chooser).samples, cfg.tune_cuts)
    set_seed(cfg.seed)

    gpu = accelerator.device.type == "cuda"
    cudnn_settings(gpu, cfg.deterministic)  # autotuning: kernels by timing (evaluate.py too)
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
    saver = CheckpointSaver(
        accelerator, cfg, out, model, optimizer, scheduler, ema, manifest.preprocess
    )

    env = environment(accelerator, train_loader.backend)
    accelerator.print(setup_block(cfg.to_dict(), env, out))
    accelerator.print(
        batch_line(cfg.batch_size, accelerator.num_processes, cfg.grad_accumulation, cfg.lr)
    )
    if selection.key.endswith("_mse"):
        accelerator.print(
            f"{chooser} has fewer than {SMALL_VAL} images: the best epoch is the one with the "
            f"lowest {chooser} MSE (tuned cut-points would fit its noise); see docs/recipes.md"
        )
    if cfg.head == "regress":
        accelerator.print(cuts_line(chooser, manifest.split(chooser).samples, tune))
    start, best, position = 0, None, None
    last_row = state.get("row") if state else None
    if state:
        start, best = saver.restore(state, steps)
        position = position_in_epoch(state, accelerator.num_processes, accelerator.process_index)
    stop, stopped = StopFlag(accelerator.num_processes, accelerator.process_index), None
    if accelerator.is_main_process:
        atomic_write_json(
            out / CONFIG_FILE,
            {
                "config": cfg.to_dict(),
                "augment": asdict(cfg.augment_config()),
                "environment": env,
                "shards_source": shown(source) if is_remote(source) else None,
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
                stop=stop,
                epoch=epoch,
                position=position if epoch == start + 1 else None,
            )
        except NonFiniteLossError as err:
            raise NonFiniteLossError(stopped_message(err, epoch, out)) from None
        finally:
            progress.stop()
        if train.stopped_after is not None:
            saver.save_position(epoch - 1, train, last_row, best)
            stopped = (epoch, train.stopped_after)
            break
        evaluated = ema.module if ema else model  # with --ema, the average is what is judged
        results = {
            split: evaluate(
                evaluated, loader, accelerator, head, class_weights, manifest.split(split).samples
            )
            for split, loader in eval_loaders.items()
        }
        results, decisions = choose_on(chooser, results, tune)
        row = metrics_row(epoch, train, results, decisions, time.perf_counter() - begin)
        accelerator.print(format_row(row, cfg.epochs))
        row["selected_by"] = selection.key
        is_best = selection.better(row, best)
        best = row if is_best else best
        confusions = {split: result.confusion for split, result in results.items()}
        saver.save(row, confusions, evaluated, best, is_best)
        if is_best and accelerator.is_main_process:  # for the report's per-image figures
            save_predictions(out, epoch, results)
        trackers.log(row, out)
        last_row = row
        if epoch < cfg.epochs and stop.agreed():  # signalled while evaluating or saving
            stopped = (epoch + 1, 0)
            break

    stop.close()
    if stopped:
        for loader in (train_loader, *eval_loaders.values()):
            loader.close()
        return stopped_here(accelerator, stop, *stopped, out)

    checksums = gather_object([state_checksum(bare(accelerator, evaluated).state_dict())])
    if len(set(checksums)) > 1:
        raise RuntimeError(f"the ranks ended with different weights: {checksums}")
    # rank 0 wrote the files it reads; other machines may not see the run folder
    warnings = usefulness(out, cfg, manifest, best, chooser) if accelerator.is_main_process else []
    for line in warnings:
        accelerator.print(f"warning: {line}")
    if accelerator.is_main_process:
        write_summary(out, cfg, env, best, checksums, chooser, warnings)
        report(out)
    accelerator.print(final_line(best, chooser, out))
    for loader in (train_loader, *eval_loaders.values()):
        loader.close()
    if cfg.smoke:
        smoke.finish(accelerator, cfg, out, env)
    accelerator.end_training()  # also closes the trackers
    return 0


# ---------------------------------------------------------------- set-up


def choose_run_folder(cfg: TrainConfig, accelerator: Accelerator, held: ExitStack) -> Path:
    """--out, or runs/ARCH-TIMESTAMP from rank 0's clock; a new run never appends to an old one,
    never writes into a folder of other files, and holds the folder's lock (in ``held``)."""

    from trainer.base.distributed import on_leader
    from trainer.fitting.checkpoint import last_dir

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


def check_shards(shards: str) -> None:
    """--verify-shards: the full verification of ``make_shards --verify``, or a UserError."""
    report = verify_shards(shards)
    if report.problems:
        raise UserError(
            f"{len(report.problems)} problem(s) in {shards}, the first: {report.problems[0]}; "
            f"run tools/make_shards.py --verify {shards} for the list"
        )


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
    from pipeline.loading.loader import EvalSpec, TrainSpec, build_loader

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
    train = build_loader(cfg.shards, TrainSpec(augment=cfg.augment_config(), **args))
    evals = {
        split: build_loader(cfg.shards, EvalSpec(split=split, with_keys=True, **args))
        for split in ("val", "test")
        if manifest.has(split)
    }
    return train, evals


# ---------------------------------------------------------------- per epoch


def choose_on(
    chooser: str, results: dict[str, EvalResult], tune: bool
) -> tuple[dict[str, EvalResult], Decisions]:
    """What the choosing split (val; test without one) decides (trainer/judging/deciding.py),
    applied unchanged to every split."""
    from trainer.judging.deciding import decide

    decisions = decide(results[chooser], tune)
    return {split: result.decided(decisions) for split, result in results.items()}, decisions


def metrics_row(
    epoch: int,
    train: TrainResult,
    results: dict[str, EvalResult],
    decisions: Decisions,
    epoch_s: float,
) -> dict:
    """The epoch's line of metrics.jsonl: train, then per split the grading and screening
    figures (and kappa with both eyes blended), then what was chosen on val."""
    from trainer.judging.calibration import ece_figures

    row = {"epoch": epoch, "train_loss": train.loss, "train_acc": train.accuracy}
    for split, r in results.items():
        screen = screening(r.labels, r.probs, decisions.referable_threshold)
        row |= {
            f"{split}_loss": r.loss,
            f"{split}_acc": r.accuracy,
            f"{split}_qwk": r.kappa,
            f"{split}_qwk_paired": r.both_eyes(decisions).kappa,
            f"{split}_recall": r.recall,
            **{f"{split}_{k}": v for k, v in screen.items()},
            **ece_figures(r, f"{split}_"),
        }
        if r.head.name == "regress":
            row[f"{split}_mse"] = squared_error(r.outputs, r.labels)
    timing = {"images_per_s": train.images_per_s, "epoch_s": epoch_s, "lr": train.lr}
    return row | decisions.to_dict() | timing | {"first_batch_s": train.first_batch_s}


def cuts_line(chooser: str, samples: int, tune: bool) -> str:
    """The log's line on the regress head's cut-points: tuned on val, or fixed and why."""
    from trainer.base.heads import MIN_BAND

    if not tune:
        return (
            f"{chooser} has {samples} images (< {SMALL_VAL}): the regress head keeps the "
            "cut-points 0.5/1.5/2.5/3.5 (--tune-cuts tunes them on it)"
        )
    return (
        f"the regress head's cut-points are tuned on {chooser} ({samples} images) for kappa, "
        f"every grade keeping a band of at least {MIN_BAND}"
    )


def usefulness(
    out: Path, cfg: TrainConfig, manifest: Manifest, best: dict, chooser: str
) -> list[str]:
    """Why the run is useless, if it is (trainer/judging/sanity.py), from the run's files."""
    from trainer.base.metrics import read_confusion_csv
    from trainer.base.runfiles import CONFUSION_DIR, read_metrics
    from trainer.judging.sanity import guess_loss, run_warnings

    matrix = out / CONFUSION_DIR / f"{chooser}_epoch_{best['epoch']:03d}.csv"
    confusion = read_confusion_csv(matrix) if matrix.is_file() else None
    guess = guess_loss(cfg.head, manifest.split("train").class_counts, cfg.regress_loss)
    return run_warnings(read_metrics(out), chooser, confusion, guess)


def report(out: Path) -> None:
    """report.html; a failure there costs the page, not the run (dr-report writes it again)."""
    from trainer.judging.run_page import write_report

    try:
        write_report(out)
    except Exception as err:  # the run's own files are all written by now
        print(f"warning: report.html not written ({type(err).__name__}: {err}); dr-report {out}")


def cli() -> None:
    """The ``dr-train`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
