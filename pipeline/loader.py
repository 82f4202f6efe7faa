"""``build_loader``: the one factory every consumer uses, whatever the backend.

    loader = build_loader("shards", "train", batch_size=32, image_size=512, train=True,
                          rank=rank, world_size=world, device="cuda:0")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:   # float NCHW normalised on the device, int64 labels
            ...

Backends: ``dali-gpu`` (decode "mixed", augment on the GPU), ``dali-cpu`` (DALI CPU-only,
``device_id=None``) and ``torch`` (webdataset-style tar reading + torchvision v2 in
DataLoader workers). ``auto`` picks DALI when it imports.

Both backends cut the split the same way: samples are numbered in manifest order
(shard by shard) and rank ``r`` of ``w`` owns ``[r*N//w, (r+1)*N//w)`` -- exactly how
DALI's readers slice with ``shard_id/num_shards``. Eval reads the rank's slice once and
yields every sample exactly once across ranks. Train yields ``N // (w * batch)`` full
batches on every rank (equal steps keep DDP from hanging); the rank reads slice
``(r + epoch) % w`` so ranks see different data from epoch to epoch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.augment import AugmentConfig
from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import UserError
from pipeline.shards import Manifest, read_manifest, verify_split

__all__ = ["AugmentConfig", "Loader", "LoaderSpec", "build_loader", "available_cores"]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def rank_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Samples ``[lo, hi)`` of rank ``rank``: the slice DALI's readers give ``shard_id=rank``."""
    return n * rank // world, n * (rank + 1) // world


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lives: the shard, its key and the byte ranges of its two members."""

    shard: str
    key: str
    jpg: tuple[int, int]  # (offset, size) of the JPEG bytes
    cls: tuple[int, int]  # (offset, size) of the ASCII grade


def read_index(path: Path, shard: str) -> list[SampleRef]:
    """Parse a wds2idx ``.idx``: ``v1.2 N`` then ``ext offset size name`` groups per sample."""
    lines = Path(path).read_text().split("\n")
    refs = []
    for line in lines[1:]:
        parts = line.split()
        if not parts:
            continue
        members = {}
        for i in range(0, len(parts) - 3, 4):
            ext, offset, size, name = parts[i : i + 4]
            members[ext] = (int(offset), int(size), name)
        if "jpg" not in members or "cls" not in members:
            raise UserError(f"index {path} has a sample without .jpg and .cls; rebuild the shards")
        name = members["jpg"][2]
        refs.append(SampleRef(shard, name[: -len(".jpg")], members["jpg"][:2], members["cls"][:2]))
    return refs


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a backend needs, resolved and checked by ``build_loader``."""

    manifest: Manifest
    split: str
    batch_size: int
    image_size: int
    train: bool
    rank: int
    world_size: int
    seed: int
    device: torch.device
    workers: int
    augment: AugmentConfig
    channels_last: bool

    @property
    def total(self) -> int:
        return self.manifest.split(self.split).samples

    def slice_id(self, epoch: int) -> int:
        """Which of the ``world_size`` slices this rank reads in ``epoch``."""
        return (self.rank + epoch) % self.world_size if self.train else self.rank

    def slice_range(self, epoch: int) -> tuple[int, int]:
        return rank_range(self.total, self.slice_id(epoch), self.world_size)

    @property
    def steps(self) -> int:
        if self.train:
            return self.total // (self.world_size * self.batch_size)
        lo, hi = self.slice_range(0)
        return math.ceil((hi - lo) / self.batch_size)

    @property
    def num_samples(self) -> int:
        if self.train:
            return self.steps * self.batch_size
        lo, hi = self.slice_range(0)
        return hi - lo

    def samples(self, lo: int, hi: int) -> list[SampleRef]:
        """The refs of samples ``[lo, hi)`` in manifest order, reading only the needed indexes."""
        refs: list[SampleRef] = []
        start = 0
        for shard in self.manifest.split(self.split).shards:
            end = start + shard.samples
            if end > lo and start < hi:
                shard_refs = read_index(self.manifest.root / shard.index, shard.file)
                if len(shard_refs) != shard.samples:
                    raise UserError(
                        f"index {shard.index} lists {len(shard_refs)} samples but the manifest says "
                        f"{shard.samples}; rebuild the shards"
                    )
                refs += shard_refs[max(lo, start) - start : min(hi, end) - start]
            start = end
        return refs

    def seed_for(self, epoch: int, *more: int) -> list[int]:
        """Seed material for numpy's SeedSequence: runs differ by seed, epoch, rank, worker."""
        return [self.seed, epoch, self.rank, *more]


class Normalizer:
    """uint8 NCHW (or float already normalised) -> float NCHW normalised on the device."""

    def __init__(self, device: torch.device, channels_last: bool):
        self.device = device
        self.channels_last = channels_last
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if images.dtype == torch.uint8:
            images = images.float().sub_(self.mean).mul_(self.inv_std)
        return images, labels


class Loader:
    """What ``build_loader`` returns: one epoch per ``iter()``, ``len()`` steps of it.

    Each ``iter()`` runs epoch ``self.epoch`` and then advances it, so a trainer that never
    calls ``set_epoch`` still gets a new order every epoch; ``set_epoch`` pins it (resume).
    """

    backend: str = "?"

    def __init__(self, spec: LoaderSpec, with_keys: bool = False):
        self.spec = spec
        self.with_keys = with_keys  # tests: also yield the batch's sample keys
        self.steps = spec.steps
        self.num_samples = spec.num_samples
        self.epoch = 0
        self.normalize = Normalizer(spec.device, spec.channels_last)

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self._run_epoch(epoch)

    def _run_epoch(self, epoch: int) -> Iterator:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"{type(self).__name__}(backend={self.backend}, split={s.split}, train={s.train}, "
            f"rank={s.rank}/{s.world_size}, batch={s.batch_size}, size={s.image_size}, "
            f"steps={self.steps}, samples={self.num_samples})"
        )


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
        raise UserError(f"unknown loader backend '{backend}'; choose one of {', '.join(choices[:3])}")
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
    if backend == "torch":
        return backend
    if not dali_available():
        raise UserError("the DALI backend was asked for but nvidia-dali is not installed; use --backend torch")
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
            raise UserError(f"device {device} was asked for but CUDA is not available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise UserError(f"the loader supports cpu and cuda devices, not {device}")
    return device


def _backend_class(name: str) -> type[Loader]:
    if name == "torch":
        from pipeline.torch_loader import TorchLoader

        return TorchLoader
    from pipeline.dali import DaliLoader

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
) -> Loader:
    """The loader for ``split`` of the shard folder ``shards`` (see the module docstring)."""
    spec, name = _resolve(
        shards, split, batch_size=batch_size, image_size=image_size, train=train, rank=rank,
        world_size=world_size, seed=seed, backend=backend, device=device, workers=workers,
        augment=augment, channels_last=channels_last, verify=verify,
    )
    return _backend_class(name)(spec)


def _resolve(shards, split, *, batch_size, image_size, train, rank, world_size, seed, backend,
             device, workers, augment, channels_last, verify) -> tuple[LoaderSpec, str]:
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
        workers = min(4, available_cores()) if name == "torch" else available_cores()
    if workers < 0:
        raise UserError(f"workers must be 0 or more, got {workers}")
    spec = LoaderSpec(
        manifest=manifest, split=split, batch_size=batch_size, image_size=image_size, train=train,
        rank=rank, world_size=world_size, seed=seed, device=device, workers=workers,
        augment=augment, channels_last=channels_last,
    )
    return spec, name
