"""Both eyes by feature fusion: a small second-stage head on [own eye, partner eye] features.

The method of Huang et al. 2023 and of the Kaggle 2015 leaders, in the form ``dr-fuse``
(tools/fuse.py) runs it: the trained network is frozen; every image's pooled backbone
features are extracted once, without augmentation; a two-layer head reads each image's
features beside its partner's (an eye whose partner is not in the set is paired with
itself) and gives the outputs the network's own head gives (5 logits, one score or 4
cumulative logits), trained with that head's loss on the train split.

Each eye keeps its own evidence first. The fused outputs are the eye's own outputs (the
network's head, unchanged) plus a correction read from the patient's two eyes as a pair
(their features' sum and absolute difference), which is the same for both eyes of a
patient: it can move a patient's two eyes together, never swap them (the regress score
keeps the single eye's order exactly). While it trains, the partner is dropped (the eye
paired with itself) in ``FusionSettings.drop_partner`` of the rows, so the correction
does not learn to stand in for the eye. A head trained otherwise (the partner's features
read freely) turned a healthy eye scored 0.039 alone into grade 4 beside a grade-4
partner. The asymmetric-pairs table of docs/benchmarks.md measures it. Its epoch is chosen
on val by the rule of trainer/judging/selection.py; for the regress head its cut-points, and for
every head its referable operating point, are then tuned on val at that epoch.

Stored in best.pt under ``"fusion"`` (``checkpoint.add_to_best``)::

    {"state": the head's state dict (with the train split's feature mean and std),
     "residual": True (the correction form above; older heads are refused), "features": D, "hidden": H, "outputs": k, "cut_points" (regress) or None,
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

from pipeline.errors import UserError
from trainer.base.heads import Head, tune_cuts
from trainer.base.metrics import REFERABLE_GRADE, operating_threshold, referable_score
from trainer.judging.evaluation import EvalResult
from trainer.judging.options import FUSION_KEY, HIDDEN  # noqa: F401
from trainer.judging.pairing import partner_index
from trainer.judging.selection import selection_for, squared_error


class FusionHead(nn.Module):
    """[own, partner] features (N, 2D) and the eye's own outputs (N, k) to the fused outputs
    (N, k): own outputs + a correction of the pair (their sum and absolute difference,
    standardised by the train split's statistics), the same for both eyes of a patient."""

    def __init__(self, features: int, outputs: int, hidden: int = HIDDEN):
        super().__init__()
        self.features = features
        self.register_buffer("mean", torch.zeros(2 * features))
        self.register_buffer("std", torch.ones(2 * features))
        self.net = nn.Sequential(
            nn.Linear(2 * features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, outputs)
        )
        nn.init.zeros_(self.net[-1].weight)  # it starts as the eye alone
        nn.init.zeros_(self.net[-1].bias)

    def pair_of(self, pairs: torch.Tensor) -> torch.Tensor:
        """What both eyes of a patient share: the features' sum and absolute difference."""
        own, partner = pairs[:, : self.features], pairs[:, self.features :]
        return torch.cat([own + partner, (own - partner).abs()], dim=1)

    def forward(self, pairs: torch.Tensor, own_outputs: torch.Tensor) -> torch.Tensor:
        return own_outputs + self.net((self.pair_of(pairs) - self.mean) / self.std)


@dataclass
class FusionSettings:
    epochs: int = 30
    lr: float = 0.01  # SGD, Nesterov momentum 0.9, gradient norm clipped at 1
    batch_size: int = 64
    hidden: int = HIDDEN
    weight_decay: float = 5e-4
    seed: int = 0
    drop_partner: float = 0.5  # share of training rows whose partner is replaced by the eye


def pair_features(keys: Sequence[str], features: np.ndarray) -> np.ndarray:
    """(N, 2D): each image's features beside its partner's (its own when it has none here)."""
    partner = partner_index(keys)
    other = np.where(partner[:, None] >= 0, features[np.maximum(partner, 0)], features)
    return np.concatenate([features, other], axis=1).astype(np.float32)


def has_pairs(keys: Sequence[str]) -> bool:
    return bool((partner_index(keys) >= 0).any())


def fused_outputs(
    fusion: dict, keys: Sequence[str], features: np.ndarray, outputs: np.ndarray
) -> np.ndarray:
    """The stored fusion head's outputs (N, k) for images ``keys``, their features and their
    own (single-eye) outputs, on the CPU in float32 (so evaluate and predict compute the
    same numbers)."""
    if not fusion.get("residual"):
        raise UserError(
            "the checkpoint's fusion head was trained by an older dr-fuse, whose outputs could "
            "overrule an eye's own evidence; run dr-fuse on it again"
        )
    head = FusionHead(int(fusion["features"]), int(fusion["outputs"]), int(fusion["hidden"]))
    head.load_state_dict(fusion["state"])
    pairs = torch.from_numpy(pair_features(keys, features))
    with torch.inference_mode():
        return head.eval()(pairs, torch.from_numpy(np.asarray(outputs, np.float32))).numpy()


def fused_result(fusion: dict, alone: EvalResult) -> EvalResult:
    """``alone`` (an evaluation with features) with the fusion head's outputs and cut-points;
    the single eye's temperature does not apply to them."""
    cuts = fusion.get("cut_points")
    return replace(
        alone,
        outputs=fused_outputs(fusion, alone.keys, alone.features, alone.outputs),
        cuts=tuple(cuts) if cuts else None,
        temperature=None,
    )


def train_fusion(train: EvalResult, val: EvalResult, head: Head, settings: FusionSettings) -> dict:
    """Train the fusion head on ``train``'s features, choose its epoch on ``val``: the dict
    stored in best.pt (module docstring), without "kappa" and "settings"."""
    torch.manual_seed(settings.seed)
    x = torch.from_numpy(pair_features(train.keys, train.features))
    own = torch.from_numpy(np.asarray(train.outputs, np.float32))
    y = torch.from_numpy(train.labels).long()
    x_val = torch.from_numpy(pair_features(val.keys, val.features))
    own_val = torch.from_numpy(np.asarray(val.outputs, np.float32))
    model = FusionHead(train.features.shape[1], head.outputs, settings.hidden)
    shared = model.pair_of(x)
    model.mean.copy_(shared.mean(0))
    model.std.copy_(shared.std(0).clamp(min=1e-6))
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
            pairs = drop_partners(x[batch], settings.drop_partner, order)
            loss_sum, weight_sum = head.loss_sums(model(pairs, own[batch]), y[batch], None)
            optimizer.zero_grad(set_to_none=True)
            (loss_sum / weight_sum).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss_sum.detach() / weight_sum))
        row = {"epoch": epoch, "train_loss": float(np.mean(losses))}
        row |= judge(model, x_val, own_val, val, head)
        history.append(row)
        if selection.better(row, best):
            best, best_state = row, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    outputs = _outputs(model, x_val, own_val)
    cuts = best.get("val_cut_points")
    chosen = EvalResult(
        loss=0.0, keys=val.keys, labels=val.labels, outputs=outputs, head=head,
        cuts=tuple(cuts) if cuts else None,
    )  # fmt: skip
    threshold = operating_threshold(chosen.labels >= REFERABLE_GRADE, referable_score(chosen.probs))
    return {
        "state": {k: v.detach().clone() for k, v in best_state.items()},
        "residual": True,
        "features": int(train.features.shape[1]),
        "hidden": settings.hidden,
        "outputs": head.outputs,
        "cut_points": cuts,
        "referable_threshold": threshold,
        "epoch": best["epoch"],
        "selected_by": selection.key,
        "history": history,
    }


def drop_partners(pairs: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """``pairs`` (N, 2D) with the partner half of about ``share`` of the rows replaced by the
    eye's own features (as for an eye whose partner is absent)."""
    half = pairs.shape[1] // 2
    dropped = torch.rand(len(pairs), generator=generator) < share
    out = pairs.clone()
    out[dropped, half:] = pairs[dropped, :half]
    return out


def judge(
    model: FusionHead, x_val: torch.Tensor, own_val: torch.Tensor, val: EvalResult, head: Head
) -> dict:
    """One epoch's val figures: kappa (the regress head's at cut-points tuned here), MSE."""
    outputs = _outputs(model, x_val, own_val)
    cuts = tune_cuts(outputs[:, 0], val.labels) if head.name == "regress" else None
    result = EvalResult(
        loss=0.0, keys=val.keys, labels=val.labels, outputs=outputs, head=head, cuts=cuts
    )
    row = {"val_qwk": result.kappa, "val_cut_points": list(cuts) if cuts else None}
    if head.name == "regress":
        row["val_mse"] = squared_error(outputs, val.labels)
    return row


def _outputs(model: FusionHead, x: torch.Tensor, own: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model.eval()(x, own).numpy()
