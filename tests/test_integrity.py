"""Shard folders under fault: a second writer, kills, signals, a full disk, tampering.

Every case does the real thing: real processes, real signals, a real full filesystem
(a small tmpfs, where this machine lets the tests mount one), really edited files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.fileio import HOST
from pipeline.manifest import read_manifest
from pipeline.shardformat import patient_of, read_index
from pipeline.verify import verify_shards
from tests.conftest import tmpfs
from tools.make_synthetic import generate

REPO = Path(__file__).resolve().parents[1]
MAKE_SHARDS = [sys.executable, str(REPO / "tools" / "make_shards.py")]
HANG_GUARD_S = 120  # waiting for a process that should already be gone; not a speed limit


def start(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [*MAKE_SHARDS, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        **kw,
    )


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*MAKE_SHARDS, *map(str, args)], capture_output=True, text=True, cwd=REPO)


def wait_for(condition, what: str):
    deadline = time.monotonic() + HANG_GUARD_S
    while not (result := condition()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)
    return result


def lock_holder(out: Path) -> dict | None:
    try:
        text = (out / ".lock").read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"  # a zombie has ended; only its parent's wait is missing


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory) -> Path:
    """120 photos of 192x128 with black side borders: every one needs decoding (seconds of work)."""
    root = tmp_path_factory.mktemp("raw") / "data"
    generate(root, n=120, size=128, width=192, layout="kaggle", seed=3)
    return root


# ---------------------------------------------------------------- one writer per folder


def test_a_second_run_into_the_same_folder_stops_at_once(raw_data, tmp_path):
    out = tmp_path / "shards"
    first = start(raw_data, out, "--size", 64, "--shard-size", 16, "--workers", 1, "--quiet")
    holder = wait_for(lambda: lock_holder(out), "the first run's lock")
    os.kill(first.pid, signal.SIGSTOP)  # hold it mid-run, deterministically
    try:
        second = run(raw_data, out, "--size", 64, "--shard-size", 16, "--seed", 9, "--quiet")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert holder["pid"] == first.pid and holder["host"] == HOST
    assert second.returncode == 2
    assert (
        second.stderr.strip()
        == f"error: another make_shards (pid {first.pid}) is writing to {out.resolve()}"
    )
    assert first.wait(timeout=HANG_GUARD_S) == 0, first.stderr
    report = verify_shards(out)  # the first run's folder, whole and alone
    assert report.problems == [] and report.samples == 120
    assert lock_holder(out) is None  # released on the way out


def test_a_killed_runs_lock_and_temp_files_are_taken_over(raw_data, tmp_path):
    out = tmp_path / "shards"
    first = start(raw_data, out, "--size", 64, "--shard-size", 8, "--workers", 2, "--quiet")
    wait_for(lambda: lock_holder(out) and children(first.pid), "the first run's workers")
    os.kill(first.pid, signal.SIGSTOP)  # so that it is surely still running when killed
    workers = children(first.pid)
    first.kill()  # SIGKILL: no cleanup of any kind in the main process
    first.wait(timeout=HANG_GUARD_S)
    wait_for(lambda: all(gone(w) for w in workers), "the workers to die with the main process")
    # a temp file of a live writer (this test process) must survive; the dead run's go
    live = out / f".train-000099.tar.{HOST}.{os.getpid()}.partial"
    live.write_bytes(b"someone else's")
    dead = out / f".train-000098.tar.{HOST}.{first.pid}.partial"
    dead.write_bytes(b"left by the killed run")
    second = run(raw_data, out, "--size", 64, "--shard-size", 8, "--quiet")
    assert second.returncode == 0, second.stderr
    assert (
        f"took over the lock of {out.resolve()} left by make_shards (pid {first.pid})"
        in second.stderr
    )
    assert live.exists() and not dead.exists()
    assert verify_shards(out).problems == []


def test_verify_waits_for_a_writer(raw_data, tmp_path):
    out = tmp_path / "shards"
    first = start(raw_data, out, "--size", 64, "--workers", 1, "--quiet")
    wait_for(lambda: lock_holder(out), "the lock")
    os.kill(first.pid, signal.SIGSTOP)
    try:
        check = run("--verify", out)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=HANG_GUARD_S) == 0
    assert check.returncode == 2 and f"(pid {first.pid}) is writing to {out}" in check.stderr


# ---------------------------------------------------------------- signals


def test_sigterm_ends_the_workers_too(raw_data, tmp_path):
    for attempt in range(5):
        out = tmp_path / f"shards{attempt}"
        proc = start(raw_data, out, "--size", 64, "--shard-size", 8, "--workers", 2)
        workers = wait_for(lambda p=proc: children(p.pid), "the worker processes")
        os.kill(proc.pid, signal.SIGSTOP)
        if not (out / "rejects.csv").exists():  # stopped while packing, not already finishing
            break
        os.kill(proc.pid, signal.SIGCONT)  # a loaded machine let it get too far: once more
        assert proc.wait(timeout=HANG_GUARD_S) == 0
    proc.send_signal(signal.SIGTERM)  # lands the moment it continues
    os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=HANG_GUARD_S) == 143
    assert proc.stderr.read().strip().splitlines()[-1] == "interrupted"
    wait_for(lambda: all(gone(w) for w in workers), "the workers to end")
    assert not (out / "manifest.json").exists()


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KB tmpfs: a real filesystem that fills up."""
    with tmpfs(tmp_path / "disk", "400k") as resize:
        yield tmp_path / "disk", resize


