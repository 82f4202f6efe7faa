"""One DALI CPU-mode run of two epochs, and its second epoch again from the first one's
checkpoint: the pipeline built ahead for epoch 2 and the one a resume builds give the same
run, and every epoch logs the wait for its first batch (``first_batch_s``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.loading.loader import dali_available
from tests.conftest import metrics_rows
from trainer.fitting.checkpoint import load_last, state_checksum

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("images_per_s", "epoch_s", "first_batch_s")


def train(args: list[str], tmp: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(tmp / "hf"))
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    cmd = [sys.executable, str(ROOT / "trainer" / "train.py"), *args, "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_resume_stays_exact_with_the_pipeline_built_ahead(tiny_shards, tmp_path):
    run = tmp_path / "straight"
    recipe = ["--image-size", "64", "--batch-size", "8", "--backend", "dali", "--workers", "1"]
    train(["--shards", str(tiny_shards), "--out", str(run), "--epochs", "2", *recipe], tmp_path)
    straight = metrics_rows(run)
    assert [r["epoch"] for r in straight] == [1, 2]
    assert all(r["first_batch_s"] > 0 for r in straight)

    # the same run stopped after epoch 1: its checkpoint then was last/, now previous/
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    checkpoints = resumed / "checkpoints"
    shutil.rmtree(checkpoints / "last")
    (checkpoints / "previous").rename(checkpoints / "last")
    (resumed / "metrics.jsonl").write_text(json.dumps(straight[0]) + "\n")
    train(["--out", str(resumed), "--resume", "--workers", "1"], tmp_path)

    def untimed(r):
        return {k: v for k, v in r.items() if k not in TIMING}

    assert [untimed(r) for r in metrics_rows(resumed)] == [untimed(r) for r in straight]
    assert metrics_rows(resumed)[1]["first_batch_s"] > 0
    assert state_checksum(load_last(resumed)["model"]) == state_checksum(load_last(run)["model"])
