"""One training step and one training epoch, the same on CPU, one GPU and DDP ranks; the
optimizer, schedule and class-weight builders they use (evaluation: trainer/judging/evaluation.py).

Precision and DDP go through Accelerate only: ``accelerator.autocast()`` around the
forward pass, ``accelerator.backward`` for the gradients (it scales fp16 losses).
Every rank runs the same number of train steps (the loader guarantees it), so the
collectives below (loss checks, the epoch's sums) line up on every rank.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from pipeline.errors import RunError, UserError
from trainer.base.heads import ClassifyHead, Head
from trainer.fitting.ema import EMA
from trainer.fitting.preemption import StopFlag

CLASSIFY = ClassifyHead()  # the reference recipe's head, the default
CHECK_EVERY = 50  # steps between cross-rank loss checks (a sync point; also feeds the progress bar)


class NonFiniteLossError(RunError):
    """The training loss became inf or nan."""


@dataclass
class TrainResult:
    loss: float
    accuracy: float
    images: int  # summed over ranks
    seconds: float
    lr: float  # of the epoch's last step
    first_batch_s: float = (
        0.0  # from asking the loader for the epoch to its first batch (slowest rank)
    )
    stopped_after: int | None = None  # preemption: the last step trained, when stopped early
    partial: list[float] | None = None  # then this rank's loss sum, weight sum, correct, seen

    @property
    def images_per_s(self) -> float:
        """Steady state: the epoch's images over the time from its first batch's arrival to
        its end (the first batch's wait, a pipeline start, is ``first_batch_s``, apart)."""
        steady = self.seconds - self.first_batch_s
        return self.images / steady if steady > 0 else 0.0


@dataclass(frozen=True)
class Position:
    """Where an epoch stopped early: the steps done, and this rank's sums so far."""

    step: int
    totals: tuple[float, float, float, float]  # loss sum, weight sum, correct, images seen


# ---------------------------------------------------------------- builders


def build_optimizer(
    model: nn.Module,
    lr: float,
    momentum: float,
    weight_decay: float,
    name: str = "sgd",
    nesterov: bool = False,
) -> Optimizer:
    """SGD with momentum (the reference; Nesterov's if asked) or AdamW (momentum is Adam's own)."""
    if name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov and momentum > 0,
        )
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer '{name}'; choose sgd or adamw")


