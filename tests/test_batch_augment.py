"""The torch backend's augmentation on the device (issue 17 §1): the workers crop/resize and
draw the parameters, ``augment_batch`` applies them to the whole batch.

The CPU path (``TorchTransform``, torchvision per sample) is the reference. ``augment_batch``
keeps torchvision's uint8 rounding step by step and builds the rotation grid as torchvision
does; on this CPU it gives the reference's pixels exactly (max and mean difference 0). The
tolerance the tests allow is what a device's different float rounding may cost: a rotated
pixel one level off (the only non-exact step), which brightness then contrast, each a factor
up to 1 + color and truncated, can widen to at most three levels; on average far under 0.01
of a level (a rotation 1 degree off, or a grid half a pixel off, costs levels on average).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skimage_data
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.loading.augment import (
    NO_AUGMENT,
    PARAM_COLUMNS,
    PRESETS,
    AugmentConfig,
    AugmentParams,
    TorchTransform,
    crop_box,
    translate,
)
from pipeline.loading.batch_augment import augment_batch
from pipeline.loading.loader import TrainSpec, build_loader
from pipeline.loading.samples import chunked
from pipeline.loading.torch_backend import ShardSlice, TorchLoader
from tests.conftest import epoch_without_host_waits

MAX_LEVELS = 3  # on the 0-255 scale
MEAN_LEVELS = 0.01
EVERYTHING = AugmentConfig(rotate=180.0, scale=0.25, color=0.2, translate=0.2)
CONFIGS = {
    "strong": PRESETS["strong"],
    "huang2023": PRESETS["huang2023"],
    "rotate-only": AugmentConfig(rotate=30.0, hflip=False, vflip=False),
    "wide-colour": AugmentConfig(rotate=180.0, translate=0.3, color=0.5),
}
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


def sample_images(size: int = 64) -> list[torch.Tensor]:
    """uint8 CHW: a real fundus photograph, and synthetic ones (noise, a gradient, a disc
    with a bright spot on black, a flat grey)."""
    rng = np.random.default_rng(7)
    retina = torch.from_numpy(skimage_data.retina()).permute(2, 0, 1)
    y, x = np.mgrid[:size, :size]
    disc = ((x - size / 2) ** 2 + (y - size / 2) ** 2 < (0.45 * size) ** 2).astype(np.uint8)
    fundus = np.stack([180 * disc, 90 * disc, 40 * disc])
    fundus[:, size // 3 : size // 3 + 4, size // 2 : size // 2 + 4] = 250
    gradient = np.stack([x * 4, y * 4, (x + y) * 2]).clip(0, 255).astype(np.uint8)
    return [
        F.resize(retina, [size, size], antialias=True),
        torch.from_numpy(rng.integers(0, 256, (3, size, size), dtype=np.uint8)),
        torch.from_numpy(gradient),
        torch.from_numpy(fundus),
        torch.full((3, size, size), 128, dtype=torch.uint8),
    ]


def levels(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max, mean) absolute difference of two uint8 batches, in levels."""
    diff = (a.int() - b.int()).abs().float()
    return float(diff.max()), float(diff.mean())


def within_tolerance(a: torch.Tensor, b: torch.Tensor) -> bool:
    most, mean = levels(a, b)
    return most <= MAX_LEVELS and mean <= MEAN_LEVELS


def as_levels(by_key: dict[str, torch.Tensor]) -> torch.Tensor:
    """Normalised images (key -> CHW), in key order, back on the 0-255 scale as uint8."""
    images = torch.stack([by_key[k].cpu() for k in sorted(by_key)])
    return (images * STD + MEAN).round().clamp(0, 255).to(torch.uint8)


def draw_batch(augment: AugmentConfig, n: int, seed: int):
    """n images (the test images in turn), their drawn parameters, and the reference output."""
    transform = TorchTransform(64, augment)
    rng = np.random.default_rng(seed)
    images = sample_images()
    batch = torch.stack([images[i % len(images)] for i in range(n)])
    drawn = [transform.draw(rng) for _ in range(n)]
    reference = torch.stack([transform.apply(img, p) for img, p in zip(batch, drawn, strict=True)])
    params = torch.tensor([p.row() for p in drawn], dtype=torch.float64)
    return batch, params, drawn, reference


# ---------------------------------------------------------------- the function itself


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_batch_function_equals_the_per_sample_transform(name):
    augment = CONFIGS[name]
    batch, params, drawn, reference = draw_batch(augment, 24, seed=len(name))
    out = augment_batch(batch, params, augment)
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert within_tolerance(out, reference), levels(out, reference)
    # the same from a channels_last batch (the workers' layout with --channels-last)
    wide = augment_batch(batch.contiguous(memory_format=torch.channels_last), params, augment)
    assert torch.equal(wide, out)
    assert not torch.equal(out, batch)  # it did augment


