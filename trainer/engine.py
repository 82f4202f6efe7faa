"""One training epoch and one evaluation, the same on CPU, one GPU and DDP ranks.

Precision and DDP go through Accelerate only: ``accelerator.autocast()`` around the
forward pass, ``accelerator.backward`` for the gradients (it scales fp16 losses).
Every rank runs the same number of train steps (the loader guarantees it), so the
collectives below (loss checks, the epoch's sums) line up on every rank.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from pipeline.errors import RunError, UserError
from pipeline.shardformat import eye_of, patient_of
from trainer.calibration import scaled
from trainer.ema import EMA
from trainer.heads import ClassifyHead, Head
from trainer.metrics import (
    accuracy,
    confusion_of,
    quadratic_kappa,
    recall_per_class,
    referable_score,
)
from trainer.model import backbone_features
from trainer.pairing import blend_partners
from trainer.tta import tta_outputs_and_features

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

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EvalResult:
    """A split's evaluation: every image once (gathered from all ranks, sorted by key), its
    raw head outputs, and what they become with the head and its cut-points."""

    loss: float
    keys: list[str]
    labels: np.ndarray  # (N,) true grades
    outputs: np.ndarray  # (N, head.outputs) raw outputs
    head: Head = field(default_factory=ClassifyHead)
    cuts: tuple[float, ...] | None = None  # regress head: tuned on val
    features: np.ndarray | None = None  # (N, D) backbone features, when asked for
    temperature: float | None = None  # classify/ordinal: fitted on val (trainer.calibration)

    def __post_init__(self):
        self.probs = self.head.probs(scaled(self.outputs, self.temperature), self.cuts)  # (N, 5)
        self.grades = self.head.grades(self.outputs, self.cuts)
        self.confusion = confusion_of(self.labels, self.grades)

    @property
    def samples(self) -> int:
        return len(self.keys)

    @property
    def accuracy(self) -> float:
        return accuracy(self.confusion)

    @property
    def kappa(self) -> float:
        return quadratic_kappa(self.confusion)

    @property
    def recall(self) -> list[float]:
        return recall_per_class(self.confusion)

    def with_cuts(self, cuts: tuple[float, ...] | None) -> EvalResult:
        return replace(self, cuts=cuts)

    def with_temperature(self, temperature: float | None) -> EvalResult:
        return replace(self, temperature=temperature)

    def paired(self, weight: float, cuts: tuple[float, ...] | None = None) -> EvalResult:
        """The same images with each eye's outputs blended with its partner's (and, for the
        regress head, the cut-points chosen with the blend, where given)."""
        return replace(
            self,
            outputs=blend_partners(self.keys, self.outputs, weight),
            cuts=self.cuts if cuts is None else tuple(cuts),
        )

    def predictions(self) -> pd.DataFrame:
        """One row per image: key, patient, eye, true, pred, p0..p4, referable_score."""
        table = pd.DataFrame(
            {
                "key": self.keys,
                "patient": [patient_of(k) for k in self.keys],
                "eye": [eye_of(k) for k in self.keys],
                "true": self.labels,
                "pred": self.grades,
            }
        )
        for grade in range(self.probs.shape[1]):
            table[f"p{grade}"] = self.probs[:, grade]
        table["referable_score"] = referable_score(self.probs)  # P(grade >= 2)
        return table


# ---------------------------------------------------------------- builders


def resolve_precision(requested: str, cuda: bool) -> str:
    """auto: the launcher's bf16/fp16 (bf16 unless unsupported) on a GPU, fp32 on the CPU.

    fp16 autocast on the CPU does nothing at all, so it is refused rather than ignored.
    """
    bf16_ok = cuda and native_bf16()
    if requested == "auto":
        if not cuda:
            return "no"
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "bf16")
        return "fp16" if launcher == "fp16" or not bf16_ok else "bf16"
    if requested == "fp16" and not cuda:
        raise UserError("fp16 autocast has no effect on the CPU; use --precision bf16 or no")
    if requested == "bf16" and cuda and not bf16_ok:
        raise UserError("this GPU does not support bf16; use --precision fp16")
    return requested


def native_bf16() -> bool:
    """Whether this GPU computes bf16 in hardware (Ampere and later). torch's own check
    counts emulation by default, which is slower than fp16 with a scaler."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument
        return torch.cuda.get_device_capability() >= (8, 0)


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
) -> TrainResult:
    """One epoch of whole optimizer steps: with gradient accumulation over N batches, the
    epoch's last ``len(loader) % N`` batches are left out (so every epoch, and a resumed
    one, starts on a fresh accumulation)."""
    model.train()
    totals = torch.zeros(3, device=accelerator.device)  # loss sum, weight sum, correct
    seen, lr = 0, optimizer.param_groups[0]["lr"]
    accumulation = accelerator.gradient_accumulation_steps
    steps = len(loader) // accumulation * accumulation
    start = time.perf_counter()
    first_batch_s = 0.0
    for step, (images, labels) in enumerate(loader, 1):
        if step == 1:
            first_batch_s = time.perf_counter() - start  # pipeline build, worker start-up
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


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor, list[str]]],
    accelerator: Accelerator,
    head: Head = CLASSIFY,
    class_weights: Tensor | None = None,
    expected: int | None = None,
    cuts: tuple[float, ...] | None = None,
    with_features: bool = False,
    tta: bool = False,
) -> EvalResult:
    """Every image's outputs, over every rank's slice, and the mean loss; ``loader`` yields
    keys (``build_loader(..., with_keys=True)``). ``with_features``: also every image's
    backbone features (both eyes' feature fusion, trainer/fusion.py). ``tta``: outputs and
    features averaged over the eight flips and 90-degree rotations (trainer/tta.py).

    ``expected``: the split's sample count; another total, or a key seen twice, means
    samples were dropped or duplicated across ranks, and that is a bug worth stopping for.
    """
    sync_batchnorm_stats(model, accelerator)
    # The bare module: DDP's forward can broadcast buffers, a collective that would wait
    # forever on a rank whose slice of the split has fewer batches (or none).
    model = bare(accelerator, model).eval()
    sums = torch.zeros(2, device=accelerator.device)
    keys: list[str] = []
    labels_seen, outputs_seen = [], []
    with torch.inference_mode():
        for images, labels, batch_keys in loader:
            with accelerator.autocast():
                if tta:
                    out, features = tta_outputs_and_features(model, images)
                    features = features if with_features else None
                else:
                    features = backbone_features(model, images) if with_features else None
                    out = model(images) if features is None else model.fc(features)
            loss_sum, weight_sum = head.loss_sums(out, labels, class_weights)
            sums += torch.stack([loss_sum, weight_sum])
            keys += batch_keys
            labels_seen.append(labels)
            outputs_seen.append(
                out.float() if features is None else torch.cat([out.float(), features.float()], 1)
            )
    sums = accelerator.reduce(sums, "sum").tolist()
    width = head.outputs + (model.fc.in_features if with_features else 0)
    keys, labels, outputs = gather_per_image(keys, labels_seen, outputs_seen, width)
    features = outputs[:, head.outputs :] if with_features else None
    outputs = outputs[:, : head.outputs]
    if expected is not None and (len(keys) != expected or len(set(keys)) != expected):
        raise RuntimeError(
            f"evaluation saw {len(keys)} samples ({len(set(keys))} distinct) over all ranks, "
            f"the split has {expected}: the loader dropped or repeated samples"
        )
    loss = sums[0] / max(sums[1], 1e-12)
    return EvalResult(loss, keys, labels, outputs, head, cuts, features)


