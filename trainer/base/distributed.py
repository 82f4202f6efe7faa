"""The devices and the ranks: precision, the bare module under DDP, BatchNorm statistics
averaged over ranks, work done once by a leader and shared. Both halves of trainer/ use
these; they import nothing of either."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn

from pipeline.errors import UserError

T = TypeVar("T")


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


def cudnn_settings(gpu: bool, deterministic: bool = False) -> None:
    """cuDNN as training sets it, for evaluation too: autotuned kernels (chosen by timing)
    on a GPU unless the run asked for deterministic ones. An evaluation with other settings
    picks other convolution algorithms, whose bf16 sums round differently, and a near-tie
    image can change grade between the trainer's figures and dr-evaluate's."""
    torch.backends.cudnn.benchmark = gpu and not deterministic


def native_bf16() -> bool:
    """Whether this GPU computes bf16 in hardware (Ampere and later). torch's own check
    counts emulation by default, which is slower than fp16 with a scaler."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument
        return torch.cuda.get_device_capability() >= (8, 0)


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
