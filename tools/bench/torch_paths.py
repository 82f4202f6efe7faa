"""The bench's paths that are torch datasets: the reference-style baseline (a folder of loose
JPEGs read with PIL, per-image torchvision transforms) and the torch backend's decoding alone.
Kept apart from bench_loader.py so that its command line answers before torch loads."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision import transforms as T

from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.hostinfo import usable_cores
from pipeline.loading.samples import chunked, decode_sample, read_chunk
from pipeline.manifest import read_manifest
from pipeline.shardformat import read_index


class JpegFolder(Dataset):
    """A folder of loose JPEGs read one by one with PIL, as the reference lab did."""

    def __init__(self, items: list[tuple[Path, int]], transform):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def baseline_batches(items, batch_size: int, size: int, stored: int, seed: int) -> DataLoader:
    """One epoch of the baseline (``len()`` batches)."""
    steps = [T.RandomHorizontalFlip(), T.RandomVerticalFlip()]
    if size != stored:
        steps.insert(0, T.Resize((size, size)))
    transform = T.Compose(
        [
            *steps,
            T.ToTensor(),
            T.Normalize([m / 255 for m in IMAGENET_MEAN], [s / 255 for s in IMAGENET_STD]),
        ]
    )
    return DataLoader(
        JpegFolder(items, transform),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=usable_cores(),
        generator=torch.Generator().manual_seed(seed),
    )


class DecodeOnly(IterableDataset):
    """The torch backend's reading (by index, a chunk at a time) and libjpeg-turbo decoding,
    nothing else, round and round; yields how many images each batch's worth decoded."""

    def __init__(self, root: Path, chunks: list, batch_size: int):
        self.root, self.chunks, self.batch_size = root, chunks, batch_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.chunks[worker::workers] or self.chunks
        chunks = itertools.cycle(mine)
        samples = (s for chunk in chunks for s in read_chunk(self.root, chunk))
        while True:
            for _, (ref, data, _) in zip(range(self.batch_size), samples, strict=False):
                decode_sample(ref, data)
            yield torch.empty(0), torch.zeros(self.batch_size)


def decode_torch_batches(
    shards: Path, split: str, batch_size: int, workers: int | None
) -> Iterable:
    manifest = read_manifest(shards)
    refs = []
    for shard in manifest.split(split).shards:
        refs += read_index(manifest.root / shard.index, shard.file)
    workers = workers if workers is not None else min(4, usable_cores())
    loader = DataLoader(
        DecodeOnly(manifest.root, chunked(refs), batch_size),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
    )
    yield from loader
