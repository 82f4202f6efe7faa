"""The torch backend: tar slices read sequentially + torchvision v2 in DataLoader workers.

Runs wherever torch does (no DALI needed). The rank's exact slice of the split (see
``pipeline.loading.contract``) is cut into chunks of consecutive samples of one shard; train
shuffles the chunk order per (seed, epoch) and then samples inside a webdataset shuffle
buffer. Chunks are dealt to workers round-robin (split by worker); a worker reads a
chunk with one sequential read using the ``.idx`` offsets, decodes each image as uint8 and
writes it into its slot of a batch tensor allocated in shared memory. Where each step runs:

- CPU target: the workers also augment each image (``TorchTransform``, torchvision) and
  normalise it, handing over float batches;
- GPU target: the workers decode, crop/resize (a per-sample size change) and only draw each
  train sample's augmentation parameters from their generator, the same calls in the same
  order as the CPU path; the uint8 batch and its parameter rows travel pinned to the GPU,
  where ``pipeline.loading.batch_augment`` applies rotation, translation, flips and colour
  to the whole batch and the loader normalises it.

The main process tops up the workers' last, partial batches into full ones (parameter rows
with their images) and moves them to the device. Its speed against the reference-style
baseline: docs/benchmarks.md.
"""

from __future__ import annotations

import gc
import itertools
import random
import sys
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.errors import UserError
from pipeline.hostinfo import local_processes, shm_free_bytes
from pipeline.loading.augment import TorchTransform
from pipeline.loading.batch_augment import augment_batch
from pipeline.loading.contract import Loader, LoaderSpec, normalization
from pipeline.loading.samples import chunked, decode_sample, read_chunk
from pipeline.shardformat import SampleRef

SHUFFLE_BUFFER = 256  # undecoded samples (~100 KB each at 512 px) per worker
PREFETCH_UINT8 = 4  # batches in flight per worker (shared memory: 25 MB each at 32 x 512 px)
PREFETCH_FLOAT = 2  # the same when workers normalise: 100 MB each


class ShardSlice(IterableDataset):
    """One epoch of one rank's chunks; each DataLoader worker takes every n-th chunk.

    Yields ``(images, labels, keys)``; with ``defer_augment`` (train only) the images are
    only cropped/resized and ``(images, labels, keys, params)`` carries each sample's drawn
    parameters (``pipeline.loading.augment.PARAM_COLUMNS``) for ``augment_batch``.
    """

    def __init__(
        self,
        spec: LoaderSpec,
        chunks: list[list[SampleRef]],
        epoch: int,
        normalize: bool,
        defer_augment: bool = False,
    ):
        self.root = spec.manifest.root
        self.chunks = chunks
        self.batch_size = spec.batch_size
        self.shuffle = spec.train
        self.transform = TorchTransform(spec.image_size, spec.augment)  # eval: None
        self.seed = spec.seed_for(epoch)
        self.shape = (3, spec.image_size, spec.image_size)
        self.memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
        self.normalize = normalize
        self.defer_augment = defer_augment and spec.augment is not None
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
        """Decode and augment (or, deferring, resize and draw for) ``size`` samples straight
        into their slots of one batch tensor."""
        dtype = torch.float32 if self.normalize else torch.uint8
        images = empty_batch((size, *self.shape), dtype, self.memory_format, shared)
        labels, keys, params = [], [], []
        for slot, (ref, data, grade) in zip(images, samples, strict=True):
            image = decode_sample(ref, data)
            if self.defer_augment:
                image = self.transform.resize(image, rng)
                params.append(self.transform.draw(rng).row())
            else:
                image = self.transform(image, rng)
            if self.normalize:
                torch.addcmul(self.shift, image, self.scale, out=slot)
            else:
                slot.copy_(image)
            labels.append(grade)
            keys.append(ref.key)
        batch = images, torch.tensor(labels, dtype=torch.int64), keys
        if not self.defer_augment:
            return batch
        params = torch.tensor(params, dtype=torch.float64).view(size, -1)
        return *batch, params.share_memory_() if shared else params


