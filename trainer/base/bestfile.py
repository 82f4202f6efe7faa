"""best.pt: the file evaluate, predict, fuse, export and the report read.

``OUT/best.pt`` (the epoch with the highest val kappa, or lowest val MSE for a regress head
on a small val split: trainer/selection.py; test's when the shards have no val split) holds everything evaluation and prediction need, with nothing else::

    {"model": state dict, "arch", "num_classes", "class_names", "image_size",
     "mean", "std" (--normalize's, on the 0-255 pixel scale), "preprocess" (the shard
     manifest's: size, graham, ... -- how new photographs must be prepared),
     "augment" (the training augmentation), "head" and "outputs" (classify 5, regress 1,
     ordinal 4), "cut_points" (regress), "pair_blend" (both eyes), "pair_cut_points"
     (regress, both eyes blended), "referable_threshold" (the screening operating point),
     "temperature" (classify/ordinal: outputs / T before the softmax or sigmoid;
     trainer.calibration): the last five chosen on val, one ``Decisions``
     (trainer/base/decisions.py) that ``open_best`` reads back checked; "fusion" (written by tools/fuse.py:
     trainer/fusion.py); "epoch", "metrics", "config"}

It loads with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, dicts.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.fileio import atomic_write_bytes
from trainer.base.decisions import Decisions
from trainer.base.heads import Head, build_head
from trainer.base.model import build_model, load_failure

BEST_FILE = "best.pt"


def serialized(obj) -> bytes:
    """``obj`` as the bytes ``torch.save`` writes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load_best(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """The model of ``best.pt`` in eval mode on ``device``, and the rest of the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        info = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read the checkpoint {path} ({load_failure(err)})") from None
    if problem := best_problem(info):
        raise UserError(f"{path} is not a usable best.pt: {problem}")
    outputs = int(info.get("outputs", info["num_classes"]))
    model = build_model(info["arch"], outputs)  # an unknown arch: its own message
    try:
        model.load_state_dict(info.pop("model"))
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0])
        raise UserError(
            f"{path}: its weights do not fit a {info['arch']} with {outputs} outputs "
            f"({detail[:200]}); was it edited, or written for another arch?"
        ) from None
    return model.to(device).eval(), info


@dataclass(frozen=True, kw_only=True)
class Best:
    """A best.pt opened for use: the model (eval mode), its head, what val decided, and the
    rest of the file (``info``: arch, image size, normalisation, preprocessing, config...)."""

    path: Path
    model: torch.nn.Module
    head: Head
    decisions: Decisions
    info: dict

    @property
    def normalize(self) -> tuple[list[float], list[float]] | None:
        """The mean and std training normalised with (None: a checkpoint older than them)."""
        return (self.info["mean"], self.info["std"]) if "mean" in self.info else None


def open_best(path: str | Path, device: str | torch.device = "cpu") -> Best:
    """The one way evaluate, predict, fuse and the report read a best.pt: its model, head
    and decisions, each decision checked (a bad one is one line naming the file)."""
    model, info = load_best(path, device)
    head, _ = head_of(info)
    decisions = Decisions.from_dict(info, str(path))
    return Best(path=Path(path), model=model, head=head, decisions=decisions, info=info)


def best_problem(info) -> str | None:
    """What makes a loaded best.pt unusable (a field missing or of the wrong kind), or None.
    Every field evaluate, predict and fuse read is checked here, before any work starts."""
    if not isinstance(info, dict):
        return f"it holds a {type(info).__name__}, not the dict train.py writes"
    for key in ("model", "arch", "image_size"):
        if key not in info:
            return f"it has no {key!r}"
    if "outputs" not in info and "num_classes" not in info:
        return "it has neither 'outputs' nor 'num_classes'"
    model = info["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        return "its 'model' is not a state dict (a dict of tensors)"
    checks = {
        "arch": lambda v: isinstance(v, str),
        "image_size": lambda v: _number(v) and int(v) == v and v >= 16,
        "outputs": lambda v: _number(v) and int(v) == v and v >= 1,
        "num_classes": lambda v: _number(v) and int(v) == v and v >= 1,
        "temperature": lambda v: v is None or (_number(v) and v > 0),
        "mean": lambda v: v is None or _numbers(v, 3),
        "std": lambda v: v is None or (_numbers(v, 3) and min(v) > 0),
        "cut_points": lambda v: v is None or _numbers(v),
        "referable_threshold": lambda v: v is None or _number(v),
        "preprocess": lambda v: v is None or isinstance(v, dict),
        "config": lambda v: v is None or isinstance(v, dict),
    }
    for key, ok in checks.items():
        if key in info and not ok(info[key]):
            return f"its {key!r} is {str(info[key])[:40]!r}, {_WANTED[key]}"
    return None


_WANTED = {
    "arch": "not an architecture name",
    "image_size": "not a size in pixels",
    "outputs": "not a number of outputs",
    "num_classes": "not a number of classes",
    "temperature": "not a positive number",
    "mean": "not three numbers (one per channel)",
    "std": "not three positive numbers (one per channel)",
    "cut_points": "not a list of numbers",
    "referable_threshold": "not a number",
    "preprocess": "not a dict of settings",
    "config": "not a dict of options",
}


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value, count: int | None = None) -> bool:
    return (
        isinstance(value, list | tuple)
        and (count is None or len(value) == count)
        and all(_number(v) for v in value)
    )


def head_of(info: dict) -> tuple[Head, tuple[float, ...] | None]:
    """The head of a loaded best.pt and its cut-points (regress; None otherwise)."""
    cuts = info.get("cut_points")
    # a checkpoint written before MSE became the default trained with smooth L1
    loss = (info.get("config") or {}).get("regress_loss", "smoothl1")
    return build_head(info.get("head", "classify"), regress_loss=loss), tuple(
        cuts
    ) if cuts else None


def add_to_best(path: str | Path, key: str, value) -> None:
    """Store ``value`` under ``key`` in an existing best.pt (atomically: a crash leaves the
    old file whole). tools/fuse.py keeps the fusion head beside the weights it reads."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload[key] = value
    atomic_write_bytes(path, serialized(payload))
