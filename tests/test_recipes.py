"""The recipe options beyond the reference: heads, both eyes, EMA, accumulation, clipping,
AdamW, ImageNet V2, trackers, torch.compile; each through the real trainer on tiny shards."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from tests.conftest import TRAIN, build_shard_dir, metrics_rows, python, shared
from trainer.base.bestfile import load_best
from trainer.base.heads import tune_cuts
from trainer.fitting.checkpoint import load_last, state_checksum
from trainer.fitting.config import TrainConfig

BASE = [
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
def paired_shards(tmp_path_factory) -> Path:
    """Both eyes of every patient, in train, val and test."""
    return shared(tmp_path_factory, "paired_shards", build_paired_shards)


def build_paired_shards(tmp: Path) -> Path:
    counts = {"train": 40, "val": 16, "test": 16}
    return build_shard_dir(tmp / "shards", counts, pairs=True, seed=4)


@pytest.fixture(scope="module")
def regress_run(paired_shards, tmp_path_factory) -> Path:
    """A regress run whose cut-points are tuned on its 16 val images (--tune-cuts); also
    tests/test_consistency.py's."""
    return shared(
        tmp_path_factory, "regress_run", lambda tmp: build_regress_run(paired_shards, tmp)
    )


def build_regress_run(shards: Path, tmp: Path) -> Path:
    python(
        TRAIN,
        *("--shards", shards, "--out", tmp / "run", "--head", "regress", "--tune-cuts"),
        *("--epochs", "2", "--schedule", "cosine", *BASE),
        tmp=tmp,
    )
    return tmp / "run"


