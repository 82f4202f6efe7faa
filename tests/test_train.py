"""trainer/train.py end to end on the tiny fixture (64 px, resnet18), through its real entry points.

Subprocess runs go through ``accelerate launch`` (one process, and two DDP ranks on the
CPU) and plain ``python trainer/train.py``; the quicker error cases call ``main()``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.errors import RunError, UserError
from pipeline.manifest import read_manifest
from tests.conftest import (
    STRAIGHT_RECIPE,
    TRAIN,
    build_shard_dir,
    kill_when,
    launch,
    metrics_rows,
    no_host_waits,
    python,
    shared,
    tmpfs,
)
from trainer.base.bestfile import load_best
from trainer.base.metrics import read_confusion_csv
from trainer.base.model import build_model
from trainer.fitting.checkpoint import load_last, state_checksum
from trainer.fitting.config import TrainConfig, merge_for_resume, parse_args
from trainer.fitting.console import HEADER
from trainer.fitting.engine import NonFiniteLossError, build_scheduler, class_weights_for
from trainer.train import main

KEYS = {
    "epoch",
    "train_loss",
    "train_acc",
    *(
        f"test_{k}"
        for k in (
            "loss",
            "acc",
            "qwk",
            "qwk_paired",
            "recall",
            "referable_auc",
            "any_dr_auc",
            "sensitivity",
            "specificity",
            "ece",
            "ece_raw",
        )
    ),
    "referable_threshold",
    "temperature",
    "cut_points",
    "pair_blend",
    "pair_cut_points",  # regress: the cut-points chosen with the blend (None otherwise)
    "selected_by",  # the statistic that chooses best.pt (trainer/judging/selection.py)
    "images_per_s",
    "epoch_s",
    "lr",
    "first_batch_s",
}
TIMING = ("images_per_s", "epoch_s", "first_batch_s")
RECIPE = STRAIGHT_RECIPE
STRONG_90 = {
    "hflip": True,
    "vflip": True,
    "rotate": 90.0,
    "scale": 0.25,
    "color": 0.2,
    "translate": 0.0,
}


def without_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING}


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_one_process_launch_writes_every_file(straight_run, tiny_shards):
    run, test_count = straight_run, read_manifest(tiny_shards).split("test").samples
    lines = metrics_rows(run)
    assert [r["epoch"] for r in lines] == [1, 2]
    for row in lines:
        assert set(row) == KEYS
        assert all(0 <= row[k] <= 1 for k in ("train_acc", "test_acc"))
        assert len(row["test_recall"]) == 5 and all(0 <= r <= 1 for r in row["test_recall"])
        assert row["images_per_s"] > 0 and row["epoch_s"] > 0 and row["lr"] > 0
        assert all(math.isfinite(row[k]) for k in ("train_loss", "test_loss", "test_qwk"))
        cm = read_confusion_csv(run / "confusion" / f"test_epoch_{row['epoch']:03d}.csv")
        assert cm.shape == (5, 5) and cm.sum() == test_count
        assert (run / "confusion" / f"test_epoch_{row['epoch']:03d}.png").stat().st_size > 10_000
        assert row["test_acc"] == pytest.approx(cm.trace() / cm.sum())
    assert lines[1]["lr"] < lines[0]["lr"]  # cosine decays

    config = json.loads((run / "config.json").read_text())
    assert config["config"]["arch"] == "resnet18" and config["config"]["out"] == str(run)
    env = config["environment"]
    for key in (
        "git_commit",
        "torch",
        "torchvision",
        "accelerate",
        "dali",
        "device",
        "world_size",
        "backend",
    ):
        assert key in env
    assert (
        env["world_size"] == 1 and env["backend"] == "torch" and env["torch"] == torch.__version__
    )

    state = load_last(run)
    assert state["epoch"] == 2 and state["config"]["epochs"] == 2
    model, info = load_best(run / "best.pt")
    best = max(lines, key=lambda r: r["test_qwk"])
    assert info["epoch"] == best["epoch"] and info["metrics"] == best
    assert (info["arch"], info["num_classes"], info["image_size"]) == ("resnet18", 5, 64)
    assert info["preprocess"]["size"] == 64
    # --augment strong with one knob overridden reached the loader and is recorded
    assert info["augment"] == config["augment"] == STRONG_90
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5)

    # the tiny shards have no val split: chosen on test, with a warning saying so
    stdout = (run.parent / "stdout.txt").read_text()
    assert (
        "has no val split (made with --val-fraction 0): best.pt and the screening threshold are chosen on test"
        in stdout
    )
    assert info["referable_threshold"] == best["referable_threshold"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["chosen_on"] == "test"
    assert summary["best_epoch"] == best["epoch"] and summary["last"] == lines[-1]
    assert summary["weights_sha256_per_rank"] == [state_checksum(state["model"])]


@pytest.mark.slow
def test_two_ranks_count_every_test_sample_once_and_agree_on_the_weights(tiny_shards, tmp_path):
    run = tmp_path / "ddp"
    # batch 3: the ranks' test slices (6 and 7 samples) take 2 and 3 batches
    launch(
        TRAIN,
        *("--shards", tiny_shards, "--out", run, "--image-size", "64", "--batch-size", "3"),
        *("--epochs", "2", "--backend", "dali", "--workers", "1", "--quiet"),
        tmp=tmp_path,
        processes=2,
    )
    env = json.loads((run / "config.json").read_text())["environment"]
    assert env["world_size"] == 2 and env["backend"] == "dali-cpu"
    test_count = read_manifest(tiny_shards).split("test").samples  # 13: uneven over 2 ranks
    for epoch in (1, 2):
        assert (
            read_confusion_csv(run / "confusion" / f"test_epoch_{epoch:03d}.csv").sum()
            == test_count
        )
    # every rank hashes the weights it holds at the end; rank 0 saved what all of them hold
    checksums = json.loads((run / "summary.json").read_text())["weights_sha256_per_rank"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert checksums[0] == state_checksum(load_last(run)["model"])
    assert len(load_last(run)["rng"]) == 2


@pytest.mark.slow
def test_the_log_is_short_plain_text_for_people(straight_run):
    """The run's set-up in a few readable lines (config.json keeps the whole record): no JSON
    line, and no terminal escape codes in a log that is not a terminal."""
    log = (straight_run.parent / "stdout.txt").read_text()
    record = json.loads((straight_run / "config.json").read_text())
    assert "\x1b" not in log and "config: {" not in log and "environment: {" not in log
    block = log[log.index("run folder") : log.index(HEADER)]
    assert len(block.strip().splitlines()) <= 9, block
    config, env = record["config"], record["environment"]
    for words in (
        f"arch {config['arch']}",
        f"lr {config['lr']:g}",
        f"epochs {config['epochs']}",
        f"world size {env['world_size']}",
        f"torch {env['torch']}",
    ):
        assert words in block, words


@pytest.mark.slow
def test_resume_after_sigkill_ends_like_an_uninterrupted_run(straight_run, tiny_shards, tmp_path):
    run = tmp_path / "killed"
    cmd = [sys.executable, TRAIN, "--shards", tiny_shards, "--out", run, *RECIPE]
    kill_when(cmd, tmp_path, ready=run / "checkpoints" / "last" / "state.pt")
    done = load_last(run)["epoch"]
    assert done == 1
    # what a kill between the checkpoint and its metrics line leaves behind (the line may or
    # may not have been written when the kill came: make sure it is missing), plus a line
    # cut short
    (run / "metrics.jsonl").write_text('{"epoch": 2, "trai')

    python(TRAIN, "--out", run, "--resume", "--quiet", "--workers", "0", tmp=tmp_path)
    assert [without_timing(r) for r in metrics_rows(run)] == [
        without_timing(r) for r in metrics_rows(straight_run)
    ]
    resumed, straight = load_last(run), load_last(straight_run)
    assert state_checksum(resumed["model"]) == state_checksum(straight["model"])
    assert resumed["scheduler"] == straight["scheduler"]
    assert load_best(run / "best.pt")[1]["epoch"] == load_best(straight_run / "best.pt")[1]["epoch"]


@pytest.mark.slow
def test_weights_file_starts_the_run(tiny_shards, tmp_path):
    from torchvision import models

    torch.manual_seed(5)
    backbone = models.resnet18(
        num_classes=1000
    ).state_dict()  # ImageNet-shaped: its head is dropped
    torch.save(backbone, tmp_path / "backbone.pt")
    python(
        TRAIN,
        *("--shards", tiny_shards, "--out", tmp_path / "run"),
        *("--weights", tmp_path / "backbone.pt", "--lr", "1e-9", "--epochs", "1"),
        *("--image-size", "64", "--backend", "torch", "--workers", "0", "--quiet"),
        tmp=tmp_path,
    )
    trained = load_last(tmp_path / "run")["model"]
    torch.testing.assert_close(trained["conv1.weight"], backbone["conv1.weight"], rtol=0, atol=1e-6)
    assert trained["fc.weight"].shape == (5, 512)


@pytest.mark.slow
def test_pretrained_offline_is_one_sentence_naming_weights(tiny_shards, tmp_path):
    torch_home = tmp_path / "torch"
    proc = python(
        TRAIN,
        *("--shards", tiny_shards, "--out", tmp_path / "run", "--pretrained"),
        *("--image-size", "64", "--backend", "torch", "--quiet"),
        tmp=tmp_path,
        check=False,
        TORCH_HOME=str(torch_home),
        https_proxy="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        no_proxy="",
        NO_PROXY="",
    )
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: could not download the ImageNet weights for resnet18")
    assert "--weights" in error and str(torch_home / "hub" / "checkpoints") in error
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_user_errors_on_two_ranks_end_both(tmp_path):
    proc = launch(
        TRAIN,
        *("--shards", tmp_path / "missing", "--out", tmp_path / "run", "--quiet"),
        tmp=tmp_path,
        processes=2,
        check=False,
        timeout=600,
    )  # the timeout only guards against a hang
    assert proc.returncode != 0
    assert proc.stderr.count("error: shard folder") == 2


def test_missing_shards_exit_2_with_one_line(tmp_path):
    proc = python(
        TRAIN,
        "--shards",
        tmp_path / "missing",
        "--out",
        tmp_path / "run",
        tmp=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: shard folder {tmp_path / 'missing'} does not exist; build it with tools/make_shards.py"
    ]


# ---------------------------------------------------------------- quicker, in this process


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(straight_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    before = (run / "metrics.jsonl").read_text()
    proc = python(
        TRAIN,
        "--out",
        run,
        "--resume",
        "--epochs",
        "3",
        "--lr",
        "1e6",
        "--quiet",
        tmp=tmp_path,
        check=False,
    )
    # a diverged run is not a user error: exit 1, one line
    assert proc.returncode == 1, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert re.match(
        r"error: the training loss became (nan|inf).* of epoch 3.*checkpoints/last, is kept", line
    )
    assert isinstance(NonFiniteLossError("x"), RunError)
    assert load_last(run)["epoch"] == 2
    assert (run / "metrics.jsonl").read_text() == before
    assert not (run / "confusion" / "test_epoch_003.csv").exists()


def test_unknown_or_invalid_options_exit_2():
    for argv, message in (
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--arch", "vgg16"], "invalid choice: 'vgg16'"),
        (["--epochs", "two"], "invalid int value: 'two'"),
        (["--augment", "wild"], "invalid choice: 'wild'"),
        (["--augment", "strong", "--rotate", "200"], "rotation must be between 0 and 180"),
    ):
        with pytest.raises(UserError, match=message):  # run_cli: one line, exit 2
            main(argv)
    with pytest.raises(UserError, match="--batch-size must be positive"):
        main(["--batch-size", "0"])


def test_run_folder_and_resume_errors(tiny_shards, tmp_path):
    with pytest.raises(UserError, match="--resume needs --out"):
        main(["--resume", "--shards", str(tiny_shards)])
    with pytest.raises(UserError, match="nothing to resume"):
        main(["--resume", "--out", str(tmp_path / "fresh"), "--shards", str(tiny_shards)])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="already holds a run; add --resume"):
        main(["--out", str(tmp_path / "old"), "--shards", str(tiny_shards)])
    train_only = build_shard_dir(tmp_path / "train_only", {"train": 10})
    with pytest.raises(UserError, match="has neither a val nor a test split"):
        main(["--out", str(tmp_path / "r"), "--shards", str(train_only), "--image-size", "64"])


def test_config_defaults_are_the_reference_recipe_and_resume_merging():
    cfg, given = parse_args([])
    assert (
        cfg.arch,
        cfg.lr,
        cfg.momentum,
        cfg.weight_decay,
        cfg.batch_size,
        cfg.epochs,
        cfg.image_size,
        cfg.schedule,
        cfg.class_weights,
        cfg.pretrained,
    ) == ("resnet18", 0.01, 0.9, 5e-4, 8, 10, 512, "constant", "none", False)
    assert given == set()
    saved = TrainConfig(arch="resnet50", lr=0.02, image_size=256, out="runs/x").to_dict()
    cli, given = parse_args(["--resume", "--out", "runs/x", "--epochs", "20", "--lr", "0.001"])
    merged = merge_for_resume(saved, cli, given)
    assert (merged.arch, merged.image_size, merged.epochs, merged.lr) == (
        "resnet50",
        256,
        20,
        0.001,
    )
    cli, given = parse_args(["--resume", "--out", "runs/x", "--arch", "resnet18"])
    with pytest.raises(UserError, match="--arch resnet18 differs from the run being resumed"):
        merge_for_resume(saved, cli, given)
    with pytest.raises(UserError, match="either --pretrained or --weights"):
        parse_args(["--pretrained", "--weights", "w.pt"])


def test_schedule_and_class_weights():
    optimizer = torch.optim.SGD(build_model("resnet18").parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, "cosine", warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lrs[4] == pytest.approx(0.1) and lrs[-1] < 0.002
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    weights = class_weights_for([60, 20, 10, 5, 5], "inverse")
    assert (weights * torch.tensor([60, 20, 10, 5, 5.0])).sum() == pytest.approx(
        100
    )  # mean 1 per sample
    assert weights[4] / weights[0] == pytest.approx(12)
    assert class_weights_for([60, 20, 10, 5, 5], "sqrt")[4] / class_weights_for(
        [60, 20, 10, 5, 5], "sqrt"
    )[0] == pytest.approx(12**0.5)
    assert class_weights_for([60, 0, 10, 5, 5], "inverse")[1] == 0
    assert class_weights_for([1, 1, 1, 1, 1], "none") is None


@pytest.mark.slow
def test_gpu_train_bench_runs_on_the_cpu(tmp_path):
    out = tmp_path / "bench"
    proc = python(
        "tools/bench/gpu_train_bench.py",
        *("--device", "cpu", "--arch", "resnet18", "--steps", "2", "--warmup", "1"),
        *("--image-size", "64", "--batch-size", "4", "--backend", "torch", "--workers", "0"),
        *("--work", tmp_path / "work", "--out", out),
        tmp=tmp_path,
    )
    report = json.loads((out / "gpu_train_bench.json").read_text())
    assert report["backend"] == "torch" and report["image_size"] == 64
    (row,) = report["results"]
    assert (
        row["arch"] == "resnet18"
        and row["loader_images_per_s"] > 0
        and row["resident_images_per_s"] > 0
    )
    assert row["loader_overhead"] == pytest.approx(
        1 - row["loader_images_per_s"] / row["resident_images_per_s"]
    )
    assert "images/s with the loader" in proc.stdout


def test_augment_options_reach_the_train_loader(tiny_shards):
    from accelerate import Accelerator

    from pipeline.loading.augment import AugmentConfig
    from trainer.train import build_loaders

    cfg = TrainConfig(
        shards=str(tiny_shards), image_size=64, augment="strong", color_jitter=0.1, workers=0
    )
    train, evals = build_loaders(
        cfg, read_manifest(tiny_shards), Accelerator(cpu=True), channels_last=False
    )
    assert train.spec.augment == AugmentConfig(rotate=180.0, scale=0.25, color=0.1)
    assert train.spec.train and not evals["test"].spec.train  # evaluation never augments
    assert TrainConfig().augment_config() == AugmentConfig()  # the reference recipe: flips only


@pytest.mark.slow
def test_a_run_killed_in_its_first_epoch_resumes_from_epoch_1(straight_run, tiny_shards, tmp_path):
    run = tmp_path / "early"
    cmd = [sys.executable, TRAIN, "--shards", tiny_shards, "--out", run, *RECIPE]
    kill_when(cmd, tmp_path, ready=run / "config.json")
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    resumed = python(TRAIN, "--out", run, "--resume", "--quiet", "--workers", "0", tmp=tmp_path)
    assert f"{run} has no complete epoch to resume from; starting at epoch 1" in resumed.stdout
    assert [without_timing(r) for r in metrics_rows(run)] == [
        without_timing(r) for r in metrics_rows(straight_run)
    ]


@pytest.mark.slow
def test_a_damaged_checkpoint_is_one_sentence_and_previous_is_kept(straight_run, tmp_path):
    run = Path(shutil.copytree(straight_run, tmp_path / "run"))
    assert (
        load_last(run)["epoch"] == 2
        and torch.load(run / "checkpoints" / "previous" / "state.pt", weights_only=True)["epoch"]
        == 1
    )
    state = run / "checkpoints" / "last" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    proc = python(
        TRAIN, "--out", run, "--resume", "--epochs", "3", "--quiet", tmp=tmp_path, check=False
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: the checkpoint {state} is damaged (")
    assert line.endswith(
        f"); move {state.parent} away to resume from {run / 'checkpoints' / 'previous'} (epoch 1), "
        "or start a new run with another --out"
    )


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs holding one resnet18 checkpoint and best.pt but not a second checkpoint."""
    with tmpfs(tmp_path / "disk", "180m") as resize:
        yield tmp_path / "disk", resize


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_epoch(
    tiny_shards, small_disk, tmp_path
):
    disk, resize = small_disk
    run = disk / "run"
    proc = python(TRAIN, "--shards", tiny_shards, "--out", run, *RECIPE, tmp=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert (
        line
        == f"error: no space left on device while writing {run / 'checkpoints' / 'last' / 'state.pt'}"
    )
    assert load_last(run)["epoch"] == 1 and [r["epoch"] for r in metrics_rows(run)] == [1]
    assert not list((run / "checkpoints").glob(".*"))  # no half-written checkpoint left behind
    resize("600m")
    python(TRAIN, "--out", run, "--resume", "--quiet", tmp=tmp_path)
    assert [r["epoch"] for r in metrics_rows(run)] == [1, 2]


def test_verify_shards_stops_before_training(tiny_shards, tmp_path):
    shards = Path(shutil.copytree(tiny_shards, tmp_path / "shards"))
    line = (shards / "test-000000.idx").read_text().splitlines()[1].split()
    with open(shards / "test-000000.tar", "r+b") as f:  # one JPEG byte: same size, other sha256
        f.seek(int(line[1]) + 50)
        f.write(b"\x00")
    args = ["--shards", str(shards), "--out", str(tmp_path / "run"), "--image-size", "64"]
    with pytest.raises(UserError) as err:
        main([*args, "--verify-shards"])
    assert str(err.value) == (
        f"1 problem(s) in {shards}, the first: shard test-000000.tar does not match its sha256 in "
        f"the manifest; run tools/make_shards.py --verify {shards} for the list"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_auto_precision_wants_native_bf16(monkeypatch):
    from trainer.base.distributed import resolve_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    # a GPU that only emulates bf16 (torch counts emulation unless told not to)
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation
    )
    assert resolve_precision("auto", cuda=True) == "fp16"
    with pytest.raises(UserError, match="does not support bf16"):
        resolve_precision("bf16", cuda=True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", cuda=True) == "bf16"
    assert resolve_precision("auto", cuda=False) == "no"


@pytest.mark.slow
def test_resume_on_another_number_of_processes_keeps_the_schedule(
    straight_run, tiny_shards, tmp_path
):
    """2 ranks for 1 epoch of a 1-epoch plan, then --resume on 1 rank to 2 epochs: every
    metrics line after the first equals the uninterrupted 1-rank run of 2 epochs (the shared
    straight run) in its lr (a rank count that changes the steps per epoch keeps the schedule
    a function of the epochs done)."""
    moved = tmp_path / "moved"
    args = ["--shards", tiny_shards, "--out", moved, *STRAIGHT_RECIPE]
    args[args.index("--epochs") + 1] = "1"
    launch(TRAIN, *args, tmp=tmp_path, processes=2)
    python(TRAIN, "--out", moved, "--resume", "--epochs", "2", "--quiet", tmp=tmp_path)
    moved_rows, straight_rows = metrics_rows(moved), metrics_rows(straight_run)
    assert [r["epoch"] for r in moved_rows] == [1, 2]
    assert moved_rows[1]["lr"] == pytest.approx(straight_rows[1]["lr"], rel=1e-12)
    assert moved_rows[1]["lr"] < moved_rows[0]["lr"]  # annealing, not restarted


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_and_eval_steps_never_wait_for_the_host():
    """No step (with --ema's update too) creates a CPU tensor or reads a value back, for any head: CUDA's sync debug
    mode raises if one does (the evaluation loop's step is the forward pass and the loss)."""
    from accelerate import Accelerator

    from trainer.base.heads import build_head
    from trainer.fitting.ema import EMA
    from trainer.fitting.engine import build_optimizer, build_scheduler, train_step

    accelerator = Accelerator(mixed_precision="bf16")
    images = torch.randn(8, 3, 64, 64, device=accelerator.device).contiguous(
        memory_format=torch.channels_last
    )
    labels = torch.randint(0, 5, (8,), device=accelerator.device)
    weights = class_weights_for([50, 5, 10, 2, 1], "sqrt", accelerator.device)
    for name in ("classify", "regress", "ordinal"):
        head = build_head(name)
        model = build_model("resnet18", head.outputs).to(
            accelerator.device, memory_format=torch.channels_last
        )
        optimizer = build_optimizer(model, 0.01, 0.9, 5e-4)
        scheduler = build_scheduler(optimizer, "cosine", 2, 10)
        model, optimizer = accelerator.prepare(model, optimizer)
        ema = EMA(accelerator.unwrap_model(model), 0.999)  # --ema: no host read per update
        train_step(
            model, images, labels, optimizer, scheduler, accelerator, head, ema=ema
        )  # lazy inits may sync
        with no_host_waits():
            for class_weights in (None, weights):
                out, _, _ = train_step(
                    model,
                    images,
                    labels,
                    optimizer,
                    scheduler,
                    accelerator,
                    head,
                    class_weights,
                    clip_grad=1.0,
                    ema=ema,
                )
                head.train_grades(out)
                with torch.inference_mode(), accelerator.autocast():
                    head.loss_sums(model(images), labels, class_weights)


@pytest.fixture(scope="module")
def val_run(tmp_path_factory) -> Path:
    """3 epochs (DALI loader) on 100 train / 20 val / 40 test images whose val grades are
    reversed: an image drawn as grade g is recorded in val as 4 - g. The better the model
    learns the images, the lower its val kappa and the higher its test kappa, so the epoch
    val chooses is not the one test would choose."""
    return shared(tmp_path_factory, "val_run", _val_run)


def _val_run(tmp: Path) -> Path:
    shards = build_shard_dir(
        tmp / "shards",
        {"train": 100, "val": 20, "test": 40},
        shard_size=16,
        seed=1,
        relabel={"val": lambda grade: 4 - grade},
    )
    proc = python(
        TRAIN,
        *("--shards", shards, "--out", tmp / "run", "--image-size", "64", "--batch-size", "8"),
        *("--epochs", "3", "--backend", "dali", "--workers", "1", "--quiet"),
        tmp=tmp,
    )
    (tmp / "stdout.txt").write_text(proc.stdout)
    return tmp / "run"


@pytest.mark.slow
def test_a_short_run_beats_the_majority_class(val_run):
    counts = read_manifest(val_run.parent / "shards").split("test").class_counts
    majority = max(counts) / sum(counts)  # 0.2: grades cycle 0-4
    lines = metrics_rows(val_run)
    assert max(r["test_acc"] for r in lines) >= majority + 0.3
    assert max(r["test_qwk"] for r in lines) > 0.5


@pytest.mark.slow
def test_each_epoch_reports_val_and_test_counting_every_image(val_run):
    lines = metrics_rows(val_run)
    for row in lines:
        for split, count in (("val", 20), ("test", 40)):
            assert {
                f"{split}_{k}"
                for k in (
                    "loss",
                    "acc",
                    "qwk",
                    "recall",
                    "referable_auc",
                    "any_dr_auc",
                    "sensitivity",
                    "specificity",
                )
            } <= set(row)
            cm = read_confusion_csv(val_run / "confusion" / f"{split}_epoch_{row['epoch']:03d}.csv")
            assert cm.sum() == count


def best_val_row(run: Path) -> dict:
    """The epoch val chooses: highest val kappa, the first of equals (as the trainer keeps)."""
    return max(metrics_rows(run), key=lambda r: r["val_qwk"])


@pytest.mark.slow
def test_best_pt_is_the_best_val_epoch_not_the_best_test_one(val_run):
    lines = metrics_rows(val_run)
    best = best_val_row(val_run)
    on_test = max(lines, key=lambda r: r["test_qwk"])
    assert best["epoch"] != on_test["epoch"], "the data should make val and test disagree"
    _, info = load_best(val_run / "best.pt")
    assert info["epoch"] == best["epoch"] and info["metrics"] == best
    summary = json.loads((val_run / "summary.json").read_text())
    assert summary["chosen_on"] == "val" and summary["best_epoch"] == best["epoch"]
    assert summary["test_at_best_epoch"]["qwk"] == best["test_qwk"] != on_test["test_qwk"]


@pytest.mark.slow
def test_the_last_line_reports_test_at_the_best_val_epoch(val_run):
    best = best_val_row(val_run)
    stdout = (val_run.parent / "stdout.txt").read_text()
    assert (
        stdout.strip()
        .splitlines()[-1]
        .startswith(
            f"best val kappa {best['val_qwk']:.4f} at epoch {best['epoch']}; test at that "
            f"epoch: kappa {best['test_qwk']:.4f}"
        )
    )
    assert "no val split" not in stdout


@pytest.mark.slow
def test_the_operating_point_is_chosen_on_val_for_90_percent_sensitivity(val_run, tmp_path):
    """The highest threshold reaching 90 % sensitivity on val, worked out here from
    evaluate's val predictions of best.pt."""
    from sklearn.metrics import roc_curve

    run, shards = val_run, val_run.parent / "shards"
    best = best_val_row(run)
    _, info = load_best(run / "best.pt")
    out = tmp_path / "val"
    python(
        "trainer/evaluate.py",
        *("--checkpoint", run / "best.pt", "--shards", shards, "--split", "val", "--out", out),
        tmp=tmp_path,
    )
    table = pd.read_csv(out / "predictions.csv")
    assert (
        len(table) == 20
        and json.loads((out / "metrics.json").read_text())["qwk"] == best["val_qwk"]
    )
    positive = (table["true"] >= 2).to_numpy()
    _, tpr, thresholds = roc_curve(positive, table["referable_score"], drop_intermediate=False)
    highest = thresholds[np.argmax(tpr >= 0.9)]
    assert info["referable_threshold"] == best["referable_threshold"]
    assert best["referable_threshold"] == pytest.approx(highest, abs=1e-8)  # the CSV's 8 decimals
    flagged = table["referable_score"] >= highest
    assert best["val_sensitivity"] == flagged[positive].mean() >= 0.9
    assert best["val_specificity"] == pytest.approx((~flagged[~positive]).mean())