def test_the_tolerance_catches_a_wrong_rotation():
    """The tolerance is tight enough to fail a rotation 1 degree off or a sampling grid half a
    pixel off: what a geometry mistake would look like."""
    augment = AugmentConfig(rotate=180.0, hflip=False, vflip=False)
    batch, params, _, reference = draw_batch(augment, 20, seed=3)
    off = params.clone()
    off[:, PARAM_COLUMNS.index("angle")] += 1.0
    assert not within_tolerance(augment_batch(batch, off, augment), reference)
    shifted = torch.stack(
        [
            F.affine(
                img,
                angle=0.0,
                translate=[0.5, 0.0],
                scale=1.0,
                shear=[0.0, 0.0],
                interpolation=InterpolationMode.BILINEAR,
                fill=0,
            )
            for img in augment_batch(batch, params, augment)
        ]
    )
    assert not within_tolerance(shifted, reference)


def test_rotation_of_a_non_square_batch_equals_torchvision():
    rng = np.random.default_rng(2)
    batch = torch.from_numpy(rng.integers(0, 256, (6, 3, 24, 40), dtype=np.uint8))
    angles = rng.uniform(-180, 180, 6)
    params = torch.zeros(6, len(PARAM_COLUMNS), dtype=torch.float64)
    params[:, PARAM_COLUMNS.index("angle")] = torch.from_numpy(angles)
    out = augment_batch(batch, params, AugmentConfig(rotate=180.0, hflip=False, vflip=False))
    reference = torch.stack(
        [
            F.rotate(img, float(a), interpolation=InterpolationMode.BILINEAR, fill=0)
            for img, a in zip(batch, angles, strict=True)
        ]
    )
    assert within_tolerance(out, reference), levels(out, reference)


def test_every_knob_off_leaves_the_batch_unchanged():
    batch = torch.stack(sample_images())
    identity = torch.tensor([AugmentParams().row()] * len(batch), dtype=torch.float64)
    assert torch.equal(augment_batch(batch, identity, NO_AUGMENT), batch)
    # every knob on, every draw the identity: no step moves a pixel (no half-pixel grid)
    everything = AugmentConfig(rotate=180.0, translate=0.5, color=0.5)
    assert torch.equal(augment_batch(batch, identity, everything), batch)
    # with the knobs off, the parameters are not looked at
    rows = draw_batch(EVERYTHING, len(batch), seed=1)[1]
    assert torch.equal(augment_batch(batch, rows, NO_AUGMENT), batch)


# ---------------------------------------------------------------- the CPU path, unchanged


def transform_before_issue_17(size, aug, img, rng):
    """``TorchTransform.__call__`` as it was before the parameters were split from their
    application (commit 73e1652), kept verbatim as the CPU path's fixed reference."""
    out = [size, size]
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
    if aug.translate > 0 and aug.max_shift(size) > 0:
        most = aug.max_shift(size)
        dx, dy = (int(v) for v in rng.integers(-most, most + 1, size=2))
        img = translate(img, dx, dy)
    if aug.vflip and rng.random() < 0.5:
        img = F.vertical_flip(img)
    if aug.color > 0:
        brightness, contrast = rng.uniform(1 - aug.color, 1 + aug.color, size=2)
        img = F.adjust_contrast(F.adjust_brightness(img, float(brightness)), float(contrast))
    if aug.hflip and rng.random() < 0.5:
        img = F.horizontal_flip(img)
    return img


@pytest.mark.parametrize("augment", [None, PRESETS["reference"], EVERYTHING, *CONFIGS.values()])
def test_the_cpu_path_gives_the_pixels_it_gave_before(augment):
    """Byte for byte, and the generator left in the same state (the next sample's draws)."""
    new_rng, old_rng = np.random.default_rng(11), np.random.default_rng(11)
    transform = TorchTransform(48, augment)
    for img in sample_images(64) * 3:  # stored 64 px, output 48: the resize path too
        assert torch.equal(
            transform(img, new_rng), transform_before_issue_17(48, augment, img, old_rng)
        )
    assert new_rng.random() == old_rng.random()


# ---------------------------------------------------------------- the workers and the loader


def worker_batches(spec, defer_augment: bool, epoch: int = 1):
    """One epoch of raw worker batches (two workers), uint8, as the DataLoader hands them over."""
    chunks = chunked(spec.samples(0, spec.total))
    data = ShardSlice(spec, chunks, epoch, normalize=False, defer_augment=defer_augment)
    return list(DataLoader(data, batch_size=None, num_workers=2))


def test_the_workers_draw_for_the_device_what_they_apply_on_the_cpu(tiny_shards):
    """Same seed, same worker: the CPU path's image equals ``augment_batch`` applied to the
    deferred path's cropped image and parameter row."""
    spec = build_loader(
        tiny_shards,
        TrainSpec(
            batch_size=4,
            image_size=48,
            seed=5,
            augment=EVERYTHING,
            channels_last=True,
            backend="torch",
        ),
    ).spec
    on_cpu, deferred = worker_batches(spec, False), worker_batches(spec, True)
    assert len(on_cpu) == len(deferred) and sum(len(b[1]) for b in deferred) == 40
    for (images, labels, keys), (pre, pre_labels, pre_keys, params) in zip(
        on_cpu, deferred, strict=True
    ):
        assert keys == pre_keys and torch.equal(labels, pre_labels)
        assert params.dtype == torch.float64 and params.shape == (len(keys), len(PARAM_COLUMNS))
        out = augment_batch(pre, params, EVERYTHING)
        assert within_tolerance(out, images), levels(out, images)
    angles = torch.cat([b[3][:, PARAM_COLUMNS.index("angle")] for b in deferred])
    assert angles.abs().min() > 0 and angles.std() > 30  # every sample drew its own angle
    changed = sum(not torch.equal(a[0], d[0]) for a, d in zip(on_cpu, deferred, strict=True))
    assert changed == len(on_cpu)  # the deferred images were not augmented in the workers


