"""One evaluation of a model on a split: every image once, gathered from every rank.

``evaluate`` runs the model over a loader and returns an ``EvalResult``: the keys, true
grades and raw outputs of every image (sorted by key), with the head, the cut-points and
the temperature that turn them into probabilities and grades. Every table and figure of a
run is drawn from such a result; build it by keyword.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor, nn

from pipeline.errors import UserError
from pipeline.loading.contract import Loader
from pipeline.loading.loader import EvalSpec, build_loader
from pipeline.shardformat import eye_of, patient_of
from trainer.base.bestfile import Best
from trainer.base.decisions import Decisions
from trainer.base.distributed import bare, resolve_precision, sync_batchnorm_stats
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


@dataclass(kw_only=True)
class EvalResult:
    """A split's evaluation: every image once (gathered from all ranks, sorted by key), its
    raw head outputs, and what they become with the head, its cut-points and temperature.
    Keyword-only: a positional call once put the temperature into ``features``."""

    loss: float = float("nan")  # nan: rebuilt from a predictions table, no loss there
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

    def decided(self, decisions: Decisions) -> EvalResult:
        """This split read with what val decided: its cut-points and its temperature."""
        return replace(self, cuts=decisions.cut_points, temperature=decisions.temperature)

    def both_eyes(self, decisions: Decisions) -> EvalResult:
        """Each eye blended with its partner at val's weight (and cut-points for blends)."""
        return self.paired(decisions.pair_blend, decisions.blend_cuts)

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
    return EvalResult(
        loss=loss,
        keys=keys,
        labels=labels,
        outputs=outputs,
        head=head,
        cuts=cuts,
        features=features,
    )


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


# ---------------------------------------------------------------- a best.pt, evaluated again


def checkpoint_accelerator(info: dict) -> Accelerator:
    """An Accelerator with the checkpoint's precision (the trainer's), every GPU or the CPU."""
    cuda = torch.cuda.is_available()
    precision = (info.get("config") or {}).get("precision", "auto")
    return Accelerator(cpu=not cuda, mixed_precision=resolve_precision(precision, cuda))


def checkpoint_loader(
    best: Best,
    shards: Path,
    split: str,
    accelerator: Accelerator,
    batch_size: int | None = None,
    backend: str | None = None,
    workers: int | None = None,
) -> Loader:
    """This rank's evaluation loader (with keys) of ``split``, as the trainer built it: the
    checkpoint's batch size, image size, seed, normalisation and backend unless given."""
    info = best.info
    cfg = info.get("config") or {}
    batch_size = batch_size or cfg.get("batch_size", 8)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    spec = EvalSpec(
        split=split,
        batch_size=batch_size,
        image_size=int(info["image_size"]),
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=cfg.get("seed", 0),
        backend=backend or cfg.get("backend", "auto"),
        device=accelerator.device,
        workers=workers,
        channels_last=accelerator.device.type == "cuda",
        with_keys=True,
        normalize=best.normalize,
    )
    return build_loader(shards, spec)


def evaluate_best(
    best: Best,
    model: nn.Module,
    accelerator: Accelerator,
    shards: Path,
    split: str,
    *,
    expected: int | None = None,
    class_weights: Tensor | None = None,
    loader_options: dict | None = None,
    with_features: bool = False,
    tta: bool = False,
) -> tuple[EvalResult, str]:
    """One split of ``shards`` through best.pt's model (``model``: it, prepared), exactly as
    the trainer evaluated it, read with the checkpoint's decisions: the one path evaluate,
    fuse and the report take; and the loader backend that read it. ``loader_options``:
    batch_size, backend, workers."""
    loader = checkpoint_loader(best, shards, split, accelerator, **(loader_options or {}))
    try:
        result = evaluate(
            model,
            loader,
            accelerator,
            best.head,
            class_weights,
            expected=expected,
            with_features=with_features,
            tta=tta,
        )
    finally:
        loader.close()
    return result.decided(best.decisions), loader.backend
