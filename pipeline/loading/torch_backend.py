"""The torch backend: tar slices read sequentially + torchvision v2 in DataLoader workers.

Runs wherever torch does (no DALI needed). The rank's exact slice of the split (see
``pipeline.loading.contract``) is cut into chunks of consecutive samples of one shard; train
shuffles the chunk order per (seed, epoch) and then samples inside a webdataset shuffle
buffer. Chunks are dealt to workers round-robin (split by worker); a worker reads a
chunk with one sequential read using the ``.idx`` offsets, decodes and augments each
image as uint8 and writes it into its slot of a batch tensor allocated in shared memory:
normalised float for a CPU target, uint8 for a GPU (normalised there). The main process
tops up the workers' last, partial batches into full ones and moves them to the device.
Its speed against the reference-style baseline: docs/benchmarks.md.
"""

from __future__ import annotations

import gc
import itertools
import random
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.errors import UserError
from pipeline.loading.augment import TorchTransform
from pipeline.loading.contract import Loader, LoaderSpec, normalization
from pipeline.loading.samples import chunked, decode_sample, read_chunk
from pipeline.shardformat import SampleRef

SHUFFLE_BUFFER = 256  # undecoded samples (~100 KB each at 512 px) per worker
PREFETCH_UINT8 = 4  # batches in flight per worker (shared memory: 25 MB each at 32 x 512 px)
PREFETCH_FLOAT = 2  # the same when workers normalise: 100 MB each


class ShardSlice(IterableDataset):
    """One epoch of one rank's chunks; each DataLoader worker takes every n-th chunk."""

    def __init__(
        self, spec: LoaderSpec, chunks: list[list[SampleRef]], epoch: int, normalize: bool
    ):
        self.root = spec.manifest.root
        self.chunks = chunks
        self.batch_size = spec.batch_size
        self.shuffle = spec.train
        self.transform = TorchTransform(spec.image_size, spec.augment if spec.train else None)
        self.seed = spec.seed_for(epoch)
        self.shape = (3, spec.image_size, spec.image_size)
        self.memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
        self.normalize = normalize
        self.shift, self.scale = normalization("cpu", spec.mean, spec.std)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        chunks = self.chunks[worker::workers]
        seeds = np.random.SeedSequence([*self.seed, worker]).generate_state(2)
        rng = np.random.default_rng(seeds[0])
        samples = (s for chunk in chunks for s in read_chunk(self.root, chunk))
        if self.shuffle:
            samples = wds.shuffle(SHUFFLE_BUFFER, SHUFFLE_BUFFER, rng=random.Random(int(seeds[1])))(
                samples
            )
        left = sum(len(chunk) for chunk in chunks)
        try:
            while left:
                size = min(self.batch_size, left)
                yield self.batch(
                    itertools.islice(samples, size), size, rng, shared=info is not None
                )
                left -= size
        except UserError as err:  # reaches the main process as one message, not a worker traceback
            yield {"error": str(err)}

    def batch(self, samples, size: int, rng: np.random.Generator, shared: bool):
        """Decode and augment ``size`` samples straight into their slots of one batch tensor."""
        dtype = torch.float32 if self.normalize else torch.uint8
        images = empty_batch((size, *self.shape), dtype, self.memory_format, shared)
        labels, keys = [], []
        for slot, (ref, data, grade) in zip(images, samples, strict=True):
            image = self.transform(decode_sample(ref, data), rng)
            if self.normalize:
                torch.addcmul(self.shift, image, self.scale, out=slot)
            else:
                slot.copy_(image)
            labels.append(grade)
            keys.append(ref.key)
        return images, torch.tensor(labels, dtype=torch.int64), keys


def empty_batch(shape: tuple, dtype: torch.dtype, memory_format, shared: bool) -> torch.Tensor:
    """An uninitialised batch; ``shared``: in shared memory, where a worker's tensors must be
    to reach the main process (built there from the start, it is not copied again on the way)."""
    batch = torch.empty(shape, dtype=dtype, memory_format=memory_format)
    return batch.share_memory_() if shared else batch


class TorchLoader(Loader):
    backend = "torch"

    def _run_epoch(self, epoch: int) -> Iterator:
        spec = self.spec
        lo, hi = spec.slice_range(epoch)
        if hi == lo:
            return
        chunks = chunked(spec.samples(lo, hi))
        if spec.train:
            order = np.random.default_rng(spec.seed_for(epoch)).permutation(len(chunks))
            chunks = [chunks[i] for i in order]
        workers = min(spec.workers, len(chunks))
        if workers:
            # Workers are forked: collect garbage first, or a DALI pipeline left unreachable
            # in this process can be finalised in a worker, whose DALI threads don't exist
            # there, and the worker hangs for ever.
            gc.collect()
        # Where to normalise. For a GPU, workers hand over uint8 (a quarter of the bytes to pin
        # and copy) and the GPU normalises for free. For the CPU the float batch has to be
        # written somewhere anyway: in the main process that is a serial ~100 ms per 32 x 512 px
        # batch taken from the training step, in the workers it runs in parallel, straight into
        # the shared-memory batch the main process receives without a copy.
        on_cpu = spec.device.type == "cpu"
        batches = DataLoader(
            ShardSlice(spec, chunks, epoch, normalize=on_cpu),
            batch_size=None,
            num_workers=workers,
            pin_memory=not on_cpu,
            prefetch_factor=(PREFETCH_FLOAT if on_cpu else PREFETCH_UINT8) if workers else None,
        )
        steps = spec.steps if spec.train else -(-(hi - lo) // spec.batch_size)
        for images, labels, keys in self._full_batches(batches, steps):
            images, labels = self.normalize(images, labels)
            yield (images, labels, keys) if self.with_keys else (images, labels)

    def _full_batches(self, batches, steps: int) -> Iterator:
        """Pass full worker batches through, join the workers' partial ones; stop at ``steps``."""
        size = self.spec.batch_size
        pending: list[tuple] = []
        done = 0
        for item in batches:
            if isinstance(item, dict):
                raise UserError(item["error"])
            if len(item[1]) == size:
                done += 1
                yield item
            else:
                pending.append(item)
                if sum(len(p[1]) for p in pending) >= size:
                    images, labels, keys = _join(pending)
                    pending = [(images[size:], labels[size:], keys[size:])]
                    done += 1
                    yield images[:size], labels[:size], keys[:size]
            if done == steps:
                return
        if pending and sum(len(p[1]) for p in pending):
            yield _join(pending)
            done += 1
        if done != steps:
            raise RuntimeError(f"torch loader yielded {done} batches, expected {steps}")


def _join(parts: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return (
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        [k for p in parts for k in p[2]],
    )
