"""The results tools on real tiny runs: evaluate reproduces the trainer, compare_runs reads runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import TRAIN, launch, metrics_rows, python, shared
from trainer.base.metrics import read_confusion_csv

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


@pytest.fixture(scope="module")
def two_runs(straight_run, tiny_shards, tmp_path_factory) -> tuple[Path, Path]:
    """A constant-lr run of its own (2 epochs) and conftest's straight run (cosine, class
    weights, 2 epochs)."""

    def build(tmp: Path) -> Path:
        python(TRAIN, "--shards", tiny_shards, "--out", tmp / "constant", "--epochs", "2",
               *RECIPE, tmp=tmp)  # fmt: skip
        return tmp / "constant"

    return shared(tmp_path_factory, "constant_run", build), straight_run


@pytest.fixture(scope="module")
def evaluated(tiny_shards, tmp_path_factory):
    """``evaluated(run_dir, processes)``: evaluate.py on the run's best.pt on test through
    ``accelerate launch`` on that many ranks, once per test session; its output folder and
    stdout."""

    def evaluate(run_dir: Path, processes: int) -> tuple[Path, str]:
        def build(out: Path) -> tuple[Path, str]:
            proc = launch(
                "trainer/evaluate.py",
                *("--checkpoint", run_dir / "best.pt", "--shards", tiny_shards, "--out", out),
                tmp=out,
                processes=processes,
            )
            return out, proc.stdout

        return shared(tmp_path_factory, f"eval-{run_dir.name}-{processes}", build)

    return evaluate


def best_row(run_dir: Path) -> dict:
    return max(
        metrics_rows(run_dir), key=lambda r: r["test_qwk"]
    )  # best.pt keeps the first epoch of the top kappa


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_evaluate_reproduces_the_trainers_numbers(two_runs, evaluated, processes):
    for run_dir in two_runs:  # the second run weights its loss by class
        out, stdout = evaluated(run_dir, processes)
        got = json.loads((out / "metrics.json").read_text())
        want = best_row(run_dir)
        assert got["samples"] == 13 and got["world_size"] == processes
        assert got["accuracy"] == want["test_acc"]
        assert got["qwk"] == want["test_qwk"]
        assert got["recall"] == want["test_recall"]
        assert math.isclose(got["loss"], want["test_loss"], rel_tol=1e-5)
        # screening: the threshold best.pt carries (chosen by the trainer), applied unchanged
        assert got["referable_threshold_from"] == "the checkpoint (chosen on val)"
        assert got["referable_threshold"] == want["referable_threshold"]
        assert (got["sensitivity"], got["specificity"]) == (
            want["test_sensitivity"],
            want["test_specificity"],
        )
        for auc in ("referable_auc", "any_dr_auc"):
            assert got[auc] == pytest.approx(want[f"test_{auc}"], abs=1e-12), auc
        logged = read_confusion_csv(run_dir / "confusion" / f"test_epoch_{want['epoch']:03d}.csv")
        assert (read_confusion_csv(out / "confusion_test.csv") == logged).all()
        assert Image.open(out / "confusion_test.png").size[0] > 300
        assert f"kappa {want['test_qwk']:.4f}" in stdout


@pytest.mark.slow
def test_per_image_scores_are_the_same_set_on_1_2_and_3_ranks(two_runs, evaluated):
    from sklearn.metrics import roc_auc_score

    tables = {}
    for processes in (1, 2, 3):
        out, _ = evaluated(two_runs[1], processes)
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


def test_evaluate_bad_split_is_one_sentence(tiny_shards, tmp_path):
    from trainer.base.model import build_model
    from trainer.fitting.checkpoint import save_best

    checkpoint = tmp_path / "best.pt"  # an untrained model: the split is checked first
    save_best(
        checkpoint,
        build_model("resnet18").state_dict(),
        arch="resnet18",
        image_size=64,
        epoch=1,
        metrics={},
        config={"backend": "torch"},
    )
    proc = python(
        "trainer/evaluate.py",
        *("--checkpoint", checkpoint, "--shards", tiny_shards, "--split", "val"),
        tmp=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: split 'val' is empty or missing in {tiny_shards / 'manifest.json'}"
    )


@pytest.mark.slow
def test_compare_runs_on_two_real_runs(two_runs, tmp_path):
    out = tmp_path / "compare"
    proc = python("tools/compare_runs.py", *two_runs, "--out", out, tmp=tmp_path)
    assert Image.open(out / "compare.png").size[0] > 1000
    table = (out / "compare.md").read_text()
    assert "| resnet18, classify, from scratch (constant) | 2/2 |" in table
    assert (
        f"| resnet18, classify, from scratch ({two_runs[1].name}) | 2/2 |" in table
    )  # the folder's name
    assert table.strip() in proc.stdout
