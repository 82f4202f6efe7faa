"""Where the model looks: Grad-CAM class-activation maps, and their overlays on the photograph.

Grad-CAM (Selvaraju et al., 2017): the feature maps A_k of one ResNet stage, weighted by
the mean gradient of a target score over each map, summed and rectified,
``relu(sum_k mean(d score / d A_k) * A_k)``, upsampled to the input and scaled to [0, 1].
The target score is what the model is asked to explain. By default, for every head, the
referral decision a screening tool makes ("referable" = grade >= 2):

- ``classify``: the log-odds of referable, ``logsumexp(z_2..z_4) - logsumexp(z_0, z_1)``;
- ``regress``: the score itself (the expected grade; referral is a cut on it);
- ``ordinal``: the logit of "referable" (grade > 1), ``min(z_0, z_1)`` as in the head's
  non-increasing P(grade > k).

``target="predicted"`` maps the predicted grade's logit instead (classify only; the default
until 2026-12-04) and ``target="expected"`` the expected grade (``sum_g g * p_g``; ordinal:
``sum_k P(grade > k)``). On the demo's classify run the referral maps put 1.50x the lesions'
area share of the heat inside the lesion masks, the predicted grade's maps 1.16x, and only
the referral maps beat the same maps scored against other photographs' masks (1.39x against
0.97x); docs/benchmarks.md has the table.

The stage is ``layer3`` by default, not the last one: at the sizes this project trains at
on a CPU (64-128 px) ``layer4`` is 2x2 to 4x4 cells, too coarse to say which lesion the
model found; ``layer3`` is twice as fine and still late enough to be specific. ``layer2``
scored higher on the demo's run (1.67x) but that is one run at one size; the figures are
in docs/benchmarks.md. Written here in 40 lines rather than taken from the
``grad-cam`` package: that package requires opencv-python-headless, ttach, tqdm and scipy
for one forward hook and one ``torch.autograd.grad`` call, and knows nothing of the heads.

Heat outside the fundus circle (the circle of a prepared image, ``fundus_circle`` of the
packing step, which Graham's normalisation masks too) is set to zero before the map is
scaled: the black corners hold no retina, yet the regress head's maps were often hottest
there. Overlays carry a colour scale (0 = none of the map's heat, 1 = its peak).

``lesion_heat`` measures whether the map points at lesions: the share of the heat inside a
lesion mask against the mask's share of the fundus (``tools/lesion_heat.py``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn

from pipeline.constants import NUM_CLASSES
from pipeline.errors import UserError
from pipeline.fileio import inside
from pipeline.loading.contract import normalization
from pipeline.loading.samples import chunked, eval_image, read_chunk
from pipeline.manifest import read_manifest
from pipeline.shardformat import read_index
from pipeline.writing.preprocess import border_box, fundus_circle, open_image, passthrough_bytes
from trainer.base.metrics import REFERABLE_GRADE
from trainer.judging.options import CAM_DIR, CAM_LAYER, CAM_TARGET, CAM_TARGETS  # noqa: F401

FUNDUS_LEVEL = 20  # brightest channel above this (of 255): the fundus, not the black frame
PANEL = 256  # px: each half of an overlay picture is drawn at least this large
SCALE_WIDTH = 44  # px: the colour scale right of the overlay
HEAT_ALPHA = 0.5
EXPLAIN_BATCH = 16  # images per forward and backward pass


def target_score(head: str, out: Tensor, target: str = CAM_TARGET) -> Tensor:
    """Per image, the scalar the map explains (see the module docstring)."""
    if target not in CAM_TARGETS:
        raise UserError(f"unknown map target {target!r}; one of {', '.join(CAM_TARGETS)}")
    if target == "predicted" and head != "classify":
        raise UserError(f"the predicted grade's logit exists for the classify head, not {head}")
    if head == "regress":
        return out[:, 0]
    if head == "ordinal":
        if target == "expected":
            return torch.sigmoid(torch.cummin(out, dim=1).values).sum(dim=1)
        return torch.minimum(out[:, 0], out[:, 1])
    if target == "predicted":
        return out.gather(1, out.argmax(dim=1, keepdim=True))[:, 0]
    if target == "expected":
        grades = torch.arange(out.shape[1], dtype=out.dtype, device=out.device)
        return (out.softmax(dim=1) * grades).sum(dim=1)
    low = REFERABLE_GRADE
    return torch.logsumexp(out[:, low:], dim=1) - torch.logsumexp(out[:, :low], dim=1)


def grad_cam(
    model: nn.Module,
    images: Tensor,
    head: str,
    layer: str = CAM_LAYER,
    target: str = CAM_TARGET,
    fundus_only: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) maps in [0, 1] at the input's size, and the raw outputs (N, k), for a batch
    of normalised images, zero outside the fundus circle unless ``fundus_only`` is false
    (tools/lesion_heat.py measures what it removes); the model's weights and mode are left
    as they were."""
    stages = dict(model.named_modules())
    if layer not in stages:
        raise UserError(f"the model has no stage {layer!r} to map")
    stage = stages[layer]
    captured: list[Tensor] = []
    hook = stage.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            out = model(images)
            maps = captured[0]
            (grads,) = torch.autograd.grad(target_score(head, out, target).sum(), maps)
    finally:
        hook.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * maps).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    if fundus_only:
        cam = cam * torch.from_numpy(fundus_circle(cam.shape[2], cam.shape[1])).to(cam.device)
    peak = cam.flatten(1).max(dim=1).values.clamp(min=1e-12)[:, None, None]
    return (cam / peak).detach().cpu().numpy(), out.detach().float().cpu().numpy()


