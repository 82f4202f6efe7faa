"""The results tools on real tiny runs: evaluate reproduces the trainer, compare_runs reads runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from trainer.metrics import read_confusion_csv

ROOT = Path(__file__).resolve().parents[1]
RECIPE = [
    "--image-size",
    "64",
    "--batch-size",
    "8",
    "--backend",
    "torch",
    "--workers",
    "0",
    "--quiet",
]


def run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(tmp / "hf"))
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def two_runs(tiny_shards, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("runs")
    a, b = tmp / "constant", tmp / "cosine"
    run(
        [
            sys.executable,
            "trainer/train.py",
            "--shards",
            str(tiny_shards),
            "--out",
            str(a),
            "--epochs",
            "2",
            *RECIPE,
        ],
        tmp,
    )
    run(
        [
            sys.executable,
            "trainer/train.py",
            "--shards",
            str(tiny_shards),
            "--out",
            str(b),
            "--epochs",
            "1",
            "--schedule",
            "cosine",
            "--class-weights",
            "sqrt",
            *RECIPE,
        ],
        tmp,
    )
    return a, b


def best_row(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(rows, key=lambda r: r["test_qwk"])  # best.pt keeps the first epoch of the top kappa


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_evaluate_reproduces_the_trainers_numbers(two_runs, tiny_shards, tmp_path, processes):
    for run_dir in two_runs:  # the second run weights its loss by class
        out = tmp_path / f"eval-{run_dir.name}"
        proc = launch_evaluate(run_dir, tiny_shards, out, processes, tmp_path)
        got = json.loads((out / "metrics.json").read_text())
        want = best_row(run_dir)
        assert got["samples"] == 13 and got["world_size"] == processes
        assert got["accuracy"] == want["test_acc"]
        assert got["qwk"] == want["test_qwk"]
        assert got["recall"] == want["test_recall"]
        assert math.isclose(got["loss"], want["test_loss"], rel_tol=1e-5)
        logged = read_confusion_csv(run_dir / "confusion" / f"test_epoch_{want['epoch']:03d}.csv")
        assert (read_confusion_csv(out / "confusion_test.csv") == logged).all()
        assert Image.open(out / "confusion_test.png").size[0] > 300
        assert f"kappa {want['test_qwk']:.4f}" in proc.stdout


def launch_evaluate(run_dir: Path, shards: Path, out: Path, processes: int, tmp: Path, *more):
    multi = ["--multi_gpu"] if processes > 1 else []
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *multi,
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_processes",
        str(processes),
        "trainer/evaluate.py",
        "--checkpoint",
        str(run_dir / "best.pt"),
        "--shards",
        str(shards),
        "--out",
        str(out),
        *more,
    ]
    return run(cmd, tmp)


@pytest.mark.slow
def test_per_image_scores_are_the_same_set_on_1_2_and_3_ranks(two_runs, tiny_shards, tmp_path):
    from sklearn.metrics import roc_auc_score

    tables = {}
    for processes in (1, 2, 3):
        out = tmp_path / f"eval-{processes}"
        launch_evaluate(two_runs[1], tiny_shards, out, processes, tmp_path)
        tables[processes] = pd.read_csv(out / "predictions.csv")
        metrics = json.loads((out / "metrics.json").read_text())
        table = tables[processes]
        assert len(table) == 13 and table["key"].is_unique
        # the AUC evaluate reports is sklearn's on the file it wrote
        auc = roc_auc_score(table["true"] >= 2, table["p2"] + table["p3"] + table["p4"])
        assert metrics["referable_auc"] == pytest.approx(auc, abs=1e-9)
        assert np.allclose(
            table["referable_score"], table[["p2", "p3", "p4"]].sum(axis=1), atol=2e-8
        )
    for processes in (2, 3):
        pd.testing.assert_frame_equal(tables[processes], tables[1], atol=1e-6)
    # and it is the AUC the trainer logged for that epoch
    assert metrics["referable_auc"] == pytest.approx(
        best_row(two_runs[1])["test_referable_auc"], abs=1e-9
    )


def test_evaluate_bad_split_is_one_sentence(two_runs, tiny_shards, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "trainer/evaluate.py",
            "--checkpoint",
            str(two_runs[0] / "best.pt"),
            "--shards",
            str(tiny_shards),
            "--split",
            "val",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: split 'val' is empty or missing in {tiny_shards / 'manifest.json'}"
    )


@pytest.mark.slow
def test_compare_runs_on_two_real_runs(two_runs, tmp_path):
    out = tmp_path / "compare"
    proc = run(
        [sys.executable, "tools/compare_runs.py", *map(str, two_runs), "--out", str(out)], tmp_path
    )
    assert Image.open(out / "compare.png").size[0] > 1000
    table = (out / "compare.md").read_text()
    assert "| resnet18, from scratch (constant) | 2/2 |" in table
    assert "| resnet18, from scratch (cosine) | 1/1 |" in table
    assert table.strip() in proc.stdout
