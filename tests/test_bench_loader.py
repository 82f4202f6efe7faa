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
