"""Steps 2-6 of ``pipeline.loading.augment`` on a whole uint8 batch, on whatever device it is on.

For a GPU target the torch backend's workers decode, crop/resize (step 1) and only draw each
sample's parameters (``TorchTransform.draw``, the same generator calls in the same order as
the CPU path); the batch reaches the GPU as uint8 with a ``(B, len(PARAM_COLUMNS))`` float64
tensor of those draws, and ``augment_batch`` applies them there, before normalisation:

- rotation: one sampling grid for every sample's angle and one ``grid_sample`` call,
  torchvision's geometry (about the image's centre, ``align_corners=False``) and black fill
  (the image sampled together with a plane of ones, and multiplied by it);
- translation and both flips: a gather along the rows and one along the columns. The
  brightness/contrast step that the documented order puts between the vertical and the
  horizontal flip commutes with a flip (it is per pixel, and its centre is a mean over the
  image), so all the moving is done first;
- brightness then contrast about the image's grey mean (ITU-R 601 weights).

Each step keeps torchvision's uint8 arithmetic (the rotation rounded, brightness and contrast
truncated and clamped to 0-255, the grey of the contrast centre floored) and builds the
rotation's grid with torchvision's arithmetic, so on the CPU the result is
``TorchTransform.apply``'s level for level (tests/test_batch_augment.py). A GPU's kernels
may round a rotated pixel the other way (one level), which brightness and contrast can
widen to three; the GPU test allows that. Nothing here reads a device value back: no host
sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

from pipeline.loading.augment import GREY_WEIGHTS, PARAM_COLUMNS, AugmentConfig

COLUMN = {name: i for i, name in enumerate(PARAM_COLUMNS)}


def augment_batch(
    images: torch.Tensor, params: torch.Tensor, augment: AugmentConfig
) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` with row ``i`` of ``params`` (``PARAM_COLUMNS``) applied to image
    ``i``; the steps ``augment`` turns off are skipped (then the draws are the identity)."""
    column = {name: params[:, i] for name, i in COLUMN.items()}
    if augment.rotate > 0:
        images = rotate(images, column["angle"])
    if augment.translate > 0 or augment.vflip or augment.hflip:
        images = move(images, column["dx"], column["dy"], column["vflip"], column["hflip"])
    if augment.color > 0:
        images = brightness_contrast(images, column["brightness"], column["contrast"])
    return images


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Each image turned counter-clockwise by its angle about its centre, bilinear, black
    outside: torchvision's ``rotate(..., BILINEAR, fill=0)`` for a batch of angles."""
    b, c, h, w = images.shape
    planes = torch.cat([images.float(), images.new_ones(b, 1, h, w, dtype=torch.float32)], 1)
    sampled = nnf.grid_sample(
        planes, rotation_grid(degrees, h, w), "bilinear", "zeros", align_corners=False
    )
    # torchvision's fill: the value times how much of the sample fell inside the image
    return (sampled[:, :c] * sampled[:, c:]).round_().to(torch.uint8)


def rotation_grid(degrees: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``grid_sample``'s (B, H, W, 2) grid (``align_corners=False``) for a rotation by each angle
    about the centre, built as torchvision builds it: output pixel (x, y), measured from the
    centre, samples the source at (x cos a - y sin a, x sin a + y cos a), in units of half the
    width and height. Elementwise, not ``affine_grid``: that one is a batched matmul, which
    runs in TF32 (a 10-bit mantissa) wherever a user allows TF32 matmuls, and the grid's
    coordinates would lose their sub-pixel precision at 512 px."""
    rad = torch.deg2rad(degrees.to(torch.float64) % 360)
    cos = torch.cos(rad).float().view(-1, 1, 1)
    sin = torch.sin(rad).float().view(-1, 1, 1)
    x = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=degrees.device)
    y = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=degrees.device).view(h, 1)
    grid_x = x * (cos / (0.5 * w)) + y * (-sin / (0.5 * w))
    grid_y = x * (sin / (0.5 * h)) + y * (cos / (0.5 * h))
    return torch.stack([grid_x, grid_y], -1)


def move(
    images: torch.Tensor,
    dx: torch.Tensor,
    dy: torch.Tensor,
    vflip: torch.Tensor,
    hflip: torch.Tensor,
) -> torch.Tensor:
    """Each image shifted ``dx`` whole pixels right and ``dy`` down (black where uncovered),
    then flipped vertically where ``vflip`` and horizontally where ``hflip`` (1.0 = yes)."""
    b, c, h, w = images.shape
    ys = torch.arange(h, device=images.device)
    xs = torch.arange(w, device=images.device)
    # output (y, x) is the shifted image at (y, x) with the flips undone, which is the
    # source at that point minus the shift
    src_y = torch.where(vflip[:, None] > 0.5, h - 1 - ys, ys) - dy[:, None].long()
    src_x = torch.where(hflip[:, None] > 0.5, w - 1 - xs, xs) - dx[:, None].long()
    inside_y = ((src_y >= 0) & (src_y < h)).view(b, 1, h, 1)
    inside_x = ((src_x >= 0) & (src_x < w)).view(b, 1, 1, w)
    # two gathers through broadcast (expanded) indexes: no per-pixel index is materialised
    rows = images.gather(2, src_y.clamp(0, h - 1).view(b, 1, h, 1).expand(b, c, h, w))
    moved = rows.gather(3, src_x.clamp(0, w - 1).view(b, 1, 1, w).expand(b, c, h, w))
    return torch.where(inside_y & inside_x, moved, 0)


def brightness_contrast(
    images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor
) -> torch.Tensor:
    """torchvision's ``adjust_contrast(adjust_brightness(img, b), c)`` on uint8, per image."""
    x = images.float()
    x = x.mul(brightness.float().view(-1, 1, 1, 1)).clamp_(0, 255).floor_()
    r, g, b = x.unbind(1)
    grey = r.mul(GREY_WEIGHTS[0]).add_(g, alpha=GREY_WEIGHTS[1]).add_(b, alpha=GREY_WEIGHTS[2])
    centre = grey.floor_().mean(dim=(-2, -1)).view(-1, 1, 1, 1)
    keep = contrast.float().view(-1, 1, 1, 1)
    # x * c + centre * (1 - c) as torchvision's add(..., alpha=1 - c) rounds it: one fused step
    x = torch.addcmul(x.mul_(keep), centre, (1 - contrast).float().view(-1, 1, 1, 1))
    return x.clamp_(0, 255).to(torch.uint8)
