"""The train split's per-channel pixel mean and std, measured while packing.

Each train image contributes its pixel count and, per RGB channel, the sum and the sum of
squares of its 8-bit values, taken from the JPEG bytes the shard stores (what every loader
decodes). The sums are integers, so shards add up exactly in any order, and a shard's sums
are kept in the packing record with the shard (a rerun that reuses it does not decode it
again). ``make_shards`` writes the result to ``manifest.json`` as

    "channel_stats": {"split": "train", "images": N, "mean": [r, g, b], "std": [r, g, b]}

on the 0-255 scale (as ``pipeline.constants.IMAGENET_MEAN``); ``--normalize dataset`` in
the trainer uses it.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

# [pixels, sum R, sum G, sum B, sum R^2, sum G^2, sum B^2]
ZERO = (0,) * 7
LEVELS = np.arange(256, dtype=np.int64)
LEVELS_SQUARED = LEVELS * LEVELS


def image_sums(data: bytes) -> list[int]:
    """The pixel count, channel sums and channel sums of squares of one JPEG's RGB pixels."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
        # PIL's 256-bin histogram per channel (in C) gives both sums exactly
        hists = np.asarray(rgb.histogram(), dtype=np.int64).reshape(3, 256)
        pixels = rgb.width * rgb.height
    sums = (hists @ LEVELS).tolist()
    squares = (hists @ LEVELS_SQUARED).tolist()
    return [pixels, *sums, *squares]


def add(a, b) -> list[int]:
    return [int(x) + int(y) for x, y in zip(a, b, strict=True)]


def stats(sums, images: int, split: str = "train") -> dict | None:
    """The manifest's ``channel_stats`` entry for accumulated ``sums`` (None for no pixels)."""
    n = sums[0]
    if not n:
        return None
    mean = [s / n for s in sums[1:4]]
    std = [math.sqrt(max(q / n - m * m, 0.0)) for q, m in zip(sums[4:7], mean, strict=True)]
    return {
        "split": split,
        "images": int(images),
        "mean": [round(m, 4) for m in mean],
        "std": [round(s, 4) for s in std],
    }
