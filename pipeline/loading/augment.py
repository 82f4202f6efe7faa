"""Train-time augmentation options and their torchvision v2 implementation.

The same ``AugmentConfig`` drives both backends and means the same thing on each
(the DALI graph in ``pipeline/loading/dali.py`` applies the same steps in the same order):

1. random resized crop (``scale``): a square crop whose area is a fraction uniform in
   ``[1 - scale, 1]`` of the image, at a uniform position, resized to the output size;
   otherwise a plain resize, and only when the stored size differs from the output size;
2. rotation (``rotate``): angle uniform in ``[-rotate, rotate]`` degrees about the
   centre, same size, black fill (the fundus background is black);
3. translation (``translate``): a shift of whole pixels in x and in y, each uniform over
   ``[-m, m]`` with ``m = floor(translate * size)``; the uncovered area is black (a
   whole-pixel shift moves pixels exactly, so both backends give the same image);
4. vertical flip (p=0.5); 5. brightness then contrast (``color``), each factor
   uniform in ``[1 - color, 1 + color]``, contrast about the image's grey mean
   (torchvision's definition); 6. horizontal flip (p=0.5).

Parameters are drawn from an explicit ``numpy.random.Generator``, never from torch's
global RNG, so a worker's images depend only on (seed, epoch, rank, worker).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import UserError

if TYPE_CHECKING:
    import torch

# torch and torchvision are imported where used: the trainer's command line reads
# AugmentConfig and PRESETS, and answers --help before torch is loaded.

# ITU-R 601 luma weights: torchvision's rgb_to_grayscale, used as the contrast centre.
GREY_WEIGHTS = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = True  # random horizontal flip (p=0.5)
    vflip: bool = True  # random vertical flip (p=0.5)
    rotate: float = 0.0  # max degrees, angle uniform in [-rotate, rotate]; 0 = off
    scale: float = 0.0  # random resized crop: area fraction uniform in [1 - scale, 1]; 0 = off
    color: float = 0.0  # brightness and contrast factors uniform in [1 - color, 1 + color]; 0 = off
    translate: float = 0.0  # max shift in x and y, a fraction of the size; 0 = off

    def __post_init__(self):
        if not 0 <= self.rotate <= 180:
            raise UserError(f"rotation must be between 0 and 180 degrees, got {self.rotate}")
        if not 0 <= self.scale < 1:
            raise UserError(f"scale jitter must be in [0, 1), got {self.scale}")
        if not 0 <= self.color < 1:
            raise UserError(f"colour jitter must be in [0, 1), got {self.color}")
        if not 0 <= self.translate <= 0.5:
            raise UserError(f"translation must be in [0, 0.5] of the size, got {self.translate}")

    def max_shift(self, size: int) -> int:
        """The largest translation, in whole pixels, at output size ``size``."""
        return math.floor(self.translate * size + 1e-9)


NO_AUGMENT = AugmentConfig(hflip=False, vflip=False)  # evaluation
# --augment: the reference recipe's flips, or what DR needs besides -- a fundus has no "up",
# so rotation through the full circle, plus a zoom and the exposure spread between cameras.
PRESETS = {
    "reference": AugmentConfig(),
    "strong": AugmentConfig(rotate=180.0, scale=0.25, color=0.2),
    # Huang et al. 2023's EyePACS set: flips, full rotation, +-20 % translation, brightness
    # and contrast +-0.2, no random crop
    "huang2023": AugmentConfig(rotate=180.0, translate=0.2, color=0.2),
}


def augment_preset(name: str, **knobs: float | None) -> AugmentConfig:
    """The preset ``name`` with any knob (``rotate``, ``scale``, ``color``, ``translate``) that
    is not None replaced."""
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


def translate(img: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``img`` (..., H, W) moved ``dx`` pixels right and ``dy`` down, the uncovered area 0."""
    import torch

    h, w = img.shape[-2:]
    out = torch.zeros_like(img)
    if abs(dx) >= w or abs(dy) >= h:
        return out
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[
        ..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


@dataclass(frozen=True)
class AugmentParams:
    """One sample's draws for steps 2-6 (the identity where a knob is off)."""

    angle: float = 0.0  # degrees, counter-clockwise
    dx: int = 0  # whole pixels right
    dy: int = 0  # whole pixels down
    vflip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    hflip: bool = False

    def row(self) -> tuple[float, ...]:
        """The sample's row of the batch's parameter tensor (``PARAM_COLUMNS`` order)."""
        return tuple(float(getattr(self, name)) for name in PARAM_COLUMNS)


PARAM_COLUMNS = ("angle", "dx", "dy", "vflip", "brightness", "contrast", "hflip")


class TorchTransform:
    """Resize/augment one decoded uint8 CHW tensor; the torch backend's per-sample transform.

    ``__call__`` = ``resize`` (step 1), ``draw`` (the parameters of steps 2-6, from the same
    generator, in the order of the steps) and ``apply`` (steps 2-6 with torchvision). A GPU
    target stops after ``draw`` and applies the parameters to the whole batch on the device
    (``pipeline.loading.batch_augment``).
    """

    def __init__(self, size: int, augment: AugmentConfig | None):
        self.size = size
        self.augment = augment  # None: eval (resize only when needed)

    def __call__(self, img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        img = self.resize(img, rng)
        if self.augment is None:
            return img
        return self.apply(img, self.draw(rng))

    def resize(self, img: torch.Tensor, rng: np.random.Generator | None) -> torch.Tensor:
        """Step 1: the random resized crop, or a resize when the stored size differs."""
        return self.crop_resize(img, self.box(img.shape[-2], img.shape[-1], rng))

    def box(self, height: int, width: int, rng: np.random.Generator | None) -> tuple[int, int, int]:
        """Step 1's crop (top, left, side) of a ``height`` x ``width`` image, drawn when the
        crop is random; (0, 0, 0) for none. The torch-nvjpeg backend's workers draw it from
        the JPEG's header and the GPU crops after decoding."""
        if self.augment is not None and self.augment.scale > 0:
            return crop_box(height, width, self.augment.scale, rng)
        return 0, 0, 0

    def crop_resize(self, img: torch.Tensor, box: tuple[int, int, int]) -> torch.Tensor:
        """Step 1 with its crop drawn: the crop resized to the output size, or (side 0) a
        resize when the image's size differs from it."""
        from torchvision.transforms.v2 import functional as F

        top, left, side = (int(v) for v in box)
        out = [self.size, self.size]
        if side > 0:
            return F.resized_crop(img, top, left, side, side, out, antialias=True)
        if tuple(img.shape[-2:]) != tuple(out):
            return F.resize(img, out, antialias=True)
        return img

    def draw(self, rng: np.random.Generator) -> AugmentParams:
        """The parameters of steps 2-6, drawn in the order the steps run."""
        aug = self.augment
        angle, dx, dy, vflip, brightness, contrast = 0.0, 0, 0, False, 1.0, 1.0
        if aug.rotate > 0:
            angle = float(rng.uniform(-aug.rotate, aug.rotate))
        if aug.translate > 0 and aug.max_shift(self.size) > 0:
            most = aug.max_shift(self.size)
            dx, dy = (int(v) for v in rng.integers(-most, most + 1, size=2))
        if aug.vflip:
            vflip = bool(rng.random() < 0.5)
        if aug.color > 0:
            brightness, contrast = (
                float(v) for v in rng.uniform(1 - aug.color, 1 + aug.color, size=2)
            )
        hflip = bool(aug.hflip and rng.random() < 0.5)
        return AugmentParams(angle, dx, dy, vflip, brightness, contrast, hflip)

    def apply(self, img: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """Steps 2-6 on one image, with torchvision (the reference the batched version meets)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        aug = self.augment
        if aug.rotate > 0:
            img = F.rotate(img, p.angle, interpolation=InterpolationMode.BILINEAR, fill=0)
        if aug.translate > 0 and aug.max_shift(self.size) > 0:
            img = translate(img, p.dx, p.dy)
        if p.vflip:
            img = F.vertical_flip(img)
        if aug.color > 0:
            img = F.adjust_contrast(F.adjust_brightness(img, p.brightness), p.contrast)
        if p.hflip:
            img = F.horizontal_flip(img)
        return img