def test_a_full_disk_is_one_line_and_keeps_the_complete_shards(raw_data, small_disk):
    disk, resize = small_disk
    out = disk / "shards"
    proc = run(raw_data, out, "--size", 128, "--shard-size", 16, "--quiet")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: no space left on device while writing {out.resolve()}/"), line
    complete = sorted(p.name for p in out.glob("train-*.tar"))
    assert complete and not list(out.glob(".*.partial")) and not (out / "manifest.json").exists()
    before = {name: (out / name).read_bytes() for name in complete}
    resize("8m")
    again = run(raw_data, out, "--size", 128, "--shard-size", 16)
    assert again.returncode == 0, again.stderr
    assert f"{len(complete)} shard(s) reused" in again.stdout
    assert all((out / name).read_bytes() == data for name, data in before.items())
    assert verify_shards(out).problems == []


# ---------------------------------------------------------------- --verify


@pytest.fixture(scope="module")
def packed(raw_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "shards"
    proc = run(raw_data, out, "--size", 64, "--shard-size", 16, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def test_verify_passes_a_sound_folder(packed):
    proc = run("--verify", packed)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"{packed}: 120 samples in {sum(len(s.shards) for s in read_manifest(packed).splits.values())} "
        "shards verified (sha256, indexes, counts, unique keys, no patient in two splits, grades 0-4)"
    )


def idx_line(root: Path, shard: str, sample: int) -> list[str]:
    return (root / shard).with_suffix(".idx").read_text().splitlines()[1 + sample].split()


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_verify_lists_every_problem(packed, tmp_path):
    root = Path(shutil.copytree(packed, tmp_path / "s"))
    manifest = json.loads((root / "manifest.json").read_text())
    train, test = manifest["splits"]["train"]["shards"], manifest["splits"]["test"]["shards"]
    # 1. a JPEG byte flipped (size unchanged): only the sha256 can tell
    jpg = idx_line(root, train[0]["file"], 0)
    poke(root / train[0]["file"], int(jpg[1]) + 100, b"\x00")
    # 2. a grade 7
    cls = idx_line(root, train[1]["file"], 2)
    poke(root / train[1]["file"], int(cls[5]), b"7")
    # 3. an index that points elsewhere than the tar's headers
    idx = root / test[0]["index"]
    lines = idx.read_text().splitlines()
    parts = lines[1].split()
    parts[1] = str(int(parts[1]) + 512)
    lines[1] = " ".join(parts)
    idx.write_text("\n".join(lines) + "\n")
    # 4. a test shard copied into train: duplicate keys and patients in two splits
    shutil.copy(root / test[1]["file"], root / "train-000099.tar")
    shutil.copy(root / test[1]["index"], root / "train-000099.idx")
    train.append({**test[1], "file": "train-000099.tar", "index": "train-000099.idx"})
    moved = manifest["splits"]["train"]
    moved["samples"] += test[1]["samples"]
    moved["class_counts"][0] += test[1]["samples"]  # counts that add up, but are wrong
    (root / "manifest.json").write_text(json.dumps(manifest))

    proc = run("--verify", root)
    assert proc.returncode == 1
    report = proc.stderr
    assert f"shard {train[0]['file']} does not match its sha256 in the manifest" in report
    assert f"in {train[1]['file']} has grade b'7', not one of 0-4" in report
    assert f"index {test[0]['index']} disagrees with {test[0]['file']} about" in report
    assert f"is in test ({test[1]['file']}) and also in train" in report
    assert "has images in train and in test" in report
    assert "images per grade but the manifest says" in report
    assert "in train-000099.tar is listed in test in samples.csv" in report

    # one line per problem planted: 2 shards whose bytes changed, the grade, the index, the
    # train class counts; per sample of the copied shard its key and its split in
    # samples.csv (test, not train); and per test sample of a
    # patient it holds (both eyes, wherever the other is) the patient in two splits
    def keys(shard: dict) -> list[str]:
        return [ref.key for ref in read_index(packed / shard["index"], shard["file"])]

    copied = {patient_of(key) for key in keys(test[1])}
    in_test = sum(patient_of(key) in copied for shard in test for key in keys(shard))
    expected = 5 + 2 * len(keys(test[1])) + in_test
    assert report.splitlines()[0] == f"{root}: {expected} problem(s):"
    assert len(report.splitlines()) == 1 + expected
