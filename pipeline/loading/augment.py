"""Train-time augmentation options and their torchvision v2 implementation.

The same ``AugmentConfig`` drives both backends and means the same thing on each
(the DALI graph in ``pipeline/dali.py`` applies the same steps in the same order):

1. random resized crop (``scale``): a square crop whose area is a fraction uniform in
   ``[1 - scale, 1]`` of the image, at a uniform position, resized to the output size;
   otherwise a plain resize, and only when the stored size differs from the output size;
2. rotation (``rotate``): angle uniform in ``[-rotate, rotate]`` degrees about the
   centre, same size, black fill (the fundus background is black);
3. vertical flip (p=0.5); 4. brightness then contrast (``color``), each factor
   uniform in ``[1 - color, 1 + color]``, contrast about the image's grey mean
   (torchvision's definition); 5. horizontal flip (p=0.5).

Parameters are drawn from an explicit ``numpy.random.Generator``, never from torch's
global RNG, so a worker's images depend only on (seed, epoch, rank, worker).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.errors import UserError

# ITU-R 601 luma weights: torchvision's rgb_to_grayscale, used as the contrast centre.
GREY_WEIGHTS = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = True  # random horizontal flip (p=0.5)
    vflip: bool = True  # random vertical flip (p=0.5)
    rotate: float = 0.0  # max degrees, angle uniform in [-rotate, rotate]; 0 = off
    scale: float = 0.0  # random resized crop: area fraction uniform in [1 - scale, 1]; 0 = off
    color: float = 0.0  # brightness and contrast factors uniform in [1 - color, 1 + color]; 0 = off

    def __post_init__(self):
        if not 0 <= self.rotate <= 180:
            raise UserError(f"rotation must be between 0 and 180 degrees, got {self.rotate}")
        if not 0 <= self.scale < 1:
            raise UserError(f"scale jitter must be in [0, 1), got {self.scale}")
        if not 0 <= self.color < 1:
            raise UserError(f"colour jitter must be in [0, 1), got {self.color}")


NO_AUGMENT = AugmentConfig(hflip=False, vflip=False)  # evaluation
# --augment: the reference recipe's flips, or what DR needs besides -- a fundus has no "up",
# so rotation through the full circle, plus a zoom and the exposure spread between cameras.
PRESETS = {
    "reference": AugmentConfig(),
    "strong": AugmentConfig(rotate=180.0, scale=0.25, color=0.2),
}


def augment_preset(name: str, **knobs: float | None) -> AugmentConfig:
    """The preset ``name`` with any knob (``rotate``, ``scale``, ``color``) that is not None replaced."""
    if name not in PRESETS:
        raise UserError(f"unknown augmentation '{name}'; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in knobs.items() if v is not None})


def crop_box(
    height: int, width: int, scale: float, rng: np.random.Generator
) -> tuple[int, int, int]:
    """(top, left, side) of a square crop covering a uniform [1 - scale, 1] fraction of the area."""
    area = rng.uniform(1.0 - scale, 1.0) * height * width
    side = max(1, min(height, width, round(math.sqrt(area))))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    return top, left, side


class TorchTransform:
    """Resize/augment one decoded uint8 CHW tensor; the torch backend's per-sample transform."""

    def __init__(self, size: int, augment: AugmentConfig | None):
        self.size = size
        self.augment = augment  # None: eval (resize only when needed)

    def __call__(self, img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        aug = self.augment
        out = [self.size, self.size]
        if aug is not None and aug.scale > 0:
            top, left, side = crop_box(img.shape[-2], img.shape[-1], aug.scale, rng)
            img = F.resized_crop(img, top, left, side, side, out, antialias=True)
        elif tuple(img.shape[-2:]) != tuple(out):
            img = F.resize(img, out, antialias=True)
        if aug is None:
            return img
        if aug.rotate > 0:
            angle = float(rng.uniform(-aug.rotate, aug.rotate))
            img = F.rotate(img, angle, interpolation=InterpolationMode.BILINEAR, fill=0)
        if aug.vflip and rng.random() < 0.5:
            img = F.vertical_flip(img)
        if aug.color > 0:
            brightness, contrast = rng.uniform(1 - aug.color, 1 + aug.color, size=2)
            img = F.adjust_contrast(F.adjust_brightness(img, float(brightness)), float(contrast))
        if aug.hflip and rng.random() < 0.5:
            img = F.horizontal_flip(img)
        return img