def build_scheduler(
    optimizer: Optimizer, schedule: str, warmup_steps: int, total_steps: int, floor: float = 0.0
) -> LambdaLR:
    """Per-step LambdaLR: linear warmup to the peak, then constant or cosine down to 0, or
    never below ``floor`` (a fraction of the peak: --min-lr / --lr, a clipped cosine)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(floor, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))

    if schedule not in ("constant", "cosine"):
        raise UserError(f"unknown lr schedule '{schedule}'; choose constant or cosine")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seek_schedule(optimizer: Optimizer, scheduler: LambdaLR, step: int, lr: float) -> None:
    """Put a restored schedule at optimizer step ``step`` (of the steps per epoch of *this*
    run) with peak ``lr``. A checkpoint's own step count is in steps of the world size that
    wrote it; resumed on another number of processes it would put the schedule elsewhere."""
    scheduler.last_epoch = step
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(step)


def class_weights_for(
    counts: Sequence[int], mode: str, device: torch.device | None = None
) -> Tensor | None:
    """Loss weights per grade from the train split's counts, averaging 1 per training sample.

    inverse: 1/n_c; sqrt: 1/sqrt(n_c) (milder); none: None. An absent grade gets 0.
    """
    if mode == "none":
        return None
    counts = torch.tensor(counts, dtype=torch.float64)
    power = {"inverse": 1.0, "sqrt": 0.5}[mode]
    raw = torch.where(counts > 0, counts.clamp(min=1) ** -power, torch.zeros_like(counts))
    weights = raw * counts.sum() / (raw * counts).sum()
    return weights.float().to(device)


# ---------------------------------------------------------------- train and evaluate


def train_step(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    optimizer: Optimizer,
    scheduler: LambdaLR,
    accelerator: Accelerator,
    head: Head = CLASSIFY,
    class_weights: Tensor | None = None,
    clip_grad: float | None = None,
    ema: EMA | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One step (an optimizer step every ``gradient_accumulation_steps`` of them); the detached
    outputs, loss sum and weight sum (for the epoch's means)."""
    with accelerator.accumulate(model):
        with accelerator.autocast():
            out = model(images)
            loss_sum, weight_sum = head.loss_sums(out, labels, class_weights)
        accelerator.backward(loss_sum / weight_sum)  # Accelerate divides by the accumulation
        if accelerator.sync_gradients:
            if clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(accelerator.unwrap_model(model))
    return out.detach(), loss_sum.detach(), weight_sum


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    optimizer: Optimizer,
    scheduler: LambdaLR,
    accelerator: Accelerator,
    head: Head = CLASSIFY,
    class_weights: Tensor | None = None,
    on_step: Callable[[float | None], None] | None = None,
    clip_grad: float | None = None,
    ema: EMA | None = None,
    stop: StopFlag | None = None,
    epoch: int = 0,
    position: Position | None = None,
) -> TrainResult:
    """One epoch of whole optimizer steps: with gradient accumulation over N batches, the
    epoch's last ``len(loader) % N`` batches are left out (so every epoch, and a resumed
    one, starts on a fresh accumulation).

    ``stop``: after each optimizer step the ranks ask it together whether to stop (a
    preemption signal); the result then says after which step. ``position``: the epoch is
    resumed after that step; the batches before it are read again, not trained on (an
    epoch's batches depend only on seed, epoch and rank), so the rest is as it would have been.
    """
    model.train()
    totals = torch.zeros(3, device=accelerator.device)  # loss sum, weight sum, correct
    seen, lr = 0, optimizer.param_groups[0]["lr"]
    skip = position.step if position else 0
    if position:
        totals += torch.tensor(position.totals[:3], device=accelerator.device)
        seen = int(position.totals[3])
    accumulation = accelerator.gradient_accumulation_steps
    steps = len(loader) // accumulation * accumulation
    start = time.perf_counter()
    first_batch_s = 0.0
    for step, (images, labels) in enumerate(loader, 1):
        if step == 1:
            first_batch_s = time.perf_counter() - start  # pipeline build, worker start-up
        if step <= skip:
            continue  # trained on before the interruption
        lr = optimizer.param_groups[0]["lr"]
        out, loss_sum, weight_sum = train_step(
            model,
            images,
            labels,
            optimizer,
            scheduler,
            accelerator,
            head,
            class_weights,
            clip_grad,
            ema,
        )
        correct = (head.train_grades(out) == labels).sum()
        totals += torch.stack([loss_sum, weight_sum, correct.float()])
        seen += len(labels)
        running = check_finite(accelerator, totals, step) if step % CHECK_EVERY == 0 else None
        if on_step:
            on_step(running)
        if step == steps:
            break
        if stop is not None and step % accumulation == 0 and stop.at_step(epoch, step):
            partial = [*totals.tolist(), float(seen)]
            return TrainResult(math.nan, math.nan, seen, 0.0, lr, 0.0, step, partial)
    loss = check_finite(accelerator, totals, steps)
    totals = accelerator.reduce(totals, "sum").tolist()
    seconds = time.perf_counter() - start
    images = int(accelerator.reduce(torch.tensor(seen, device=accelerator.device), "sum"))
    first = accelerator.gather(torch.tensor([first_batch_s], device=accelerator.device))
    return TrainResult(
        loss=loss,
        accuracy=totals[2] / max(images, 1),
        images=images,
        seconds=seconds,
        lr=lr,
        first_batch_s=float(first.max()),
    )


def check_finite(accelerator: Accelerator, totals: Tensor, step: int) -> float:
    """The mean loss so far over all ranks; every rank raises together if it is not finite."""
    summed = accelerator.reduce(totals[:2].clone(), "sum").tolist()
    loss = summed[0] / max(summed[1], 1e-12)
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"the training loss became {loss} by step {step} of the epoch")
    return loss