def gather_per_image(
    keys: list[str], labels: list[Tensor], outputs: list[Tensor], width: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every rank's per-image results on every rank, sorted by key (one copy to the host each)."""
    mine = (
        keys,
        torch.cat(labels).cpu().numpy() if labels else np.zeros(0, np.int64),
        torch.cat(outputs).cpu().numpy() if outputs else np.zeros((0, width), np.float32),
    )
    parts = gather_object([mine])  # one (keys, labels, outputs) per rank
    all_keys = [k for part in parts for k in part[0]]
    order = np.argsort(all_keys, kind="stable")
    all_labels = np.concatenate([part[1] for part in parts])[order]
    all_outputs = np.concatenate([part[2] for part in parts])[order]
    return [all_keys[i] for i in order], all_labels, all_outputs


def bare(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The module under DDP and torch.compile: the one whose state dict is saved and loaded."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def sync_batchnorm_stats(model: nn.Module, accelerator: Accelerator) -> None:
    """Average BatchNorm running statistics over ranks.

    DDP keeps parameters identical but each rank's running mean/var follows its own last
    batches; averaging them makes every rank evaluate, and checkpoint, the same model.
    """
    if accelerator.num_processes == 1:
        return
    for buffer in bare(accelerator, model).buffers():
        if buffer.is_floating_point():
            buffer.copy_(accelerator.reduce(buffer, "mean"))
