"""trainer/fitting/checkpoint.py: atomic last/, RNG round trip, best.pt on its own, metrics truncation."""

import json
import random
import shutil

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.fileio import HOST
from trainer.base.bestfile import BEST_FILE, load_best
from trainer.base.model import build_model
from trainer.base.runfiles import truncate_metrics
from trainer.fitting.checkpoint import (
    load_last,
    repair_best,
    rng_state,
    save_best,
    save_last,
    set_rng_state,
    state_checksum,
)


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    draws()
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = draws()
    draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_last_is_replaced_atomically_and_survives_a_crash_between_renames(tmp_path):
    assert load_last(tmp_path) is None  # no epoch finished yet
    model = build_model("resnet18")
    for epoch in (1, 2, 3):
        save_last(
            tmp_path, {"epoch": epoch, "model": model.state_dict(), "config": {"arch": "resnet18"}}
        )
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["last", "previous"]
    assert load_last(tmp_path)["epoch"] == 3
    assert json.loads((root / "last" / "info.json").read_text())["epoch"] == 3
    assert json.loads((root / "previous" / "info.json").read_text())["epoch"] == 2
    # killed between "last -> previous" and ".last.partial -> last": previous/ is the newest whole one
    shutil.rmtree(root / "previous")
    (root / "last").rename(root / "previous")
    (root / f".last.{HOST}.999999999.partial").mkdir()  # a dead writer's half: never read
    assert load_last(tmp_path)["epoch"] == 3
    save_last(tmp_path, {"epoch": 4, "model": {}, "config": {}})
    assert sorted(p.name for p in root.iterdir()) == ["last", "previous"]
    assert load_last(tmp_path)["epoch"] == 4


def test_best_is_enough_to_predict(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18").eval()
    row = {"epoch": 4, "test_qwk": 0.5}
    save_best(
        tmp_path / BEST_FILE,
        model.state_dict(),
        arch="resnet18",
        image_size=64,
        epoch=4,
        metrics=row,
        config={"arch": "resnet18", "image_size": 64},
    )
    loaded, info = load_best(tmp_path / BEST_FILE)
    assert {
        "arch",
        "num_classes",
        "class_names",
        "image_size",
        "mean",
        "std",
        "epoch",
        "metrics",
        "config",
    } <= set(info)
    assert info["image_size"] == 64 and info["metrics"] == row and len(info["mean"]) == 3
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(UserError, match="does not exist"):
        load_best(tmp_path / "nope.pt")


def test_repair_best_after_a_kill_between_last_and_best(tmp_path):
    model = build_model("resnet18")
    config = {"arch": "resnet18", "image_size": 64}
    state = {
        "epoch": 2,
        "model": model.state_dict(),
        "config": config,
        "best": {"epoch": 2, "test_qwk": 0.7},
    }
    save_best(
        tmp_path / BEST_FILE,
        build_model("resnet18").state_dict(),
        arch="resnet18",
        image_size=64,
        epoch=1,
        metrics={"epoch": 1},
        config=config,
    )
    repair_best(tmp_path, state)
    _, info = load_best(tmp_path / BEST_FILE)
    assert info["epoch"] == 2 and info["metrics"]["test_qwk"] == 0.7
    state["best"] = {"epoch": 1, "test_qwk": 0.9}  # best is an older epoch: best.pt is left alone
    repair_best(tmp_path, state)
    assert load_best(tmp_path / BEST_FILE)[1]["epoch"] == 2


def test_truncate_metrics_drops_lines_after_the_checkpoint(tmp_path):
    lines = [json.dumps({"epoch": e, "test_acc": 0.1 * e}) for e in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"epoch": 4, "tra')
    truncate_metrics(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"
    truncate_metrics(tmp_path / "missing", 1)  # no file: nothing to do


def test_state_checksum_sees_one_changed_value():
    state = build_model("resnet18").state_dict()
    before = state_checksum(state)
    assert state_checksum({k: v.clone() for k, v in state.items()}) == before
    state["layer3.0.bn1.running_mean"][7] += 1e-6
    assert state_checksum(state) != before
