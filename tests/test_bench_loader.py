"""tools/bench/bench_loader.py end to end on the tiny fixture: every path timed, the JSON written."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import UserError
from tools.bench import bench_loader


def test_bench_writes_every_path(tiny_shards, tmp_path, capsys):
    argv = [
        "--shards",
        str(tiny_shards),
        "--batch-size",
        "4",
        "--batches",
        "3",
        "--warmup",
        "1",
        "--out",
        str(tmp_path / "bench"),
    ]
    assert bench_loader.main(argv) == 0
    report = json.loads((tmp_path / "bench" / "bench_loader.json").read_text())
    results = {r["path"]: r for r in report["results"]}
    expected = {"baseline", "torch"} | (
        {"dali-cpu", "decode-cpu"} if report["machine"]["dali"] else set()
    )
    assert expected <= set(results)
    assert all(r["images_per_s"] > 0 for r in results.values())
    shapes = {
        tuple(r["batch_shape"]) for name, r in results.items() if not name.startswith("decode")
    }
    assert shapes == {(4, 3, 64, 64)}  # every path yields the same normalised float batches
    assert results["baseline"]["vs_baseline"] == 1.0
    assert report["machine"]["cores_available"] >= 1 and report["config"]["samples"] == 40
    assert "x baseline" in capsys.readouterr().out


def test_bench_needs_an_existing_shard_folder(tmp_path):
    with pytest.raises(UserError, match="--make-synthetic"):
        bench_loader.main(["--shards", str(tmp_path / "nope")])


def test_the_window_fits_in_one_epoch():
    assert bench_loader.window(None, 3, 30) == (3, 30)  # endless sources: as asked
    assert bench_loader.window(40, 3, 30) == (3, 30)
    assert bench_loader.window(8, 3, 30) == (3, 5)  # fewer timed batches first
    assert bench_loader.window(2, 3, 30) == (1, 1)  # then fewer warm-up ones; one is timed


def test_every_window_stays_inside_one_epoch(tiny_shards, tmp_path, monkeypatch):
    """40 samples in batches of 4: 10 a train epoch. Asked for 3 + 30 batches, each
    loader path times inside its first epoch, with its first and last batches left out, and
    the torch backend starts no second epoch's DataLoader."""
    from pipeline.loading.torch_backend import TorchLoader

    started = []
    real = TorchLoader.batches
    monkeypatch.setattr(
        TorchLoader, "batches", lambda self, epoch: started.append(epoch) or real(self, epoch)
    )
    argv = [
        "--shards",
        str(tiny_shards),
        "--batch-size",
        "4",
        "--batches",
        "30",
        "--warmup",
        "3",
        "--paths",
        "baseline",
        "torch",
        "--out",
        str(tmp_path),
    ]
    assert bench_loader.main(argv) == 0
    report = json.loads((tmp_path / "bench_loader.json").read_text())
    for r in report["results"]:
        assert r["epoch_batches"] == 10
        assert (r["warmup"], r["timed_batches"]) == (3, 5), r
    assert started == [0]
    photographs = report["photographs"]
    assert photographs["mean_jpeg_kb"] > 0 and photographs["decode_ms_per_image"] > 0


def test_the_training_bench_times_inside_one_epoch(tmp_path, monkeypatch):
    """gpu_train_bench on the CPU: 16 images in batches of 4 are 4 steps an epoch; asked for
    2 + 10 steps it times 1 after 2 untimed (the first batch among them), leaves the last
    out, and starts no second epoch."""
    from pipeline.loading.torch_backend import TorchLoader
    from tools.bench import gpu_train_bench

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    started = []
    real = TorchLoader.batches
    monkeypatch.setattr(
        TorchLoader, "batches", lambda self, epoch: started.append(epoch) or real(self, epoch)
    )
    argv = [
        "--device",
        "cpu",
        "--arch",
        "resnet18",
        "--steps",
        "10",
        "--warmup",
        "2",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--images",
        "16",
        "--backend",
        "torch",
        "--workers",
        "0",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path),
    ]
    assert gpu_train_bench.main(argv) == 0
    report = json.loads((tmp_path / "gpu_train_bench.json").read_text())
    (row,) = report["results"]
    assert (row["warmup_steps"], row["timed_steps"]) == (2, 1)
    assert started == [0]
    assert report["photographs"]["profiled_images"] == 16


def test_the_synthetic_photographs_are_the_size_of_real_ones():
    """512 px EyePACS photographs are 100-200 KB; the benchmarks' stand-ins must be too."""
    from tools.bench.gpu_train_bench import fundus_like

    sizes = [len(fundus_like(i, 512, i % 5)) / 1024 for i in range(4)]
    assert all(100 <= kb <= 200 for kb in sizes), sizes


def test_images_per_s_is_the_steady_state_with_the_first_batch_apart():
    """An epoch of 100 images in 3 s of which 1 s waited for the first batch: 50 images/s
    (not 33), the wait reported as first_batch_s."""
    from trainer.fitting.engine import TrainResult

    result = TrainResult(loss=1.0, accuracy=0.5, images=100, seconds=3.0, lr=0.1, first_batch_s=1.0)
    assert result.images_per_s == pytest.approx(50.0)
    assert TrainResult(loss=1, accuracy=0, images=8, seconds=1.0, lr=0.1).images_per_s == 8.0


def test_an_epoch_too_short_for_a_window_is_one_sentence(tiny_shards):
    argv = ["--shards", str(tiny_shards), "--batch-size", "16", "--paths", "torch"]
    with pytest.raises(UserError, match="2 batch.* of 16; the benchmark needs 3"):
        bench_loader.main(argv)
