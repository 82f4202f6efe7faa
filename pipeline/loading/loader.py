"""``build_loader``: the one factory every consumer uses, whatever the backend.

    loader = build_loader("shards", "train", batch_size=32, image_size=512, train=True,
                          rank=rank, world_size=world, device="cuda:0")
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
from pipeline.loading.augment import AugmentConfig
from pipeline.loading.contract import Loader, LoaderSpec, cores_per_process
from pipeline.manifest import read_manifest, verify_split


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto|dali|torch`` (or an explicit ``dali-cpu|dali-gpu``) -> the backend to build."""
    choices = ("auto", "dali", "torch", "dali-cpu", "dali-gpu")
    if backend not in choices:
        raise UserError(
            f"unknown loader backend '{backend}'; choose one of {', '.join(choices[:3])}"
        )
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
    if backend == "torch":
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
    if name == "torch":
        from pipeline.loading.torch_backend import TorchLoader

        return TorchLoader
    from pipeline.loading.dali import DaliLoader  # imports DALI: only when asked for

    return DaliLoader


def build_loader(
    shards,
    split: str,
    *,
    batch_size: int,
    image_size: int,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    workers: int | None = None,
    augment: AugmentConfig = AugmentConfig(),  # noqa: B008 (frozen, so shared safely)
    channels_last: bool = False,
    verify: bool = False,
    with_keys: bool = False,
    mmap: bool | None = None,
    normalize: tuple | None = None,
) -> Loader:
    """The loader for ``split`` of the shard folder ``shards`` (see the module docstring).

    ``with_keys``: batches are ``(images, labels, keys)``, the sample keys in batch order
    (evaluation uses them to write a row per image). ``mmap``: whether DALI memory-maps the
    tars; None chooses by the filesystem (not on network filesystems, where it is slow).
    ``normalize``: the (mean, std) per channel, 0-255 scale, to normalise with (ImageNet's
    when None; ``pipeline.manifest.dataset_normalization`` gives the train split's own).
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if image_size < 8:
        raise UserError(f"image size must be at least 8 pixels, got {image_size}")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside a world of {world_size}")
    device = resolve_device(device)
    name = resolve_backend(backend, device)
    manifest = read_manifest(shards)
    info = manifest.split(split)
    verify_split(manifest, split, full=verify)
    if train and info.samples // (world_size * batch_size) == 0:
        raise UserError(
            f"split '{split}' has {info.samples} samples, too few for {world_size} rank(s) x batch "
            f"{batch_size}; use a smaller batch size or fewer processes"
        )
    if workers is None:  # torch: DataLoader processes; DALI: its CPU threads
        share = cores_per_process()
        workers = min(4, share) if name == "torch" else share
    if workers < 0:
        raise UserError(f"workers must be 0 or more, got {workers}")
    spec = LoaderSpec(
        manifest=manifest,
        split=split,
        batch_size=batch_size,
        image_size=image_size,
        train=train,
        rank=rank,
        world_size=world_size,
        seed=seed,
        device=device,
        workers=workers,
        augment=augment,
        channels_last=channels_last,
        mmap=not on_network_filesystem(manifest.root) if mmap is None else mmap,
        **(
            {"mean": tuple(map(float, normalize[0])), "std": tuple(map(float, normalize[1]))}
            if normalize
            else {}
        ),
    )
    return _backend_class(name)(spec, with_keys=with_keys)


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
