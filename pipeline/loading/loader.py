"""``build_loader``: the one factory every consumer uses, whatever the backend.

    loader = build_loader("shards", TrainSpec(batch_size=32, image_size=512, rank=rank,
                                              world_size=world, device="cuda:0"))
    test = build_loader("shards", EvalSpec(split="test", batch_size=32, image_size=512))
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:   # float NCHW normalised on the device, int64 labels
            ...

Backends: ``dali-gpu`` (decode "mixed", augment on the GPU), ``dali-cpu`` (DALI CPU-only,
``device_id=None``) and ``torch`` (tar reading by index + torchvision v2 in DataLoader
workers). ``auto`` picks DALI when it imports. How a split is cut across ranks and what
an epoch is: ``pipeline.loading.contract``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.hostinfo import cores_per_process
from pipeline.loading.contract import (
    EvalLoaderSpec,
    EvalSpec,
    Loader,
    TrainLoaderSpec,
    TrainSpec,
)
from pipeline.manifest import read_manifest, verify_split


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = ("auto", "dali", "torch", "torch-nvjpeg")  # what a user names (and dali-cpu/-gpu)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto|dali|torch|torch-nvjpeg`` (or an explicit ``dali-cpu|dali-gpu``) -> the backend
    to build. ``auto``: DALI where it imports, else torch-nvjpeg on a GPU, else torch."""
    if backend not in (*BACKENDS, "dali-cpu", "dali-gpu"):
        raise UserError(f"unknown loader backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if dali_available():
            backend = "dali"
        else:
            backend = "torch-nvjpeg" if device.type == "cuda" else "torch"
    if backend.startswith("torch"):
        return backend
    if not dali_available():
        raise UserError(
            "the DALI backend was asked for but nvidia-dali is not installed; use --backend torch"
        )
    if backend == "dali":
        backend = "dali-gpu" if device.type == "cuda" else "dali-cpu"
    if backend == "dali-gpu" and device.type != "cuda":
        raise UserError(f"the dali-gpu backend needs a CUDA device, got {device}")
    if backend == "dali-cpu" and device.type != "cpu":
        raise UserError(f"the dali-cpu backend yields CPU tensors, got device {device}")
    return backend


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"device {device} was asked for but CUDA is not available; use --device cpu"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise UserError(f"the loader supports cpu and cuda devices, not {device}")
    return device


def _backend_class(name: str) -> type[Loader]:
    """The backend's class, imported only when asked for (``dali`` imports DALI)."""
    if name == "torch":
        from pipeline.loading.torch_backend import TorchLoader

        return TorchLoader
    if name == "torch-nvjpeg":
        from pipeline.loading.nvjpeg import NvjpegLoader

        return NvjpegLoader
    from pipeline.loading.dali import DaliLoader

    return DaliLoader


def build_loader(shards, spec: TrainSpec | EvalSpec, *, verify: bool = False) -> Loader:
    """The loader ``spec`` asks for over the shard folder ``shards`` (see the module
    docstring); ``verify``: check every shard's sha256 against the manifest first."""
    if not isinstance(spec, TrainSpec | EvalSpec):
        raise TypeError(f"build_loader takes a TrainSpec or an EvalSpec, not {type(spec).__name__}")
    check_options(spec)
    device = resolve_device(spec.device)
    name = resolve_backend(spec.backend, device)
    manifest = read_manifest(shards)
    info = manifest.split(spec.split)
    verify_split(manifest, spec.split, full=verify)
    train = isinstance(spec, TrainSpec)
    if train and info.samples // (spec.world_size * spec.batch_size) == 0:
        raise UserError(
            f"split '{spec.split}' has {info.samples} samples, too few for {spec.world_size} "
            f"rank(s) x batch {spec.batch_size}; use a smaller batch size or fewer processes"
        )
    workers = default_workers(name, device) if spec.workers is None else spec.workers
    if workers < 0:
        raise UserError(f"workers must be 0 or more, got {workers}")
    common = dict(
        manifest=manifest,
        split=spec.split,
        batch_size=spec.batch_size,
        image_size=spec.image_size,
        rank=spec.rank,
        world_size=spec.world_size,
        seed=spec.seed,
        device=device,
        workers=workers,
        channels_last=spec.channels_last,
        mmap=not on_network_filesystem(manifest.root) if spec.mmap is None else spec.mmap,
        **normalization_fields(spec.normalize),
    )
    resolved = (
        TrainLoaderSpec(augment=spec.augment, **common) if train else EvalLoaderSpec(**common)
    )
    return _backend_class(name)(resolved, with_keys=spec.with_keys)


def default_workers(backend: str, device: torch.device) -> int:
    """Workers for ``backend`` when the user names none: DALI's CPU threads take this
    process's share of the usable cores (``pipeline.hostinfo``); the torch backends' worker
    processes take that share less one core, kept for the main process that feeds a GPU
    (joins batches, copies them, launches the kernels), or at most 4 for a CPU target,
    whose training needs the cores itself."""
    share = cores_per_process()
    if backend.startswith("dali"):
        return share
    return max(0, share - 1) if device.type == "cuda" else min(4, share)


def check_options(spec: TrainSpec | EvalSpec) -> None:
    if spec.batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {spec.batch_size}")
    if spec.image_size < 8:
        raise UserError(f"image size must be at least 8 pixels, got {spec.image_size}")
    if not 0 <= spec.rank < spec.world_size:
        raise UserError(f"rank {spec.rank} is outside a world of {spec.world_size}")


def normalization_fields(normalize: tuple | None) -> dict:
    """``LoaderSpec``'s mean/std from a (mean, std) pair, or nothing (ImageNet's)."""
    if not normalize:
        return {}
    return {"mean": tuple(map(float, normalize[0])), "std": tuple(map(float, normalize[1]))}


# Filesystems where memory-mapped reading of large files crawls (every page fault a round trip).
NETWORK_FILESYSTEMS = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "lustre",
    "gpfs",
    "beegfs",
    "glusterfs",
    "ceph",
    "9p",
    "afs",
    "panfs",
    "wekafs",
)


def on_network_filesystem(path: Path, mounts: str | None = None) -> bool:
    """Whether ``path`` lies on a network (or FUSE) filesystem, from /proc/mounts."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return False  # not Linux: keep DALI's default
    target = os.path.realpath(path)
    best, kind = "", ""
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(
            best
        ):
            best, kind = point, parts[2]
    return kind in NETWORK_FILESYSTEMS or kind.startswith("fuse.")
