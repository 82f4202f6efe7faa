"""The run folder's file names, and the one reader and writer of ``metrics.jsonl``.

runs/<name>/
  config.json            resolved options + environment
  metrics.jsonl          one JSON line per finished epoch
  confusion/             {val,test}_epoch_NNN.csv / .png
  checkpoints/last/      to resume (trainer.fitting.checkpoint)
  best.pt                to evaluate and predict (written by trainer.fitting.checkpoint,
                         read by trainer.base.bestfile)
  summary.json           written at the end
  predictions/           {val,test}_epoch_NNN.csv: the best epoch's per-image outputs

``PREDICTIONS_FILE`` is the one per-image table a command writes into its --out folder:
evaluate's (one row per image of a split: key, original path, patient, eye, true and
predicted grade, p0-p4, referable score) and predict's (one row per photograph: image,
grade, p0-p4, referable score, error).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.errors import UserError
from pipeline.fileio import atomic_write_text, reporting_disk_full

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"  # trainer/judging/run_page.py writes it
FUSION_FILE = "fusion.json"  # tools/fuse.py --out RUN writes it: kappa of both eyes
CONFUSION_DIR = "confusion"
PREDICTIONS_FILE = "predictions.csv"


def append_metrics(run_dir: Path, row: dict) -> None:
    """Add an epoch's line, flushed to disk (written after the epoch's checkpoint)."""
    path = Path(run_dir) / METRICS_FILE
    with reporting_disk_full(path), open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: Path) -> list[dict]:
    """The epochs logged so far; a last line cut short (a run in progress, or killed) is ignored."""
    path = Path(run_dir) / METRICS_FILE
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise UserError(f"{path} line {number} is not JSON") from None
        if not isinstance(row, dict) or "epoch" not in row:
            raise UserError(f"{path} line {number} is not an epoch's metrics")
        rows.append(row)
    return rows


def truncate_metrics(run_dir: Path, epochs: int) -> None:
    """Keep the lines of epochs 1..``epochs``: those of an epoch killed before its checkpoint go."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(row, dict) and row.get("epoch", 0) <= epochs:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))
