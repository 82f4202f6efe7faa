"""--ema: an exponential moving average of the weights that never waits for the GPU.

``torch.optim.swa_utils.AveragedModel`` reads its ``n_averaged`` tensor on the host at every
update (``if self.n_averaged == 0``): on a GPU, one synchronisation per optimizer step. Here
the number of updates so far is a Python int, so a step only queues work: one
``torch._foreach_lerp_`` over the parameters and floating-point buffers (BatchNorm's
running statistics), and a copy of the integer buffers (``num_batches_tracked``).

The decay warms up: update ``t`` (0, 1, ...; the updates before it) uses
``min(decay, (1 + t) / (10 + t))``, so the early average is not held to the random initial
weights for thousands of steps.

The state dict has AveragedModel's layout: the average's weights under ``module.`` and the
update count as ``n_averaged``, so checkpoints written before and after read the same way
(``trainer.fitting.checkpoint.repair_best``, evaluate and predict take ``best.pt``'s plain weights).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def warmed_decay(decay: float, updates: int) -> float:
    """The decay of the update that follows ``updates`` earlier ones."""
    return min(decay, (1 + updates) / (10 + updates))


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.decay = decay
        self.updates = 0  # mirrors n_averaged on the host: read once, at load_state_dict
        self.register_buffer(
            "n_averaged", torch.tensor(0, dtype=torch.long, device=device_of(self.module))
        )

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s weights: no host read, no synchronisation."""
        averaged, current = pairs(self.module), pairs(model)
        if len(averaged) != len(current):
            raise ValueError("the EMA's model and the trained model have different tensors")
        floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        weight = 1.0 - warmed_decay(self.decay, self.updates)
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], weight)
        for a, c in zip(averaged, current, strict=True):
            if not a.is_floating_point():
                a.copy_(c, non_blocking=True)
        self.n_averaged.add_(1)
        self.updates += 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.updates = int(self.n_averaged)  # one read per resume, not per step


def pairs(model: nn.Module) -> list[torch.Tensor]:
    """The tensors an average follows: parameters, then buffers, detached, in module order."""
    return [t.detach() for t in (*model.parameters(), *model.buffers())]


def device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
