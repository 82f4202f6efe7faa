"""Shared fixtures: tiny shard folders built through the real shard writer, the one trained
run that several test files read, and the one way tests start a command (``run``,
``python``, ``launch``)."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from PIL import Image

from pipeline.constants import NUM_CLASSES, SHARD_NAME
from pipeline.manifest import Manifest, SplitInfo
from pipeline.shardformat import write_shard
from pipeline.writing import channelstats

ROOT = Path(__file__).resolve().parents[1]
TRAIN = "trainer/train.py"
# the straight run: cosine with warmup and class weights, so resume must restore the schedule
STRAIGHT_RECIPE = [
    "--image-size",
    "64",
    "--batch-size",
    "8",
    "--epochs",
    "2",
    "--backend",
    "torch",
    "--workers",
    "0",
    "--schedule",
    "cosine",
    "--warmup-epochs",
    "0.5",
    "--class-weights",
    "sqrt",
    "--augment",
    "strong",
    "--rotate",
    "90",
    "--quiet",
]


@pytest.fixture(autouse=True)
def _offline_caches(tmp_path_factory, monkeypatch):
    """Keep torch and matplotlib caches inside the test's temp folder."""
    cache = tmp_path_factory.getbasetemp() / "caches"
    monkeypatch.setenv("TORCH_HOME", str(cache / "torch"))
    monkeypatch.setenv("MPLCONFIGDIR", str(cache / "mpl"))
    monkeypatch.setenv("MPLBACKEND", "Agg")


def class_image(label: int, size: int, rng: np.random.Generator) -> bytes:
    """A JPEG whose grade is easy to learn: a bright square whose position encodes the label."""
    img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    cell = size // NUM_CLASSES
    img[:, label * cell : (label + 1) * cell, 0] = 230
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def build_shard_dir(
    root: Path,
    counts: dict[str, int] | None = None,
    size: int = 64,
    shard_size: int = 7,
    seed: int = 0,
    pairs: bool = False,
    relabel: dict[str, Callable[[int], int]] | None = None,
) -> Path:
    """Write a shard folder with ``counts[split]`` samples per split, labels cycling 0-4.

    ``pairs``: samples come as both eyes of a patient (``val3_left``, ``val3_right``) with a
    grade apart by at most one, as in EyePACS; otherwise every sample is its own patient.
    ``relabel``: per split, the grade recorded for an image drawn as grade g (the image
    keeps the look of g), to build a split that disagrees with the others on purpose.
    """
    counts = counts or {"train": 40, "test": 13}
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    train_sums = list(channelstats.ZERO)  # what make_shards measures, for --normalize dataset
    for split, n in counts.items():
        labels = [int(x) for x in rng.permutation(np.arange(n) % NUM_CLASSES)]
        if pairs:  # the right eye near the left one's grade
            for i in range(1, n, 2):
                labels[i] = int(np.clip(labels[i - 1] + rng.integers(-1, 2), 0, NUM_CLASSES - 1))
        names = [
            f"{split}{i // 2}_{('left', 'right')[i % 2]}" if pairs else f"{split}{i}_left"
            for i in range(n)
        ]
        recorded = (relabel or {}).get(split, lambda g: g)
        samples = [
            (name, class_image(lab, size, rng), recorded(lab))
            for name, lab in zip(names, labels, strict=True)
        ]
        if split == "train":
            for _, data, _ in samples:
                train_sums = channelstats.add(train_sums, channelstats.image_sums(data))
        labels = [recorded(lab) for lab in labels]
        shards = []
        for index, start in enumerate(range(0, n, shard_size)):
            path = root / SHARD_NAME.format(split=split, index=index)
            shards.append(write_shard(path, samples[start : start + shard_size]))
        splits[split] = SplitInfo.of(shards, np.bincount(labels, minlength=NUM_CLASSES))
    Manifest(
        root,
        image_size=size,
        splits=splits,
        preprocess={"size": size, "graham": False},
        source={"layout": "test", "path": str(root)},
        seed=seed,
        channel_stats=channelstats.stats(train_sums, counts.get("train", 0)),
    ).write()
    return root


def gpu_train_graph(shards: Path, augment, **options) -> bytes:
    """The serialised DALI train graph for the GPU (mixed decode, GPU augmentation) of a
    shard folder's train split at 48 px: it defines and serialises without a GPU, only
    building it needs one. ``options`` override the graph's other settings."""
    from pipeline.loading.dali import shard_pipeline
    from pipeline.loading.loader import TrainSpec, build_loader

    spec = build_loader(shards, TrainSpec(batch_size=4, image_size=64, backend="dali")).spec
    settings = dict(
        shard_id=0,
        num_shards=1,
        train=True,
        gpu=True,
        size=48,
        stored_size=64,
        augment=augment,
        channels_last=True,
        with_keys=False,
        batch_size=4,
        num_threads=1,
        device_id=None,
        seed=1,
        exec_dynamic=True,
    )
    pipe = shard_pipeline(
        [str(p) for p in spec.manifest.tar_paths("train")],
        [str(p) for p in spec.manifest.index_paths("train")],
        **(settings | options),
    )
    return pipe.serialize()


