"""The loader contract both backends implement, and the one way a split is cut across ranks.

Samples are numbered in manifest order (shard by shard) and rank ``r`` of ``w`` owns
``[r*N//w, (r+1)*N//w)`` -- exactly how DALI's readers slice with ``shard_id/num_shards``.
Eval reads the rank's slice once and yields every sample exactly once across ranks. Train
yields ``N // (w * batch)`` full batches on every rank (equal steps keep DDP from hanging);
the rank reads slice ``(r + epoch) % w`` so ranks see different data from epoch to epoch.

A caller asks with a ``TrainSpec`` or an ``EvalSpec`` (two kinds, as torchvision keeps its
train and eval presets apart); ``pipeline.loading.loader.build_loader`` (the factory)
resolves it into a ``TrainLoaderSpec`` or ``EvalLoaderSpec`` and picks the backend, which
subclasses ``Loader`` and implements ``_run_epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import UserError
from pipeline.loading.augment import AugmentConfig
from pipeline.manifest import Manifest
from pipeline.shardformat import SampleRef, read_index


def rank_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Samples ``[lo, hi)`` of rank ``rank``: the slice DALI's readers give ``shard_id=rank``."""
    return n * rank // world, n * (rank + 1) // world


@dataclass(frozen=True)
class LoadOptions:
    """What a caller asks of a loader, train or eval alike (``build_loader`` checks it).

    ``with_keys``: batches are ``(images, labels, keys)``, the sample keys in batch order
    (evaluation writes a row per image with them). ``mmap``: whether DALI memory-maps the
    tars; None chooses by the filesystem (not on network filesystems, where it is slow).
    ``normalize``: the (mean, std) per channel, 0-255 scale (ImageNet's when None;
    ``pipeline.manifest.dataset_normalization`` gives the train split's own). ``workers``:
    None picks by the machine (``pipeline.loading.loader.default_workers``).
    """

    batch_size: int
    image_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    backend: str = "auto"
    device: str | torch.device = "cpu"
    workers: int | None = None
    channels_last: bool = False
    with_keys: bool = False
    mmap: bool | None = None
    normalize: tuple | None = None


@dataclass(frozen=True)
class TrainSpec(LoadOptions):
    """A train epoch: shuffled, augmented, ``N // (world * batch)`` full batches per rank."""

    split: str = "train"
    augment: AugmentConfig = AugmentConfig()  # noqa: RUF009 (frozen, so shared safely)


@dataclass(frozen=True)
class EvalSpec(LoadOptions):
    """An evaluation pass: every sample of ``split`` once across the ranks, in order, no
    augmentation (resized only when the stored size differs)."""

    split: str = "test"


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a backend needs, resolved and checked by ``build_loader``. Two kinds, as
    the caller's spec: ``TrainLoaderSpec`` and ``EvalLoaderSpec`` answer the questions a
    backend asks (which slice, how many steps, shuffled or not, which augmentation)."""

    manifest: Manifest
    split: str
    batch_size: int
    image_size: int
    rank: int
    world_size: int
    seed: int
    device: torch.device
    workers: int
    channels_last: bool
    mmap: bool = True  # DALI memory-maps the tars (not on network filesystems)
    # per-channel (mean, std) on the 0-255 scale the images are normalised with
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    train: ClassVar[bool]  # which of the two kinds this is (for reading, not for branching)

    @property
    def total(self) -> int:
        return self.manifest.split(self.split).samples

    def slice_id(self, epoch: int) -> int:
        """Which of the ``world_size`` slices this rank reads in ``epoch``."""
        raise NotImplementedError

    def slice_range(self, epoch: int) -> tuple[int, int]:
        return rank_range(self.total, self.slice_id(epoch), self.world_size)

    @property
    def steps(self) -> int:
        raise NotImplementedError

    @property
    def num_samples(self) -> int:
        raise NotImplementedError

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


@dataclass(frozen=True)
class TrainLoaderSpec(LoaderSpec):
    """Train: the rank reads slice ``(rank + epoch) % world`` (ranks see other data each
    epoch) and stops after the same number of full batches as every other rank."""

    augment: AugmentConfig = AugmentConfig()  # noqa: RUF009 (frozen, so shared safely)
    train: ClassVar[bool] = True

    def slice_id(self, epoch: int) -> int:
        return (self.rank + epoch) % self.world_size

    @property
    def steps(self) -> int:
        return self.total // (self.world_size * self.batch_size)

    @property
    def num_samples(self) -> int:
        return self.steps * self.batch_size


@dataclass(frozen=True)
class EvalLoaderSpec(LoaderSpec):
    """Eval: the rank reads its own slice whole, the last batch partial if need be."""

    train: ClassVar[bool] = False
    augment: ClassVar[None] = None  # evaluation never augments

    def slice_id(self, epoch: int) -> int:
        return self.rank

    @property
    def steps(self) -> int:
        lo, hi = self.slice_range(0)
        return math.ceil((hi - lo) / self.batch_size)

    @property
    def num_samples(self) -> int:
        lo, hi = self.slice_range(0)
        return hi - lo


def normalization(
    device: torch.device | str = "cpu", mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) with ``pixel * scale + shift == (pixel - mean) / std``, shaped (3, 1, 1).

    Every path from uint8 pixels to the model (both torch-side loaders, predict.py) computes
    ``torch.addcmul(shift, pixels, scale)``, so they give the same floats bit for bit.
    """
    scale = 1.0 / torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
    return -torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1) * scale, scale


class Normalizer:
    """uint8 NCHW (or float already normalised) -> float NCHW normalised on the device."""

    def __init__(
        self, device: torch.device, channels_last: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD
    ):
        self.device = device
        self.channels_last = channels_last
        self.shift, self.scale = normalization(device, mean, std)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if images.dtype == torch.uint8:
            images = torch.addcmul(self.shift, images, self.scale)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
        return images, labels


class Loader:
    """What ``build_loader`` returns: one epoch per ``iter()``, ``len()`` steps of it.

    Each ``iter()`` runs epoch ``self.epoch`` and then advances it, so a trainer that never
    calls ``set_epoch`` still gets a new order every epoch; ``set_epoch`` pins it (resume).
    """

    backend: str = "?"

    def __init__(self, spec: LoaderSpec, with_keys: bool = False):
        self.spec = spec
        self.with_keys = with_keys  # also yield the batch's sample keys
        self.steps = spec.steps
        self.num_samples = spec.num_samples
        self.epoch = 0
        self.normalize = Normalizer(spec.device, spec.channels_last, spec.mean, spec.std)

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
