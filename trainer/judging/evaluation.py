"""One evaluation of a model on a split: every image once, gathered from every rank.

``evaluate`` runs the model over a loader and returns an ``EvalResult``: the keys, true
grades and raw outputs of every image (sorted by key), with the head, the cut-points and
the temperature that turn them into probabilities and grades. Every table and figure of a
run is drawn from such a result; build it by keyword.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor, nn

from pipeline.shardformat import eye_of, patient_of
from trainer.base.distributed import bare, sync_batchnorm_stats
from trainer.base.heads import ClassifyHead, Head
from trainer.base.metrics import (
    accuracy,
    confusion_of,
    quadratic_kappa,
    recall_per_class,
    referable_score,
)
from trainer.base.model import backbone_features
from trainer.judging.calibration import scaled
from trainer.judging.pairing import blend_partners
from trainer.judging.tta import tta_outputs_and_features

CLASSIFY = ClassifyHead()  # the reference recipe's head, the default


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