@contextmanager
def no_host_waits():
    """CUDA's sync debug mode at "error" inside the block (anything that makes the host wait
    for the GPU raises), after a synchronize so that earlier work does not count."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def epoch_without_host_waits(loader) -> tuple[int, object, object]:
    """One epoch of a GPU ``loader``, every batch after the first (pipeline build, worker
    start-up) under ``no_host_waits``, each checked to be on the GPU: (batches, last images,
    last labels)."""
    batches = iter(loader)
    images, labels = next(batches)
    seen = 1
    with no_host_waits():
        for images, labels in batches:
            assert images.is_cuda and labels.is_cuda
            seen += 1
    return seen, images, labels


@contextmanager
def tmpfs(mount: Path, size: str, *options: str):
    """A real filesystem of ``size`` (``400k``, ``180m``) at ``mount``, one that fills up
    (``options``: more mount options, e.g. ``ro``); the test is skipped, with the reason,
    where this machine does not let it mount one. ``resize(size)`` grows it in place."""
    mount.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join([*options, f"size={size}"]), "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield lambda new: subprocess.run(
            ["mount", "-o", f"remount,size={new}", str(mount)], check=True
        )
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def shared(tmp_path_factory, name: str, build: Callable[[Path], object]):
    """What ``build(folder)`` returns, built once per test session even when pytest-xdist
    runs the suite in several processes: the first process to ask builds into a folder of
    the session's temp root, under a file lock, and stores the result (pickled); the others
    wait for the lock and read it. A build that fails or skips stores nothing, so the next
    asker tries again (and fails or skips the same way). Tests only read what it built."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the temp root every worker's own folder sits in
    root = base / "shared"
    root.mkdir(exist_ok=True)
    folder, result = root / name, root / f"{name}.pickle"
    with FileLock(str(root / f"{name}.lock")):
        if result.exists():
            return pickle.loads(result.read_bytes())
        shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
        folder.mkdir()
        value = build(folder)
        result.write_bytes(pickle.dumps(value))
        return value


def untrained_best(
    path: Path,
    *,
    image_size: int = 64,
    metrics: dict | None = None,
    config: dict | None = None,
    **extra,
) -> Path:
    """A best.pt of a resnet18 fresh from its seed-0 initialisation, written by the trainer's
    own ``save_best`` (``extra``: its other keywords, e.g. ``preprocess``)."""
    import torch

    from trainer.base.model import build_model
    from trainer.fitting.checkpoint import save_best

    torch.manual_seed(0)
    save_best(
        path,
        build_model("resnet18").state_dict(),
        arch="resnet18",
        image_size=image_size,
        epoch=1,
        metrics={"test_qwk": 0.0} if metrics is None else metrics,
        config={"arch": "resnet18", **(config or {})},
        **extra,
    )
    return path


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """40 train / 13 test samples at 64 px in shards of 7 (uneven on purpose)."""
    return shared(tmp_path_factory, "tiny_shards", build_shard_dir)


@pytest.fixture(scope="session")
def straight_run(tiny_shards, tmp_path_factory) -> Path:
    """Two epochs of STRAIGHT_RECIPE on ``tiny_shards`` through a one-process ``accelerate
    launch`` (its stdout in ``stdout.txt`` beside the run folder). Tests only read it (copy
    it to change it): test_train resumes against it, test_results evaluates it."""

    def build(tmp: Path) -> Path:
        proc = launch(
            TRAIN, "--shards", tiny_shards, "--out", tmp / "run", *STRAIGHT_RECIPE, tmp=tmp
        )
        (tmp / "stdout.txt").write_text(proc.stdout)
        return tmp / "run"

    return shared(tmp_path_factory, "straight", build)


# ---------------------------------------------------------------- starting commands


def run_env(tmp: Path, **extra: str) -> dict:
    """The environment of a command a test starts: one thread, the torch cache and
    accelerate's config folder under ``tmp`` (so no user config), unbuffered output, and no
    precision left over from a launcher; ``extra`` adds or replaces variables."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        HF_HOME=str(tmp / "hf"),
        TORCH_HOME=str(tmp / "torch"),
    )
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env | extra


def run(
    cmd: list, tmp: Path, *, check: bool = True, cwd: Path = ROOT, env: dict | None = None, **kw
) -> subprocess.CompletedProcess:
    """``cmd`` (strings or paths) in ``cwd`` (the repository) with ``run_env(tmp)``, output
    captured; with ``check``, an exit status other than 0 fails the test with the output."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env if env is not None else run_env(tmp),
        capture_output=True,
        text=True,
        **kw,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def python(script: str | Path, *args, tmp: Path, check: bool = True, **env: str):
    """``python SCRIPT ARGS`` (a path relative to the repository, or absolute), one process."""
    return run([sys.executable, script, *args], tmp, check=check, env=run_env(tmp, **env))


def launch(
    script: str | Path, *args, tmp: Path, processes: int = 1, check: bool = True, **kw
) -> subprocess.CompletedProcess:
    """``accelerate launch SCRIPT ARGS`` on ``processes`` CPU ranks (DDP from two, on a free
    port: tests run in parallel), fp32."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *(["--multi_gpu", "--main_process_port", str(free_port())] if processes > 1 else []),
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        script,
        *args,
    ]
    return run(cmd, tmp, check=check, **kw)


def kill_when(cmd: list, tmp: Path, ready: Path) -> None:
    """Start ``cmd`` as ``run`` would, SIGKILL it the moment ``ready`` exists (no cleanup of
    any kind runs), and fail the test if it ended before that."""
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=ROOT,
        env=run_env(tmp),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while proc.poll() is None and not ready.exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"


def metrics_rows(run: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl, read here, not by the product's reader."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    """A TCP port nobody listens on now (the OS's choice), for a DDP rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def wds2idx() -> str:
    """Path of DALI's own index tool, installed beside the interpreter."""
    import sys

    path = Path(sys.executable).parent / "wds2idx"
    if not path.exists():
        pytest.skip("wds2idx (from nvidia-dali) is not installed")
    return str(path)


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "2")
