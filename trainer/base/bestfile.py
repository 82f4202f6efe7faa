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
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.fileio import atomic_write_bytes
from trainer.base.decisions import Decisions
from trainer.base.heads import Head, build_head
from trainer.base.model import build_model

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
        model = build_model(info["arch"], info.get("outputs", info["num_classes"]))
    except (KeyError, TypeError) as err:
        raise UserError(f"{path} is not a best.pt written by trainer/train.py (no {err})") from None
    except Exception as err:
        raise UserError(f"cannot read the checkpoint {path} ({type(err).__name__})") from None
    model.load_state_dict(info.pop("model"))
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
