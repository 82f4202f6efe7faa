"""--resume: what a run folder holds to continue from, read before the accelerator is built
(the saved config decides how it is built), and its metrics.jsonl put back in step with the
checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import UserError
from trainer.base.runfiles import (
    CONFIG_FILE,
    METRICS_FILE,
    append_metrics,
    read_metrics,
    truncate_metrics,
)
from trainer.fitting.checkpoint import last_dir, load_last
from trainer.fitting.config import TrainConfig

if TYPE_CHECKING:
    from trainer.fitting.engine import Position


def resumed(cfg: TrainConfig, given: set[str]) -> tuple[dict | None, str | None]:
    """--resume: the run's last checkpoint, or (a run that never finished an epoch) a note
    saying that it starts again at epoch 1. Every rank reads it: the saved config decides
    how the accelerator is built."""
    if not cfg.out:
        raise UserError("--resume needs --out DIR, the folder of the run to continue")
    state = load_last(cfg.out)
    if state is not None:
        return state, None
    saved_config(Path(cfg.out))  # no run there at all: "nothing to resume"
    return None, f"{cfg.out} has no complete epoch to resume from; starting at epoch 1"


def saved_config(out: Path) -> dict:
    """The config of a run that never finished an epoch (its config.json), for --resume."""
    try:
        return json.loads((out / CONFIG_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"nothing to resume: {out} holds no run (no checkpoint, no {CONFIG_FILE})"
        ) from None


def restore_metrics(out: Path, state: dict) -> None:
    """metrics.jsonl as of the checkpoint: lines of a later, unfinished epoch go (a run of an
    older version wrote them first), and the checkpoint's own epoch line is added back if a
    kill fell between the checkpoint and its line."""
    truncate_metrics(out, state["epoch"])
    rows = read_metrics(out) if (out / METRICS_FILE).is_file() else []
    if state.get("row") and (not rows or rows[-1]["epoch"] < state["epoch"]):
        append_metrics(out, state["row"])


def holds_run(cfg: TrainConfig) -> bool:
    """--resume auto: whether --out holds a run to continue (else one is started there)."""
    if not cfg.out:
        raise UserError("--resume auto needs --out DIR, the folder of the run to continue or start")
    out = Path(cfg.out)
    files = (out / METRICS_FILE, out / CONFIG_FILE, last_dir(out))
    return any(path.exists() for path in files)


def position_in_epoch(state: dict, world_size: int, rank: int) -> Position | None:
    """Where in its next epoch a preempted run stopped, for this rank; None at an epoch's end.

    Each rank reads its own slice of the epoch, so the middle of an epoch is the same place
    only on as many ranks as wrote it; an epoch-end checkpoint resumes on any number."""
    from trainer.fitting.engine import Position

    if not state.get("step"):
        return None
    partial = state["partial"]
    if len(partial) != world_size:
        raise UserError(
            f"the run stopped inside epoch {state['epoch'] + 1} on {len(partial)} process(es); "
            f"resume it on {len(partial)} (each rank's place in an epoch is its own slice)"
        )
    return Position(state["step"], tuple(partial[rank]))
