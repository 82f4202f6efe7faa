"""Across datasets: a folder without a test split trains, one without train is refused;
evaluate.py on every image of a folder (--split all) and on several folders (--shards A B C:
the external-validation table); a preprocessing mismatch stops evaluate and predict.

One real training run (1 epoch, 64 px) on a train+val folder, shared by every test here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from pipeline.errors import UserError
from pipeline.manifest import read_manifest
from pipeline.shardformat import read_index
from tests.conftest import build_shard_dir, shared
from trainer.base.metrics import read_confusion_csv
from trainer.base.preprocessing import check_preprocessing, differences
from trainer.smoke import check_run
from trainer.train import choosing_split

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["--image-size", "64", "--batch-size", "8", "--backend", "torch", "--workers", "0"]


def python(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(tmp / "hf"))
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def keys_of(folder: Path, split: str) -> list[str]:
    manifest = read_manifest(folder)
    return [
        r.key
        for shard in manifest.split(split).shards
        for r in read_index(folder / shard.index, shard.file)
    ]


def with_preprocess(folder: Path, **settings) -> Path:
    """Rewrite ``folder``'s manifest as if its images had been prepared with ``settings``."""
    manifest = read_manifest(folder)
    replace(manifest, preprocess={**manifest.preprocess, **settings}).write()
    return folder


@pytest.fixture(scope="session")
def no_test_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """(shard folder with train and val only, its run folder, the training process)."""
    return shared(tmp_path_factory, "no_test_run", _no_test_run)


def _no_test_run(tmp: Path) -> tuple[Path, Path, subprocess.CompletedProcess]:
    shards = build_shard_dir(tmp / "trainval", {"train": 40, "val": 12}, seed=5)
    run = tmp / "run"
    proc = ok(
        python(
            ["trainer/train.py", "--shards", shards, "--out", run, "--epochs", "1", *RECIPE], tmp
        )
    )
    return shards, run, proc


@pytest.fixture(scope="session")
def external_sets(tmp_path_factory) -> dict[str, Path]:
    """Two folders packed for evaluation: test only, and test + val (the second Graham-prepared)."""
    return shared(tmp_path_factory, "external_sets", _external_sets)


def _external_sets(tmp: Path) -> dict[str, Path]:
    return {
        "set_a": build_shard_dir(tmp / "set_a", {"test": 13}, seed=6),
        "set_b": with_preprocess(
            build_shard_dir(tmp / "set_b", {"val": 4, "test": 9}, seed=7), graham=True
        ),
    }


# ---------------------------------------------------------------- training without test / train