# ---------------------------------------------------------------- pictures


def heat_colours(cam: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 with matplotlib's jet colour map."""
    from matplotlib import colormaps

    return (colormaps["jet"](cam)[..., :3] * 255).astype(np.uint8)


def colour_scale(height: int) -> Image.Image:
    """The map's colours from 1 (top) to 0 (bottom), labelled: what the overlay's hues mean."""
    bar = heat_colours(np.linspace(1, 0, height)[:, None].repeat(12, axis=1))
    scale = Image.new("RGB", (SCALE_WIDTH, height), "white")
    scale.paste(Image.fromarray(bar), (0, 0))
    draw = ImageDraw.Draw(scale)
    for value, y in ((1.0, 0), (0.5, height // 2 - 5), (0.0, height - 11)):
        draw.text((15, y), f"{value:g}", fill="black")
    return scale


def overlay(pixels: np.ndarray, cam: np.ndarray, caption: str = "") -> Image.Image:
    """The photograph as the model saw it (H, W, 3 uint8) beside it with the map laid over,
    enlarged to at least ``PANEL`` px, the colour scale at the right, a caption below."""
    heat = heat_colours(cam).astype(np.float32)
    blended = (1 - HEAT_ALPHA) * pixels.astype(np.float32) + HEAT_ALPHA * heat
    scale = max(1, -(-PANEL // pixels.shape[0]))
    size = (pixels.shape[1] * scale, pixels.shape[0] * scale)
    left = Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC)
    right = Image.fromarray(blended.clip(0, 255).astype(np.uint8)).resize(
        size, Image.Resampling.BICUBIC
    )
    lines = caption.splitlines() or [""]
    width = 2 * size[0] + 16 + SCALE_WIDTH
    canvas = Image.new("RGB", (width, size[1] + 6 + 14 * len(lines)), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (size[0] + 8, 0))
    canvas.paste(colour_scale(size[1]), (2 * size[0] + 16, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, size[1] + 3 + 14 * i), line, fill="black")
    return canvas


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def to_pixels(image: Tensor) -> np.ndarray:
    """A uint8 CHW tensor (what the loaders decode) -> (H, W, 3) uint8."""
    return image.permute(1, 2, 0).cpu().numpy().astype(np.uint8)


def caption_of(name: str, grade: int, referable: float, true: int | None = None) -> str:
    truth = f"true grade {true}, " if true is not None else ""
    return f"{name}\n{truth}predicted grade {grade}, referable score {referable:.2f}"


# ---------------------------------------------------------------- lesions


def fundus_of(pixels: np.ndarray) -> np.ndarray:
    """(H, W) bool: the lit part of the photograph (the retina), not the black frame."""
    return pixels.max(axis=2) > FUNDUS_LEVEL


def lesion_heat(cam: np.ndarray, lesions: np.ndarray, fundus: np.ndarray) -> tuple[float, float]:
    """(share of the map's heat inside the lesions, the lesions' share of the fundus area),
    both over the fundus; a map that ignored lesions would give equal shares."""
    heat = cam * fundus
    total = heat.sum()
    heat_share = float((heat * lesions).sum() / total) if total > 0 else 0.0
    area_share = float((lesions & fundus).sum() / max(fundus.sum(), 1))
    return heat_share, area_share


def mask_as_model_saw(
    photo: Path, mask: Path, shard_size: int, image_size: int, graham: bool = False
) -> np.ndarray:
    """A photograph's lesion mask through the photograph's own preparation (the shard
    builder's crop, pad and resize, then the loader's resize): (image_size,)*2 bool, true
    where any part of a lesion falls in the pixel."""
    with Image.open(mask) as m:
        lesions = m.convert("L")
    if graham or passthrough_bytes(photo, shard_size) is None:  # prepare() re-encodes it
        img = open_image(photo, draft_size=shard_size)
        lesions = lesions.resize(img.size, Image.Resampling.BILINEAR)
        box = border_box(img)
        lesions = lesions.crop(box) if box else lesions
        (w, h), side = lesions.size, max(lesions.size)
        square = Image.new("L", (side, side), 0)  # as pad_square centres the photograph
        square.paste(lesions, ((side - w) // 2, (side - h) // 2))
        lesions = square
        lesions = lesions.resize((shard_size, shard_size), Image.Resampling.BILINEAR)
    if lesions.size != (image_size, image_size):
        lesions = lesions.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(lesions) > 0


# ---------------------------------------------------------------- photographs in shards


def samples_by_key(shards: Path, split: str, keys: list[str]) -> dict[str, bytes]:
    """The stored JPEG bytes of ``keys`` in a split of a shard folder (read by its index)."""
    wanted, found = set(keys), {}
    manifest = read_manifest(shards)
    for shard in manifest.split(split).shards:
        refs = [r for r in read_index(manifest.root / shard.index, shard.file) if r.key in wanted]
        for chunk in chunked(refs):
            for ref, data, _ in read_chunk(manifest.root, chunk):
                found[ref.key] = bytes(data)
    return found


def explain_images(
    model: nn.Module,
    info: dict,
    images: list[Tensor],
    device: str | torch.device = "cpu",
    layer: str = CAM_LAYER,
    target: str = CAM_TARGET,
    fundus_only: bool = True,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(pixels as the model saw them, map) for uint8 CHW images at the checkpoint's size,
    a few at a time (``fundus_only``: as ``grad_cam``)."""
    shift, scale = normalization(device, info["mean"], info["std"])
    head = info.get("head", "classify")
    results = []
    for start in range(0, len(images), EXPLAIN_BATCH):
        batch = torch.stack(images[start : start + EXPLAIN_BATCH]).to(device)
        x = torch.addcmul(shift, batch, scale)
        cams, _ = grad_cam(model, x, head, layer, target, fundus_only)
        results += [(to_pixels(img), cam) for img, cam in zip(batch, cams, strict=True)]
    return results


def rank_wrong(table) -> list[int]:
    """Row positions of a predictions table (true, pred, p0..p4), the most confidently
    wrong first: the largest grade distance, then the highest confidence in the wrong grade;
    the right ones follow, least confident first."""
    probs = table[[f"p{g}" for g in range(NUM_CLASSES)]].to_numpy()
    pred, true = table["pred"].to_numpy(), table["true"].to_numpy()
    conf = probs[np.arange(len(pred)), pred]
    distance = np.abs(pred - true)
    wrong_first = np.where(distance > 0, -conf, conf)  # right ones: least confident first
    return list(np.lexsort((wrong_first, -distance)))


def write_overlays(
    model: nn.Module,
    info: dict,
    shards: Path,
    split: str,
    table,
    folder: Path,
    device: str | torch.device = "cpu",
    captioned: bool = True,
) -> list[Path]:
    """``folder/<key>.png`` for each row of a predictions table (key, true, pred,
    referable_score), the photographs read from the shards; ``captioned``: the caption
    drawn into the picture (the report writes its own beside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    stored = samples_by_key(shards, split, list(table["key"]))
    size = int(info["image_size"])
    images = [eval_image(stored[k], size, k) for k in table["key"]]
    paths = []
    for (pixels, cam), row in zip(
        explain_images(model, info, images, device), table.itertuples(), strict=True
    ):
        caption = caption_of(row.key, int(row.pred), float(row.referable_score), int(row.true))
        caption = caption if captioned else ""
        path = inside(folder, f"{row.key}.png")  # a key read from a shard names no other place
        overlay(pixels, cam, caption).save(path)
        paths.append(path)
    return paths
