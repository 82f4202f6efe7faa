"""Ctrl-C and `kill` end make_shards in every phase of packing, with no worker left behind.

A signal lands at moments spread over a whole run (before the pool starts, while its
workers are forked, while results are pending, while the last shards and the manifest are
written). Every run must end with 143 (SIGTERM) or 130 (SIGINT), and nothing of its
process group may be left: not a running worker, not a zombie. The wait on each run is a
hang guard (the bug this catches hung for good), not a speed limit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 60
PHOTOS = 96
TRIES = 8


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """96 photos of 256x192 in the lab layout (every one needs decoding: seconds of work at
    --workers 2); 16 distinct pictures, each copied under six names, to be quick to make."""
    root = tmp_path_factory.mktemp("interrupts") / "data"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    pictures = []
    for _ in range(16):
        pixels = rng.integers(0, 255, size=(192, 256, 3), dtype=np.uint8)
        pixels[:, :32] = pixels[:, -32:] = 0  # black sides, as a fundus camera leaves them
        path = root / f"picture{len(pictures)}.jpeg"
        Image.fromarray(pixels).save(path, quality=90)
        pictures.append(path.read_bytes())
    names = [f"{i}_{('left', 'right')[i % 2]}" for i in range(PHOTOS)]
    for i, name in enumerate(names):
        (root / "images" / f"{name}.jpeg").write_bytes(pictures[i % len(pictures)])
    train, test = names[: PHOTOS * 3 // 4], names[PHOTOS * 3 // 4 :]
    for split, members in (("train", train), ("test", test)):
        (root / f"{split}_img.csv").write_text("".join(f"{m}\n" for m in members))
        (root / f"{split}_label.csv").write_text("".join(f"{i % 5}\n" for i in range(len(members))))
    for path in root.glob("picture*.jpeg"):
        path.unlink()
    return root


def ctrl_c_as_usual() -> None:
    """In the child before it starts Python: SIGINT back to its default. A command started in
    the background by a shell inherits SIGINT ignored, and Python then installs no handler of
    its own, so Ctrl-C would not reach make_shards as it does at a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(data: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "make_shards.py"), str(data), str(out)]
        + ["--size", "64", "--shard-size", "8", "--workers", "2", "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,  # its own process group: the workers are found by it
        preexec_fn=ctrl_c_as_usual,
    )


def holding_lock(out: Path) -> bool:
    """Whether the run has taken its output folder (its signal handling is in place)."""
    try:
        return bool(json.loads((out / ".lock").read_text() or "null"))
    except (OSError, ValueError):
        return False


def wait_until_packing(proc: subprocess.Popen, out: Path) -> float:
    deadline = time.monotonic() + HANG_GUARD_S
    while not holding_lock(out):
        assert proc.poll() is None, f"make_shards ended early: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "make_shards never took its output folder"
        time.sleep(0.005)
    return time.monotonic()


def group_members(pgid: int) -> list[str]:
    """Every process of process group ``pgid`` still in the table (zombies included)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields: state, ppid, pgrp, ...
            found.append(f"pid {entry.name} state {fields[0]} ppid {fields[1]}")
    return found


def ended(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"make_shards hung after the signal; stderr: {proc.stderr.read()}")


def test_signals_at_any_moment_end_packing(photos, tmp_path):
    # a whole run first: how long packing takes from taking the folder to its manifest
    proc = start(photos, tmp_path / "whole")
    begun = wait_until_packing(proc, tmp_path / "whole")
    while not (tmp_path / "whole" / "manifest.json").exists() and proc.poll() is None:
        time.sleep(0.005)
    span = time.monotonic() - begun
    assert ended(proc) == 0, proc.stderr.read()
    assert not group_members(proc.pid)

    interrupted = []
    for attempt in range(TRIES):
        sig, code = (signal.SIGTERM, 143) if attempt % 2 == 0 else (signal.SIGINT, 130)
        out = tmp_path / f"out{attempt}"
        proc = start(photos, out)
        begun = wait_until_packing(proc, out)
        time.sleep(max(0.0, begun + span * attempt / TRIES - time.monotonic()))
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # Ctrl-C reaches the whole foreground group
        else:
            os.kill(proc.pid, sig)  # `kill PID` only the main process
        rc = ended(proc)
        stderr = proc.stderr.read()
        assert not group_members(proc.pid), (
            f"left behind after {sig.name}: {group_members(proc.pid)}"
        )
        assert "Traceback" not in stderr, stderr
        if rc == 0:  # the signal came after the run had finished its work
            assert (out / "manifest.json").exists()
            continue
        assert rc == code, f"{sig.name} at {span * attempt / TRIES:.2f} s: exit {rc}\n{stderr}"
        assert stderr.strip().splitlines()[-1] == "interrupted"
        interrupted.append(attempt)
    print(f"whole run {span:.2f} s after taking the folder; interrupted tries {interrupted}")
    assert len(interrupted) >= TRIES // 2, f"only tries {interrupted} were interrupted"
