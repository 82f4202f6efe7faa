"""Both eyes by feature fusion: a small second-stage head on [own eye, partner eye] features.

The method of Huang et al. 2023 and of the Kaggle 2015 leaders, in the form ``dr-fuse``
(tools/fuse.py) runs it: the trained network is frozen; every image's pooled backbone
features are extracted once, without augmentation; a two-layer head reads each image's
features beside its partner's (an eye whose partner is not in the set is paired with
itself) and gives the outputs the network's own head gives (5 logits, one score or 4
cumulative logits), trained with that head's loss on the train split. Its epoch is chosen
on val by the rule of trainer/judging/selection.py; for the regress head its cut-points, and for
every head its referable operating point, are then tuned on val at that epoch.

Stored in best.pt under ``"fusion"`` (``checkpoint.add_to_best``)::

    {"state": the head's state dict (with the train split's feature mean and std),
     "features": D, "hidden": H, "outputs": k, "cut_points" (regress) or None,
     "referable_threshold", "epoch", "selected_by", "history": one row per epoch,
     "kappa": {split: {"eye_alone", "blend", "fused"}}, "settings": dr-fuse's options}
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from trainer.base.heads import Head, tune_cuts
from trainer.base.metrics import REFERABLE_GRADE, operating_threshold, referable_score
from trainer.judging.evaluation import EvalResult
from trainer.judging.options import FUSION_KEY, HIDDEN  # noqa: F401
from trainer.judging.pairing import partner_index
from trainer.judging.selection import selection_for, squared_error


class FusionHead(nn.Module):
    """[own, partner] features (N, 2D), standardised by the train split's statistics, to the
    head's outputs (N, k)."""

    def __init__(self, features: int, outputs: int, hidden: int = HIDDEN):
        super().__init__()
        self.register_buffer("mean", torch.zeros(2 * features))
        self.register_buffer("std", torch.ones(2 * features))
        self.net = nn.Sequential(
            nn.Linear(2 * features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, outputs)
        )

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.net((pairs - self.mean) / self.std)


@dataclass
class FusionSettings:
    epochs: int = 30
    lr: float = 0.01  # SGD, Nesterov momentum 0.9, gradient norm clipped at 1
    batch_size: int = 64
    hidden: int = HIDDEN
    weight_decay: float = 5e-4
    seed: int = 0


def pair_features(keys: Sequence[str], features: np.ndarray) -> np.ndarray:
    """(N, 2D): each image's features beside its partner's (its own when it has none here)."""
    partner = partner_index(keys)
    other = np.where(partner[:, None] >= 0, features[np.maximum(partner, 0)], features)
    return np.concatenate([features, other], axis=1).astype(np.float32)


def has_pairs(keys: Sequence[str]) -> bool:
    return bool((partner_index(keys) >= 0).any())


def fused_outputs(fusion: dict, keys: Sequence[str], features: np.ndarray) -> np.ndarray:
    """The stored fusion head's outputs (N, k) for images ``keys`` and their features, on
    the CPU in float32 (so evaluate and predict compute the same numbers)."""
    head = FusionHead(int(fusion["features"]), int(fusion["outputs"]), int(fusion["hidden"]))
    head.load_state_dict(fusion["state"])
    with torch.inference_mode():
        return head.eval()(torch.from_numpy(pair_features(keys, features))).numpy()


def fused_result(fusion: dict, alone: EvalResult) -> EvalResult:
    """``alone`` (an evaluation with features) with the fusion head's outputs and cut-points;
    the single eye's temperature does not apply to them."""
    cuts = fusion.get("cut_points")
    return replace(
        alone,
        outputs=fused_outputs(fusion, alone.keys, alone.features),
        cuts=tuple(cuts) if cuts else None,
        temperature=None,
    )


def train_fusion(train: EvalResult, val: EvalResult, head: Head, settings: FusionSettings) -> dict:
    """Train the fusion head on ``train``'s features, choose its epoch on ``val``: the dict
    stored in best.pt (module docstring), without "kappa" and "settings"."""
    torch.manual_seed(settings.seed)
    x = torch.from_numpy(pair_features(train.keys, train.features))
    y = torch.from_numpy(train.labels).long()
    x_val = torch.from_numpy(pair_features(val.keys, val.features))
    model = FusionHead(train.features.shape[1], head.outputs, settings.hidden)
    model.mean.copy_(x.mean(0))
    model.std.copy_(x.std(0).clamp(min=1e-6))
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=0.9,
        nesterov=True,
        weight_decay=settings.weight_decay,
    )
    selection = selection_for(head.name, "val", len(val.labels))
    order = torch.Generator().manual_seed(settings.seed)
    best, best_state, history = None, None, []
    for epoch in range(1, settings.epochs + 1):
        model.train()
        permutation = torch.randperm(len(y), generator=order)
        losses = []
        for start in range(0, len(y), settings.batch_size):
            batch = permutation[start : start + settings.batch_size]
            loss_sum, weight_sum = head.loss_sums(model(x[batch]), y[batch], None)
            optimizer.zero_grad(set_to_none=True)
            (loss_sum / weight_sum).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss_sum.detach() / weight_sum))
        row = {"epoch": epoch, "train_loss": float(np.mean(losses))}
        row |= judge(model, x_val, val, head)
        history.append(row)
        if selection.better(row, best):
            best, best_state = row, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    outputs = _outputs(model, x_val)
    cuts = best.get("val_cut_points")
    chosen = EvalResult(
        loss=0.0, keys=val.keys, labels=val.labels, outputs=outputs, head=head,
        cuts=tuple(cuts) if cuts else None,
    )  # fmt: skip
    threshold = operating_threshold(chosen.labels >= REFERABLE_GRADE, referable_score(chosen.probs))
    return {
        "state": {k: v.detach().clone() for k, v in best_state.items()},
        "features": int(train.features.shape[1]),
        "hidden": settings.hidden,
        "outputs": head.outputs,
        "cut_points": cuts,
        "referable_threshold": threshold,
        "epoch": best["epoch"],
        "selected_by": selection.key,
        "history": history,
    }


def judge(model: FusionHead, x_val: torch.Tensor, val: EvalResult, head: Head) -> dict:
    """One epoch's val figures: kappa (the regress head's at cut-points tuned here), MSE."""
    outputs = _outputs(model, x_val)
    cuts = tune_cuts(outputs[:, 0], val.labels) if head.name == "regress" else None
    result = EvalResult(
        loss=0.0, keys=val.keys, labels=val.labels, outputs=outputs, head=head, cuts=cuts
    )
    row = {"val_qwk": result.kappa, "val_cut_points": list(cuts) if cuts else None}
    if head.name == "regress":
        row["val_mse"] = squared_error(outputs, val.labels)
    return row


def _outputs(model: FusionHead, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model.eval()(x).numpy()