# Of /dev/shm's free space, the share one process's worker batches may fill: a train epoch
# started ahead overlaps the evaluation's, and pinned copies and other ranks need room too.
SHM_SHARE = 0.5
_said: set[str] = set()  # lines already printed: train, val and test loaders fit alike


def fit_shared_memory(
    workers: int, prefetch: int, batch_bytes: int, split: str, free: int | None = None
) -> tuple[int, int]:
    """(workers, prefetch) whose batches in flight (``workers * prefetch``) fit this process's
    share of /dev/shm: fewer batches per worker first, then fewer workers, then none (the
    main process decodes); one line says so when workers are lost. Docker's default 64 MB
    /dev/shm holds no 100 MB float batch: a worker there dies with a bus error."""
    free = shm_free_bytes() if free is None else free
    if free is None or workers == 0:
        return workers, prefetch
    room = int(free * SHM_SHARE / local_processes()) // max(1, batch_bytes)
    if room >= workers * prefetch:
        return workers, prefetch
    if room >= workers:
        return workers, room // workers
    mib = f"/dev/shm has {free / 2**20:.0f} MiB free"
    if room >= 1:
        say(
            f"{mib}: {room} loader workers instead of {workers} (a batch is "
            f"{batch_bytes / 2**20:.0f} MiB); enlarge it (docker --shm-size) for more"
        )
        return room, 1
    say(
        f"{mib}, less than one {batch_bytes / 2**20:.0f} MiB batch: no loader workers, the main "
        "process decodes; enlarge it (docker --shm-size) for workers"
    )
    return 0, prefetch


def say(line: str) -> None:
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr, flush=True)


def empty_batch(shape: tuple, dtype: torch.dtype, memory_format, shared: bool) -> torch.Tensor:
    """An uninitialised batch; ``shared``: in shared memory, where a worker's tensors must be
    to reach the main process (built there from the start, it is not copied again on the way)."""
    batch = torch.empty(shape, dtype=dtype, memory_format=memory_format)
    return batch.share_memory_() if shared else batch