def outputs_of(checkpoint: Path, shards: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """best.pt's raw regress scores and the true grades of a split, evaluated in this process
    as the trainer evaluates (batch 8, torch loader, one thread: the same sums)."""
    from accelerate import Accelerator

    from pipeline.loading.loader import EvalSpec, build_loader
    from trainer.base.bestfile import head_of
    from trainer.judging.evaluation import evaluate

    model, info = load_best(checkpoint)
    loader = build_loader(
        shards,
        EvalSpec(
            split=split, batch_size=8, image_size=64, backend="torch", workers=0, with_keys=True
        ),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = evaluate(model, loader, Accelerator(cpu=True), head_of(info)[0])
    finally:
        torch.set_num_threads(threads)
        loader.close()
    return result.outputs[:, 0], result.labels


@pytest.mark.slow
def test_regress_head_tunes_cut_points_on_val_and_evaluate_applies_them(
    regress_run, paired_shards, tmp_path
):
    lines = metrics_rows(regress_run)
    for row in lines:
        cuts = row["cut_points"]
        assert len(cuts) == 4 and cuts == sorted(cuts)
        assert 0 <= row["pair_blend"] <= 0.4 and {"val_qwk_paired", "test_qwk_paired"} <= set(row)
    # 16 val images: the trainer keeps the epoch of lowest val MSE (trainer/judging/selection.py)
    best = min(lines, key=lambda r: r["val_mse"])
    model, info = load_best(regress_run / "best.pt")
    assert (info["head"], info["outputs"]) == ("regress", 1) and info["cut_points"] == best[
        "cut_points"
    ]
    assert info["pair_blend"] == best["pair_blend"]
    # the cut-points are those tune_cuts finds on val's scores, not on test's
    on_val = tune_cuts(*outputs_of(regress_run / "best.pt", paired_shards, "val"))
    on_test = tune_cuts(*outputs_of(regress_run / "best.pt", paired_shards, "test"))
    assert info["cut_points"] == pytest.approx(on_val, abs=1e-6)
    assert np.abs(np.subtract(on_test, on_val)).max() > 1e-3, "val and test should tune apart"
    out = tmp_path / "eval"
    proc = python(
        "trainer/evaluate.py",
        *("--checkpoint", regress_run / "best.pt", "--shards", paired_shards, "--out", out),
        "--pair-eyes",
        tmp=tmp_path,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    # each eye alone: the logged test kappa; both eyes: the logged paired one
    assert (
        metrics["qwk_eye_alone"] == best["test_qwk"]
        and metrics["qwk_both_eyes"] == best["test_qwk_paired"]
    )
    assert (
        metrics["qwk"] == metrics["qwk_both_eyes"] and metrics["cut_points"] == best["cut_points"]
    )
    assert f"each eye alone: kappa {best['test_qwk']:.4f}" in proc.stdout


@pytest.mark.slow
def test_predict_pair_eyes_gives_evaluates_blended_probabilities(
    regress_run, paired_shards, tmp_path
):
    # a best.pt whose partner weight is not 0 (val chose 0 on these tiny shards)
    checkpoint = tmp_path / "blended.pt"
    best = torch.load(regress_run / "best.pt", weights_only=True)
    torch.save(best | {"pair_blend": 0.4}, checkpoint)
    photos = tmp_path / "photos"
    photos.mkdir()
    for tar_path in sorted(paired_shards.glob("test-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):  # the stored 64 px JPEGs: kept as they are
                    (photos / member.name.replace(".jpg", ".jpeg")).write_bytes(
                        tar.extractfile(member).read()
                    )
    python(
        "trainer/evaluate.py",
        *("--checkpoint", checkpoint, "--shards", paired_shards, "--out", tmp_path / "eval"),
        "--pair-eyes",
        tmp=tmp_path,
    )
    evaluated = {
        r["key"]: r for r in csv.DictReader((tmp_path / "eval" / "predictions.csv").open())
    }
    predicted = {}
    for paired in (False, True):
        out = tmp_path / f"pred-{paired}"
        python(
            "tools/predict.py",
            *("--checkpoint", checkpoint, photos, "--out", out, "--device", "cpu"),
            *(["--pair-eyes"] if paired else []),
            tmp=tmp_path,
        )
        predicted[paired] = {
            Path(r["image"]).stem: r for r in csv.DictReader((out / "predictions.csv").open())
        }
    alone, both = predicted[False], predicted[True]
    assert set(evaluated) == set(both) == set(alone)
    # blending moved the probabilities of the eyes whose partner differs
    moved = [k for k in alone if alone[k]["p0"] != both[k]["p0"]]
    assert len(moved) >= len(alone) // 2, (len(moved), len(alone))
    for key, row in evaluated.items():
        assert int(row["pred"]) == int(both[key]["grade"]), key
        for g in range(5):
            assert abs(float(row[f"p{g}"]) - float(both[key][f"p{g}"])) <= 2e-6, (key, g)


@pytest.mark.slow
def test_export_of_a_regress_head_carries_its_cut_points(regress_run, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    python(
        "tools/export.py",
        *("--checkpoint", regress_run / "best.pt", "--format", "onnx", "--out", tmp_path),
        tmp=tmp_path,
    )
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    info = load_best(regress_run / "best.pt")[1]
    assert (
        json.loads(meta["head"]) == "regress"
        and json.loads(meta["cut_points"]) == info["cut_points"]
    )


@pytest.mark.slow
def test_ordinal_head_with_ema_accumulation_clipping_adamw_and_tensorboard(paired_shards, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    python(
        TRAIN,
        *("--shards", paired_shards, "--out", run, "--head", "ordinal", "--epochs", "2"),
        *("--ema", "0.9", "--grad-accumulation", "2", "--clip-grad", "1.0"),
        *("--optimizer", "adamw", "--lr", "1e-3", "--log-with", "tensorboard", *BASE),
        tmp=tmp_path,
    )
    state = load_last(run)
    assert "ema" in state and "betas" in state["optimizer"]["param_groups"][0]  # AdamW
    # 40 images, batch 8: 5 batches an epoch, 2 optimizer steps of 2 (the 5th batch left out)
    assert state["scheduler"]["last_epoch"] == 2 * 2
    _, info = load_best(run / "best.pt")
    # best.pt holds the average of its epoch, not the raw weights: last/ is epoch 2,
    # previous/ epoch 1
    at_best = {
        2: state,
        1: torch.load(run / "checkpoints" / "previous" / "state.pt", weights_only=True),
    }[info["epoch"]]
    assert at_best["epoch"] == info["epoch"]
    ema_weights = {
        k.removeprefix("module."): v for k, v in at_best["ema"].items() if k.startswith("module.")
    }
    best_state = torch.load(run / "best.pt", weights_only=True)["model"]
    assert state_checksum(best_state) == state_checksum(ema_weights)
    assert state_checksum(best_state) != state_checksum(at_best["model"])
    assert (info["head"], info["outputs"]) == ("ordinal", 4)
    events = EventAccumulator(str(next(run.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"test_qwk", "val_qwk", "train_loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("test_qwk")] == [1, 2]
    assert "confusion/test" in events.Tags()["images"]


@pytest.mark.slow
def test_compile_trains_on_the_cpu(tmp_path):
    shards = build_shard_dir(tmp_path / "shards", {"train": 16, "test": 8})
    run = tmp_path / "run"
    proc = python(
        TRAIN, "--shards", shards, "--out", run, "--epochs", "1", "--compile", *BASE, tmp=tmp_path
    )
    assert json.loads((run / "config.json").read_text())["config"]["compile"]
    assert not any(
        k.startswith("_orig_mod") for k in load_last(run)["model"]
    )  # the bare module's names
    assert len(metrics_rows(run)) == 1 and "best test kappa" in proc.stdout.strip().splitlines()[-1]


def test_option_checks_are_one_sentence():
    for kwargs, message in (
        ({"head": "regress", "label_smoothing": 0.1}, "classify head only"),
        ({"ema": 1.5}, "--ema must be a decay"),
        ({"grad_accumulation": 0}, "--grad-accumulation must be at least 1"),
        ({"clip_grad": 0.0}, "--clip-grad must be positive"),
        ({"imagenet_weights": "V2"}, "V2 exists for resnet50 only"),
    ):
        with pytest.raises(UserError, match=message):
            TrainConfig(**kwargs)


def test_label_smoothing_softens_the_classify_loss():
    from trainer.base.heads import build_head

    out = torch.tensor([[8.0, 0, 0, 0, 0], [0, 0, 9.0, 0, 0]])
    labels = torch.tensor([0, 2])
    sharp = build_head("classify").loss_sums(out, labels, None)[0]
    smooth = build_head("classify", label_smoothing=0.1).loss_sums(out, labels, None)[0]
    assert smooth > sharp  # confident and right still costs something


def test_clip_grad_bounds_the_update():
    """SGD at lr 1 without momentum moves the weights by the gradient itself: clipped to norm
    1e-3, the step is 1e-3 long, where the unclipped gradient moves them far more."""
    from accelerate import Accelerator

    from trainer.base.heads import build_head
    from trainer.fitting.engine import build_optimizer, build_scheduler, train_step

    accelerator = Accelerator(cpu=True)
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 5
    steps = {}
    for clip in (None, 1e-3):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5))
        optimizer = build_optimizer(model, lr=1.0, momentum=0.0, weight_decay=0.0)
        scheduler = build_scheduler(optimizer, "constant", warmup_steps=0, total_steps=1)
        model, optimizer = accelerator.prepare(model, optimizer)
        before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        head = build_head("classify")
        train_step(model, images, labels, optimizer, scheduler, accelerator, head, clip_grad=clip)
        after = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        steps[clip] = float((after - before).norm())
    assert steps[None] > 0.1  # the raw gradient's step: a hundred times the clip and more
    assert steps[1e-3] == pytest.approx(1e-3, rel=1e-4)


def test_imagenet_v2_weights_offline_is_one_sentence(tmp_path, monkeypatch):
    from trainer.base.model import build_model, hub_checkpoint_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    v1, v2 = hub_checkpoint_path("resnet50", "V1"), hub_checkpoint_path("resnet50", "V2")
    assert v1.name != v2.name and v2.name.startswith("resnet50-")
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError, match=f"copy {v2.name} into"):
        build_model("resnet50", 5, pretrained=True, imagenet="V2")