def test_the_loader_augmenting_on_the_device_matches_its_cpu_path(tiny_shards):
    """The whole loader with the device's path forced on the CPU: workers, topping up of the
    partial batches (two workers with 21 and 19 samples), augmentation, normalisation."""

    def build():
        return build_loader(
            tiny_shards,
            TrainSpec(
                batch_size=4,
                image_size=64,
                seed=2,
                workers=2,
                augment=EVERYTHING,
                backend="torch",
                with_keys=True,
            ),
        )

    reference, forced = build(), build()
    assert not reference.augment_on_device
    forced.augment_on_device = True
    for ld in (reference, forced):
        ld.set_epoch(1)
    cpu = {k: x for images, _, keys in reference for k, x in zip(keys, images, strict=True)}
    device = {k: x for images, _, keys in forced for k, x in zip(keys, images, strict=True)}
    assert len(cpu) == 40 and set(device) == set(cpu)
    a, b = as_levels(cpu), as_levels(device)
    assert within_tolerance(a, b), levels(a, b)


def test_topping_up_keeps_each_parameter_row_with_its_image(tiny_shards):
    """Worker batches of uneven sizes, each field's row ``i`` tagged with the sample's number:
    after joining and cutting, every row of every field still names the same sample."""
    ld = build_loader(tiny_shards, TrainSpec(batch_size=4, image_size=8, backend="torch"))
    assert isinstance(ld, TorchLoader) and ld.steps == 10
    sizes = [4, 3, 1, 4, 2, 3, 3, 4, 1, 2, 4, 1, 3, 2, 3]  # 40 samples
    start = np.cumsum([0, *sizes])
    items = []
    for lo, hi in zip(start[:-1], start[1:], strict=True):
        ids = torch.arange(lo, hi)
        images = ids.view(-1, 1, 1, 1).expand(-1, 3, 8, 8).to(torch.uint8).contiguous()
        params = ids.view(-1, 1).expand(-1, len(PARAM_COLUMNS)).to(torch.float64).contiguous()
        items.append((images, ids, [f"s{i}" for i in ids.tolist()], params))
    for fields in (4, 3):  # with parameters (device augmentation) and without (the CPU path)
        seen = []
        for batch in ld._full_batches(iter([item[:fields] for item in items]), ld.steps):
            assert len(batch) == fields and len(batch[1]) == 4
            ids = batch[1].tolist()
            assert batch[0].amax((1, 2, 3)).tolist() == ids == batch[0].amin((1, 2, 3)).tolist()
            assert batch[2] == [f"s{i}" for i in ids]
            if fields == 4:
                assert batch[3].amax(1).tolist() == ids == batch[3].amin(1).tolist()
            seen += ids
        assert sorted(seen) == list(range(40))


# ---------------------------------------------------------------- on a GPU (skipped without)


def gpu_loader(shards, augment, device: str, **kw):
    return build_loader(
        shards,
        TrainSpec(
            batch_size=4,
            image_size=64,
            seed=3,
            workers=2,
            backend="torch",
            device=device,
            augment=augment,
            **kw,
        ),
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_backend_on_the_gpu_matches_its_cpu_path(tiny_shards):
    """The GPU's augmentation against the CPU path's, same seed: within the tolerance."""
    on_gpu = gpu_loader(tiny_shards, EVERYTHING, "cuda", with_keys=True)
    assert on_gpu.augment_on_device
    gpu = {k: x.cpu() for images, _, keys in on_gpu for k, x in zip(keys, images, strict=True)}
    on_cpu = gpu_loader(tiny_shards, EVERYTHING, "cpu", with_keys=True)
    cpu = {k: x for images, _, keys in on_cpu for k, x in zip(keys, images, strict=True)}
    assert set(gpu) == set(cpu) and len(cpu) == 40

    assert within_tolerance(as_levels(gpu), as_levels(cpu)), levels(as_levels(gpu), as_levels(cpu))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("augment", [PRESETS["strong"], EVERYTHING])
def test_torch_backend_gpu_batches_never_wait_for_the_host(tiny_shards, augment):
    """A train epoch of the torch backend on the GPU under CUDA's sync debug mode: the pinned
    uint8 batch and its parameter rows copied asynchronously, augmented and normalised on the
    GPU, the partial batches joined into pinned memory; nothing waits. The first batch (the
    workers' start) is taken before the mode is on."""
    ld = gpu_loader(tiny_shards, augment, "cuda", channels_last=True)
    seen, images, labels = epoch_without_host_waits(ld)
    assert seen == len(ld) == 10
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(images).all() and int(labels.max()) < 5