def test_a_folder_without_a_test_split_trains_and_says_so(no_test_run, tmp_path):
    shards, shared_run, proc = no_test_run
    run = tmp_path / "run"  # a copy: this test writes an evaluation into it
    shutil.copytree(shared_run, run)
    assert "has no test split: val chooses best.pt" in proc.stdout
    assert "no test split to report" in proc.stdout.strip().splitlines()[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["chosen_on"] == "val" and summary["test_split"] is False
    assert summary["test_at_best_epoch"] is None
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "val_qwk" in row and not any(k.startswith("test_") for k in row)
    assert sorted(p.name for p in (run / "confusion").iterdir()) == [
        "val_epoch_001.csv",
        "val_epoch_001.png",
    ]
    # compare_runs reads it: the row says there was no test split
    from tools.compare_runs import main as compare

    assert compare([str(run), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert table[2].split("|")[3:6] == [" val ", " 1 ", " no test split "]
    # the smoke test's check of a run folder reads val when there is no test: given what
    # evaluate.py writes when it reproduces the logged val figures, it finds nothing wrong
    logged = read_confusion_csv(run / "confusion" / "val_epoch_001.csv")
    again = {"checkpoint_epoch": 1, "confusion": logged.tolist()}
    again |= {k: row[f"val_{k}"] for k in ("acc", "qwk", "recall")}
    again["accuracy"] = again.pop("acc")
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "metrics.json").write_text(json.dumps(again))
    assert check_run(run, SimpleNamespace(epochs=1, shards=str(shards))) == []
    again["qwk"] += 0.5
    (run / "eval" / "metrics.json").write_text(json.dumps(again))
    assert check_run(run, SimpleNamespace(epochs=1, shards=str(shards)))[0].startswith(
        "evaluate.py on best.pt gave"
    )


def test_a_folder_without_train_is_refused_in_one_line(external_sets, tmp_path):
    proc = python(
        [
            "trainer/train.py",
            "--shards",
            external_sets["set_a"],
            "--out",
            tmp_path / "run",
            *RECIPE,
        ],
        tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {external_sets['set_a']} has no train split, nothing to train on (a folder packed "
        "for evaluation only is for trainer/evaluate.py --shards)"
    )


def test_train_alone_has_nothing_to_choose_on(tmp_path):
    manifest = read_manifest(build_shard_dir(tmp_path / "s", {"train": 6}))
    printed = []
    with pytest.raises(UserError, match="neither a val nor a test split"):
        choosing_split(manifest, SimpleNamespace(print=printed.append))
    with_test = read_manifest(build_shard_dir(tmp_path / "t", {"train": 6, "test": 3}))
    assert choosing_split(with_test, SimpleNamespace(print=printed.append)) == "test"
    assert "no val split" in printed[-1]


# ---------------------------------------------------------------- evaluate across folders


@pytest.fixture(scope="session")
def external_eval(
    no_test_run, external_sets, tmp_path_factory
) -> tuple[Path, subprocess.CompletedProcess]:
    return shared(
        tmp_path_factory,
        "external_eval",
        lambda tmp: _external_eval(no_test_run, external_sets, tmp / "out"),
    )


def _external_eval(no_test_run, external_sets, out: Path):
    shards, run, _ = no_test_run
    proc = ok(
        python(
            [
                "trainer/evaluate.py",
                "--checkpoint",
                run / "best.pt",
                "--shards",
                shards,
                external_sets["set_a"],
                external_sets["set_b"],
                "--split",
                "all",
                "--out",
                out,
                "--allow-preprocessing-mismatch",
                *RECIPE[2:4],
            ],
            out.parent,
        )
    )
    return out, proc


def test_several_folders_make_one_table_counting_every_image_once(
    no_test_run, external_sets, external_eval
):
    shards, run, _ = no_test_run
    out, proc = external_eval
    folders = {"trainval": shards, **external_sets}
    table = pd.read_csv(out / "external.csv")
    assert list(table["dataset"]) == list(folders)
    assert list(table.columns) == [
        "dataset",
        "shards",
        "split",
        "images",
        "referable",
        "accuracy",
        "kappa",
        "referable_auc",
        "sensitivity",
        "specificity",
        "any_dr_auc",
    ]
    threshold = json.loads((out / "trainval" / "metrics.json").read_text())["referable_threshold"]
    for row in table.itertuples():
        manifest = read_manifest(folders[row.dataset])
        splits = [s for s, info in manifest.splits.items() if info.samples]
        want_keys = sorted(k for s in splits for k in keys_of(folders[row.dataset], s))
        assert row.images == sum(manifest.splits[s].samples for s in splits) == len(want_keys)
        # the dataset's own predictions: every image once, and the row's figures recomputed from them
        pred = pd.read_csv(out / row.dataset / "predictions.csv")
        assert sorted(pred["key"]) == want_keys
        assert row.referable == (pred["true"] >= 2).sum()
        assert row.accuracy == pytest.approx((pred["true"] == pred["pred"]).mean())
        assert row.kappa == pytest.approx(
            cohen_kappa_score(pred["true"], pred["pred"], weights="quadratic")
        )
        refer = pred["true"] >= 2
        assert row.referable_auc == pytest.approx(
            roc_auc_score(refer, pred["referable_score"]), abs=1e-6
        )
        # the CSV's 8 decimals may round a score equal to the threshold (an operating point is
        # one of the scores) just below it
        flagged = pred["referable_score"] >= threshold - 1e-8
        assert row.sensitivity == pytest.approx(flagged[refer].mean(), abs=1e-6)
        assert row.specificity == pytest.approx((~flagged[~refer]).mean(), abs=1e-6)
        assert row.any_dr_auc == pytest.approx(
            roc_auc_score(pred["true"] >= 1, 1 - pred["p0"]), abs=1e-6
        )
    assert table["images"].tolist() == [52, 13, 13]
    md = (out / "external.md").read_text()
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + 3  # header, datasets
    assert f"P(grade >= 2) >= {threshold:.4f}" in md
    assert Image.open(out / "external_roc.png").size[0] > 300
    # the mismatch was let through, loudly, for set_b only
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "set_b" in warnings[0] and "graham=True" in warnings[0]


def test_one_folder_keeps_todays_outputs(no_test_run, external_sets, external_eval, tmp_path):
    _, run, _ = no_test_run
    out = tmp_path / "one"
    ok(
        python(
            [
                "trainer/evaluate.py",
                "--checkpoint",
                run / "best.pt",
                "--shards",
                external_sets["set_a"],
                "--out",
                out,
                *RECIPE[2:4],
            ],
            tmp_path,
        )
    )
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "confusion_test.csv",
        "confusion_test.png",
        "figures.md",
        "metrics.json",
        "predictions.csv",
        "reliability.png",
        "roc.png",
    ]
    alone = json.loads((out / "metrics.json").read_text())
    among = json.loads((external_eval[0] / "set_a" / "metrics.json").read_text())
    assert alone["split"] == "test" and among["split"] == "all"  # set_a has only test
    for key in (
        "samples",
        "accuracy",
        "qwk",
        "referable_auc",
        "sensitivity",
        "specificity",
        "confusion",
    ):
        assert alone[key] == among[key], key


# ---------------------------------------------------------------- preprocessing mismatch


def test_a_preprocessing_mismatch_stops_evaluate_in_one_line(no_test_run, external_sets):
    from trainer.evaluate import main as evaluate  # stops before it builds anything

    _, run, _ = no_test_run
    with pytest.raises(UserError) as stop:
        evaluate(
            [
                "--checkpoint",
                str(run / "best.pt"),
                "--shards",
                str(external_sets["set_a"]),
                str(external_sets["set_b"]),
            ]
        )
    assert str(stop.value) == (
        f"{run / 'best.pt'} was trained on images prepared with graham=False, but "
        f"{external_sets['set_b']} (its manifest.json) has graham=True; use images prepared "
        "the same way, or pass --allow-preprocessing-mismatch to go on anyway"
    )


def test_what_counts_as_a_mismatch(capsys):
    trained = {"size": 512, "graham": False, "crop_border": True, "jpeg_quality": 95}
    assert differences(trained, {**trained, "jpeg_quality": 90, "pillow": "11"}) == ()
    assert differences(trained, {"size": 512}) == ()  # unrecorded is no evidence
    assert differences(trained, {**trained, "size": 256, "crop_border": False}) == (
        "crop_border",
        "size",
    )
    with pytest.raises(UserError, match="size=512, but shards has size=256"):
        check_preprocessing(trained, {"size": 256}, "best.pt", "shards")
    check_preprocessing(trained, {"size": 256}, "best.pt", "shards", allow=True)
    assert (
        "warning: best.pt was trained on images prepared with size=512" in capsys.readouterr().err
    )


def test_predict_refuses_a_preprocess_option_against_the_checkpoint(no_test_run, tmp_path):
    from tools.predict import main as predict

    _, run, _ = no_test_run
    photo = tmp_path / "10_left.jpeg"
    Image.fromarray(np.full((80, 80, 3), 90, np.uint8)).save(photo)
    args = [
        str(photo),
        "--checkpoint",
        str(run / "best.pt"),
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    with pytest.raises(UserError, match=r"graham=False, but --preprocess graham has graham=True"):
        predict([*args, "--preprocess", "graham"])
    assert predict([*args, "--preprocess", "plain"]) == 0  # agrees with the checkpoint
    assert predict([*args, "--preprocess", "graham", "--allow-preprocessing-mismatch"]) == 0
    assert len(pd.read_csv(tmp_path / "predictions.csv")) == 1
