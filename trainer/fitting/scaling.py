"""Batch size and learning rate for a GPU run, and the process group's patience.

The defaults (``--batch-size 8 --lr 0.01``) reproduce the reference report; a GPU is wasted
on 8 images a step. For a GPU run the advice is a per-GPU batch of ``GPU_BATCH`` and the
learning rate scaled linearly with the global batch (the linear scaling rule, with a
warm-up): ``lr = 0.01 * global batch / 8``. A recommendation, not a measured optimum.

Rank 0 alone does some long work while the others wait at the next collective:
``--verify-shards`` hashes every shard, and every epoch it writes plots and checkpoints.
NCCL gives up on a collective after 10 minutes by default; the process group here waits
``PROCESS_GROUP_TIMEOUT`` instead, so a slow disk is not taken for a hung rank.
"""

from __future__ import annotations

from datetime import timedelta

REFERENCE_BATCH = 8
REFERENCE_LR = 0.01
GPU_BATCH = 64  # per GPU: resnet50 at 512 px in bf16 fits well within an 80 GB card
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


def scaled_lr(batch_per_process: int, processes: int) -> float:
    """The reference learning rate, scaled linearly from its batch of 8 to the global batch."""
    return REFERENCE_LR * batch_per_process * processes / REFERENCE_BATCH


def gpu_advice(gpus: int) -> str:
    """The flags a GPU run should start from, for ``gpus`` GPUs on this machine."""
    lr = scaled_lr(GPU_BATCH, gpus)
    return (
        f"--batch-size {GPU_BATCH} --lr {lr:g} --warmup-epochs 1 "
        f"({GPU_BATCH} per GPU x {gpus} GPU(s), lr scaled linearly from the reference's "
        f"{REFERENCE_LR:g} at batch {REFERENCE_BATCH}; the defaults reproduce the report)"
    )


def batch_line(batch_per_process: int, processes: int, accumulation: int, lr: float) -> str:
    """The config line's summary: what one optimizer step sees, and at what learning rate.

    The linear-scaling hint only where it applies: the reference's lr on another batch. Any
    other lr was chosen (by --lr or a recipe, e.g. huang2023's 1e-3 at batch 32) and is left
    alone.
    """
    step = batch_per_process * processes * accumulation
    line = (
        f"batch: --batch-size {batch_per_process} per process x {processes} process(es)"
        f" x {accumulation} accumulated = {step} images per optimizer step; --lr {lr:g}"
    )
    if lr != REFERENCE_LR or step == REFERENCE_BATCH:
        return line
    return f"{line} (linear scaling from the reference would give {scaled_lr(step, 1):g})"


def process_group_kwargs():
    """Accelerate's handler that sets the process group's timeout (NCCL's default: 10 min)."""
    from accelerate.utils import InitProcessGroupKwargs  # dr-doctor imports this module too

    return InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)
