"""The run's set-up builders: the Accelerator (DDP, precision, accumulation, trackers), the
model on every rank, the EMA, the number of optimizer steps an epoch."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator

from pipeline.errors import UserError
from trainer.base.distributed import on_leader, resolve_precision
from trainer.base.model import build_model, imagenet_state_dict
from trainer.fitting.config import TrainConfig
from trainer.fitting.ema import EMA
from trainer.fitting.scaling import process_group_kwargs


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
