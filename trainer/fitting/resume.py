"""--resume: what a run folder holds to continue from, read before the accelerator is built
(the saved config decides how it is built), and its metrics.jsonl put back in step with the
checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import UserError
from trainer.base.runfiles import (
    CONFIG_FILE,
    METRICS_FILE,
    append_metrics,
    read_metrics,
    truncate_metrics,
)
from trainer.fitting.checkpoint import load_last
from trainer.fitting.config import TrainConfig


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
