"""The ``torch-nvjpeg`` backend: the torch backend's workers read, the GPU decodes.

For a machine with a GPU and no DALI. The workers of the torch backend
(``pipeline.loading.torch_backend``) read each sample's JPEG bytes from the tars and,
for a train batch, draw its augmentation parameters (step 1's crop from the JPEG's header,
then ``TorchTransform.draw``: the same generator calls in the same order as the torch
backend, so a seed gives the same crops, angles and flips); they decode nothing. The main
process decodes the whole batch with nvJPEG (``torchvision.io.decode_jpeg(list, device=)``),
crops/resizes each image there (``TorchTransform.crop_resize``, the torch backend's own
step 1), augments the batch (``pipeline.loading.batch_augment``) and normalises it, all on
the GPU. The exact-epoch and eval-coverage contract is the torch backend's (the same
slices, chunks and topping-up of partial batches).

Synchronisation. torchvision's batched CUDA decode runs on a stream of its own, not ordered
against torch's current stream, and nvJPEG's hardware decoder has been seen to write its
outputs before work already queued on the caller's stream had run (corrupting blocks the
caching allocator had just handed over; pytorch/vision#9606, on an H100). So the loader
waits for torch's stream to drain before the decode and for the device after it: two
host waits per batch, the price of correct pixels (gpu_check measures what is left).

Without CUDA ``--backend torch-nvjpeg`` ends in one sentence naming the GPU. The tests run
this very code with the decode on the CPU (libjpeg-turbo through the same
``decode_jpeg`` call), allowed only by the test seam ``DR_TEST_ONLY_NVJPEG_ON_CPU=1``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.errors import DeviceError, UserError
from pipeline.loading.augment import TorchTransform
from pipeline.loading.contract import LoaderSpec
from pipeline.loading.samples import decode_jpeg_bytes
from pipeline.loading.torch_backend import ShardSlice, TorchLoader, empty_batch
from pipeline.shardformat import SampleRef

# Test seam, for the tests only: lets the backend run with the decode on the CPU.
CPU_SEAM = "DR_TEST_ONLY_NVJPEG_ON_CPU"
PREFETCH_JPEG = 4  # batches in flight per worker: JPEG bytes, ~100-200 KB a sample at 512 px


def cpu_seam_open() -> bool:
    return os.environ.get(CPU_SEAM) == "1"


def check_device(device: torch.device) -> None:
    """One sentence, naming the GPU, where the backend cannot run."""
    if device.type != "cuda" and not (device.type == "cpu" and cpu_seam_open()):
        raise UserError(
            f"the torch-nvjpeg backend decodes JPEGs on a CUDA GPU and the target is {device} "
            "(no GPU here); use --backend torch"
        )


def jpeg_size(ref: SampleRef, data: memoryview) -> tuple[int, int]:
    """(height, width) from the JPEG's header (PIL reads only the header here)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except (OSError, ValueError) as err:
        raise UserError(
            f"sample {ref.key} in shard {ref.shard} is not a readable JPEG ({err})"
        ) from None
    return height, width


class JpegSlice(ShardSlice):
    """The torch backend's epoch of chunks, yielding undecoded batches:
    ``(jpeg bytes end to end, their lengths, labels, keys, crop boxes[, params])``, one
    uint8 tensor for the bytes (one shared-memory block per batch, not one per image)."""

    def batch(self, samples, size: int, rng: np.random.Generator, shared: bool):
        datas, labels, keys, boxes, params = [], [], [], [], []
        for ref, data, grade in samples:
            if self.transform.augment is not None and self.transform.augment.scale > 0:
                boxes.append(self.transform.box(*jpeg_size(ref, data), rng))
            else:
                boxes.append((0, 0, 0))
            if self.defer_augment:
                params.append(self.transform.draw(rng).row())
            datas.append(data)
            labels.append(grade)
            keys.append(ref.key)
        lengths = [len(d) for d in datas]
        packed = empty_batch((sum(lengths),), torch.uint8, torch.contiguous_format, shared)
        flat, at = packed.numpy(), 0
        for data, n in zip(datas, lengths, strict=True):
            flat[at : at + n] = np.frombuffer(data, dtype=np.uint8)
            at += n
        batch = (
            packed,
            torch.tensor(lengths, dtype=torch.int64),
            torch.tensor(labels, dtype=torch.int64),
            keys,
            torch.tensor(boxes, dtype=torch.int64).view(size, 3),
        )
        if not self.defer_augment:
            return batch
        return *batch, torch.tensor(params, dtype=torch.float64).view(size, -1)


class NvjpegLoader(TorchLoader):
    backend = "torch-nvjpeg"

    def __init__(self, spec: LoaderSpec, with_keys: bool = False):
        check_device(spec.device)
        super().__init__(spec, with_keys)
        self.augment_on_device = spec.train  # always: the workers have no pixels
        self.transform = TorchTransform(spec.image_size, spec.augment)  # step 1, after decoding

    def in_workers(self) -> bool:
        return False

    def default_prefetch(self) -> int:
        return PREFETCH_JPEG

    def batch_bytes(self) -> int:
        """A batch of the split's mean stored JPEG (tar headers included: a small overcount)."""
        info = self.spec.manifest.split(self.spec.split)
        mean = sum(s.bytes for s in info.shards) / max(1, info.samples)
        return int(self.spec.batch_size * mean)

    @property
    def pin(self) -> bool:
        return False  # decode_jpeg reads the bytes from host memory itself

    def dataset(self, chunks, epoch: int):
        return JpegSlice(
            self.spec, chunks, epoch, normalize=False, defer_augment=self.augment_on_device
        )

    def unpacked(self, batches) -> Iterator:
        """Each batch's bytes cut into one view per image, so that joining and cutting
        partial batches keeps every image with its row of the other fields."""
        for item in batches:
            if isinstance(item, dict):  # a worker's error, raised by _full_batches
                yield item
                continue
            packed, lengths, *rest = item
            yield (list(torch.split(packed, lengths.tolist())), *rest)

    def on_device(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        jpegs, labels, keys, boxes, *params = batch
        decoded = self.decode(jpegs, keys)
        images = torch.stack(
            [
                self.transform.crop_resize(img, box)
                for img, box in zip(decoded, boxes.tolist(), strict=True)
            ]
        )
        if params:
            images = self._augment_on_device(images, params[0])
        images, labels = self.normalize(images, labels)
        return images, labels, keys

    def decode(self, jpegs: list[torch.Tensor], keys: list[str]) -> list[torch.Tensor]:
        """The batch decoded on the target device, synchronised (module docstring)."""
        device = self.spec.device
        try:
            if device.type != "cuda":  # the test seam: the same call, decoded on the CPU
                return decode_jpeg(jpegs, mode=ImageReadMode.RGB)
            torch.cuda.current_stream(device).synchronize()
            images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
            torch.cuda.synchronize(device)
            return images
        except RuntimeError as err:
            self.name_the_bad_sample(jpegs, keys)
            raise DeviceError(
                f"nvJPEG could not decode a batch of split '{self.spec.split}' that the CPU "
                f"decodes ({str(err).strip().splitlines()[0]}); use --backend torch"
            ) from err

    def name_the_bad_sample(self, jpegs: list[torch.Tensor], keys: list[str]) -> None:
        """A UserError naming the first sample the CPU cannot decode either, if any."""
        for data, key in zip(jpegs, keys, strict=True):
            decode_jpeg_bytes(bytes(data.numpy()), f"sample {key} of split '{self.spec.split}'")