class TorchLoader(Loader):
    backend = "torch"

    def __init__(self, spec: LoaderSpec, with_keys: bool = False):
        super().__init__(spec, with_keys)
        # Where a train batch is augmented: on the GPU for a GPU target (the workers only draw
        # the parameters), in the workers for the CPU. Tests force True on the CPU.
        self.augment_on_device = spec.train and spec.device.type == "cuda"
        self.workers, self.prefetch = fit_shared_memory(
            spec.workers, self.default_prefetch(), self.batch_bytes(), spec.split
        )
        self.ahead: tuple[int, Iterator] | None = None  # train: the next epoch, started
        self.kept: DataLoader | None = None  # evaluation: its DataLoader, kept with its workers

    def in_workers(self) -> bool:
        """Whether the workers normalise (a CPU target that augments in them)."""
        return self.spec.device.type == "cpu" and not self.augment_on_device

    def default_prefetch(self) -> int:
        return PREFETCH_FLOAT if self.in_workers() else PREFETCH_UINT8

    def batch_bytes(self) -> int:
        """Bytes of shared memory one worker batch takes."""
        s = self.spec
        return s.batch_size * 3 * s.image_size**2 * (4 if self.in_workers() else 1)

    def _run_epoch(self, epoch: int) -> Iterator:
        spec = self.spec
        lo, hi = spec.slice_range(epoch)
        if hi == lo:
            return
        batches = self.take_ahead(epoch)
        if batches is None:  # (not ``or``: a DataLoader's truth asks its length)
            batches = self.batches(epoch)
        for step, batch in enumerate(self._full_batches(self.unpacked(batches), spec.steps)):
            if spec.train and step == spec.steps - 1:
                # the next epoch's workers start (fork, read, decode their first batches)
                # during the last step and the evaluation, as the DALI backend's pipeline does
                self.ahead = (epoch + 1, iter(self.batches(epoch + 1)))
            images, labels, keys = self.on_device(batch)
            yield (images, labels, keys) if self.with_keys else (images, labels)

    def take_ahead(self, epoch: int):
        """The batches of train epoch ``epoch`` started ahead, if they are of that epoch
        (after ``set_epoch`` to another, they are dropped and their workers stop)."""
        ahead, self.ahead = self.ahead, None
        return ahead[1] if ahead and ahead[0] == epoch else None

    def batches(self, epoch: int):
        """The worker batches of ``epoch``: a new DataLoader per train epoch (its order and
        draws depend on the epoch); evaluation reads the same slice every time, so its
        DataLoader and its workers are made once and kept (``persistent_workers``)."""
        if not self.spec.train and self.kept is not None:
            return self.kept
        spec = self.spec
        chunks = chunked(spec.samples(*spec.slice_range(epoch)))
        if spec.train:
            order = np.random.default_rng(spec.seed_for(epoch)).permutation(len(chunks))
            chunks = [chunks[i] for i in order]
        workers = min(self.workers, len(chunks))
        if workers:
            # Workers are forked: collect garbage first, or a DALI pipeline left unreachable
            # in this process can be finalised in a worker, whose DALI threads don't exist
            # there, and the worker hangs for ever.
            gc.collect()
        loader = DataLoader(
            self.dataset(chunks, epoch),
            batch_size=None,
            num_workers=workers,
            pin_memory=self.pin,
            prefetch_factor=self.prefetch if workers else None,
            persistent_workers=bool(workers) and not spec.train,
        )
        if not spec.train:
            self.kept = loader
        return loader

    def dataset(self, chunks: list[list[SampleRef]], epoch: int) -> IterableDataset:
        # Where to normalise. For a GPU, workers hand over uint8 (a quarter of the bytes to pin
        # and copy) and the GPU normalises for free. For the CPU the float batch has to be
        # written somewhere anyway: in the main process that is a serial ~100 ms per 32 x 512 px
        # batch taken from the training step, in the workers it runs in parallel, straight into
        # the shared-memory batch the main process receives without a copy.
        return ShardSlice(
            self.spec,
            chunks,
            epoch,
            normalize=self.in_workers(),  # augmentation precedes normalising
            defer_augment=self.augment_on_device,
        )

    @property
    def pin(self) -> bool:
        """Whether batches travel pinned (to copy to a GPU without a wait)."""
        return self.spec.device.type != "cpu"

    def unpacked(self, batches) -> Iterator:
        """The workers' batches as ``_full_batches`` joins them (row ``i`` of every field one
        sample); the torch backend's are already so."""
        return iter(batches)

    def on_device(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """A full batch -> (float images normalised on the device, labels there, keys)."""
        images, labels, keys, *params = batch
        if params:
            images = self._augment_on_device(images, params[0])
        images, labels = self.normalize(images, labels)
        return images, labels, keys

    def close(self) -> None:
        self.ahead = None
        self.kept = None

    def _augment_on_device(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The uint8 batch and its parameter rows copied (from pinned memory, without a
        wait) to the device and augmented there."""
        device = self.spec.device
        images = images.to(device, non_blocking=True)
        params = params.to(device, non_blocking=True)
        return augment_batch(images, params, self.spec.augment)

    def _full_batches(self, batches, steps: int) -> Iterator:
        """Pass full worker batches through, join the workers' partial ones; stop at ``steps``.

        A batch is a tuple of fields (images, labels, keys[, params]), row ``i`` of each
        field belonging to sample ``i``; joining and cutting keep the rows together."""
        size = self.spec.batch_size
        pin = self.pin  # as the DataLoader pinned the whole batches
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
                    joined = _join(pending, pin)
                    pending = [tuple(field[size:] for field in joined)]
                    done += 1
                    yield tuple(field[:size] for field in joined)
            if done == steps:
                return
        if pending and sum(len(p[1]) for p in pending):
            yield _join(pending, pin)
            done += 1
        if done != steps:
            raise RuntimeError(f"torch loader yielded {done} batches, expected {steps}")


def _join(parts: list[tuple], pin: bool = False) -> tuple:
    """The batches ``parts`` as one, field by field: tensors concatenated (into pinned memory
    with ``pin``), key lists chained."""
    return tuple(
        (torch.cat(field).pin_memory() if pin else torch.cat(field))
        if isinstance(field[0], torch.Tensor)
        else [key for keys in field for key in keys]
        for field in zip(*parts, strict=True)
    )
