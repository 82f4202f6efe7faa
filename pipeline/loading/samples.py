"""Reading samples straight from a shard by its index: both backends use it.

The torch backend reads and decodes every sample this way; the DALI backends use it to
name the sample behind a failure DALI reports for a whole batch.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

try:  # libjpeg-turbo straight to a CHW tensor; deprecated in torchvision 0.29 in favour of torchcodec
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

from pipeline.constants import NUM_CLASSES
from pipeline.errors import UserError
from pipeline.loading.augment import TorchTransform
from pipeline.shardformat import SampleRef

CHUNK_SAMPLES = 16  # consecutive samples read with one call; the unit of shuffling and of work


def chunked(refs: list[SampleRef], size: int = CHUNK_SAMPLES) -> list[list[SampleRef]]:
    """Consecutive runs of at most ``size`` samples, never straddling two shards."""
    chunks: list[list[SampleRef]] = []
    for ref in refs:
        if chunks and len(chunks[-1]) < size and chunks[-1][-1].shard == ref.shard:
            chunks[-1].append(ref)
        else:
            chunks.append([ref])
    return chunks


def read_chunk(root, chunk: list[SampleRef]) -> Iterator[tuple[SampleRef, memoryview, int]]:
    """``(ref, jpeg bytes, grade)`` for each sample of a chunk, from one sequential read."""
    shard = chunk[0].shard
    start = min(min(r.jpg[0], r.cls[0]) for r in chunk)
    end = max(max(r.jpg[0] + r.jpg[1], r.cls[0] + r.cls[1]) for r in chunk)
    buf = bytearray(end - start)
    try:
        with open(root / shard, "rb") as f:
            f.seek(start)
            got = f.readinto(buf)
    except OSError as err:
        raise UserError(f"cannot read shard {shard} ({err.strerror or err})") from None
    view = memoryview(buf)
    for ref in chunk:
        if max(ref.jpg[0] + ref.jpg[1], ref.cls[0] + ref.cls[1]) - start > got:
            raise UserError(
                f"shard {shard} is truncated: sample {ref.key} lies past its end; rebuild the shards"
            )
        off, size = ref.cls
        yield (
            ref,
            view[ref.jpg[0] - start : sum(ref.jpg) - start],
            parse_grade(ref, bytes(view[off - start : off - start + size])),
        )


def parse_grade(ref: SampleRef, text: bytes) -> int:
    """The grade of a ``.cls`` member: one ASCII digit 0-4, else a UserError naming the sample."""
    if len(text) == 1 and ord("0") <= text[0] < ord("0") + NUM_CLASSES:
        return text[0] - ord("0")
    shown = text[:10].decode("ascii", errors="replace")
    raise UserError(
        f"sample {ref.key} in shard {ref.shard} has grade {shown!r}, not one of 0-{NUM_CLASSES - 1}; "
        "rebuild the shards"
    )


def decode_sample(ref: SampleRef, data: memoryview) -> torch.Tensor:
    """A stored sample's JPEG -> uint8 RGB CHW tensor, or a UserError naming shard and sample."""
    return decode_jpeg_bytes(data, f"sample {ref.key} in shard {ref.shard}")


def decode_jpeg_bytes(data: bytes | memoryview, what: str) -> torch.Tensor:
    """JPEG bytes -> uint8 RGB CHW tensor (libjpeg-turbo), or a UserError naming ``what``."""
    if isinstance(data, bytes):
        data = bytearray(data)  # torch.frombuffer wants a writable buffer
    try:
        if decode_jpeg is not None:
            return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        with Image.open(io.BytesIO(data)) as img:
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
    except (RuntimeError, ValueError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{what} is not a readable JPEG ({reason})") from None


def eval_image(data: bytes, image_size: int, what: str) -> torch.Tensor:
    """What evaluation makes of one stored JPEG: decoded, resized only if its size differs
    (uint8 CHW). The torch backend's eval batches and predict.py both come through here."""
    return TorchTransform(image_size, None)(decode_jpeg_bytes(data, what), None)


def find_bad_sample(root, refs: list[SampleRef], decode: bool = True) -> str | None:
    """The first sample of ``refs`` that cannot be read (or, with ``decode``, decoded), as a
    message; None if all can."""
    for chunk in chunked(refs, 64):
        try:
            for ref, data, _ in read_chunk(root, chunk):
                if decode:
                    decode_sample(ref, data)
        except UserError as err:
            return str(err)
    return None
