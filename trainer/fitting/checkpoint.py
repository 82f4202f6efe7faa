"""Checkpoints: ``checkpoints/last/`` to resume, and writing ``best.pt``
(its format: trainer/base/bestfile.py).

``OUT/checkpoints/last/state.pt`` (rewritten atomically after every epoch; the one before
it is kept as ``checkpoints/previous/``)::

    {"epoch": completed epochs, "model", "optimizer", "scheduler", "scaler" (fp16 only),
     "row": the epoch's metrics line, "best": the best epoch's,
     "rng": [per rank: python, numpy, torch, cuda],
     "world_size", "config"}

Both load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.constants import CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES
from pipeline.errors import UserError
from pipeline.fileio import (
    atomic_write_bytes,
    partial_path,
    reporting_disk_full,
    stale_partials,
)
from trainer.base.bestfile import BEST_FILE, serialized
from trainer.base.decisions import Decisions
from trainer.base.model import load_failure
from trainer.base.normalize import normalization_for

CHECKPOINTS = "checkpoints"
LAST = "last"
PREVIOUS = "previous"  # the checkpoint before last/, kept in case last/ is damaged
STATE_FILE = "state.pt"
INFO_FILE = "info.json"


# ---------------------------------------------------------------- RNG


def rng_state() -> dict:
    """This process's random generators, in types ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list | tuple) else x


# ---------------------------------------------------------------- last/


def last_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / LAST


def save_last(run_dir: str | Path, state: dict) -> Path:
    """Write ``state`` as ``checkpoints/last/`` so that a crash at any moment leaves one whole.

    Written to a temp folder and fsynced; only then does the current ``last/`` become
    ``previous/`` (replacing the one before) and the new folder ``last/``. A failure while
    writing (a full disk: a UserError naming the file) leaves ``last/`` as it was.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    last, previous = root / LAST, root / PREVIOUS
    tmp = partial_path(last)  # host and pid in the name: two writers never share one
    for leftover in [tmp, root / f".{LAST}.partial", *stale_partials(root)]:  # dead writers'
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        with reporting_disk_full(last / STATE_FILE):
            tmp.mkdir()
            with open(tmp / STATE_FILE, "wb") as f:
                f.write(serialized(state))
                f.flush()
                os.fsync(f.fileno())
            info = {
                "epoch": state["epoch"],
                "best": state.get("best"),
                "config": state.get("config"),
            }
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if last.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(last, previous)
    os.rename(tmp, last)
    _fsync_dir(root)
    return last


def load_last(run_dir: str | Path) -> dict | None:
    """The state saved by ``save_last``; None if the run never finished an epoch.

    ``last/`` is missing only in the instant between two renames of ``save_last`` (then
    ``previous/`` is the newest whole checkpoint). A damaged ``state.pt`` is a UserError
    saying what to do.
    """
    root = Path(run_dir) / CHECKPOINTS
    folder = root / LAST if (root / LAST).is_dir() else root / PREVIOUS
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = load_failure(err)[:160]
        fallback = _epoch_of(root / PREVIOUS) if folder.name == LAST else None
        advice = (
            f"move {folder} away to resume from {root / PREVIOUS} (epoch {fallback}), "
            if fallback is not None
            else ""
        )
        raise UserError(
            f"the checkpoint {path} is damaged ({reason}); {advice}or start a new run with another --out"
        ) from None


def _epoch_of(folder: Path) -> int | None:
    """The epoch a checkpoint folder holds, from its small info file; None if unreadable."""
    try:
        return int(json.loads((folder / INFO_FILE).read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- best.pt


def save_best(
    path: str | Path,
    model_state: dict,
    *,
    arch: str,
    image_size: int,
    epoch: int,
    metrics: dict,
    config: dict,
    preprocess: dict | None = None,
    augment: dict | None = None,
    head: str = "classify",
    normalize: tuple | None = None,
) -> None:
    """best.pt (trainer/base/bestfile.py); what val decided is read from ``metrics`` (the
    epoch's metrics line) through ``Decisions``, so a bad value stops here, not in predict."""
    mean, std = normalize or (IMAGENET_MEAN, IMAGENET_STD)
    decisions = Decisions.from_dict(metrics, f"epoch {epoch}'s choices on val")
    payload = {
        "model": {k: v.detach().cpu() for k, v in model_state.items()},
        "arch": arch,
        "head": head,
        "outputs": int(model_state["fc.weight"].shape[0]),  # the head's: 5, 1 (regress) or 4
        "num_classes": NUM_CLASSES,
        "class_names": list(CLASS_NAMES),
        "image_size": image_size,
        "mean": [float(v) for v in mean],  # what training normalised with (--normalize)
        "std": [float(v) for v in std],
        "preprocess": preprocess or {},
        "augment": augment or {},  # what training did to its images (evaluation does none of it)
        # cut_points, temperature, pair_blend, pair_cut_points, referable_threshold
        **decisions.to_dict(),
        "epoch": epoch,
        "metrics": metrics,
        "config": config,
    }
    atomic_write_bytes(path, serialized(payload))


def repair_best(run_dir: str | Path, state: dict) -> None:
    """Rewrite best.pt from last/ when a kill fell between the two (the best epoch is last/'s).

    Per epoch the order is: confusion, last/, best.pt, metrics line; so best.pt is never
    ahead of last/, and can only be behind it in this one way. With --ema, best.pt holds the
    average's weights.
    """
    best = state.get("best")
    if not best or best["epoch"] != state["epoch"]:
        return
    path = Path(run_dir) / BEST_FILE
    if (
        path.is_file()
        and torch.load(path, map_location="cpu", weights_only=True).get("epoch") == state["epoch"]
    ):
        return
    config = state["config"]
    weights = state["model"]
    if (
        "ema" in state
    ):  # trainer.fitting.ema.EMA (AveragedModel's layout): "module."-prefixed weights, n_averaged
        weights = {
            k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")
        }
    save_best(
        path,
        weights,
        arch=config["arch"],
        image_size=config["image_size"],
        epoch=state["epoch"],
        metrics=best,
        config=config,
        preprocess=state.get("preprocess"),
        augment=state.get("augment"),
        head=config.get("head", "classify"),
        # --normalize dataset: the shard folder's statistics, as the run's own saves took them
        normalize=normalization_for(config.get("normalize", "imagenet"), config.get("shards")),
    )


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: equal iff the states are equal."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
