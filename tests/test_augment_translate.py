"""Translation augmentation (issue 18): whole-pixel shifts, black fill, the same on both backends.

The backends draw their random shifts from different generators, so they cannot give the
same image for the same sample; what must agree is the transform itself. The DALI graph
(``pipeline.loading.dali.translate``) and the torch function are run on the same images
with the same shifts and must match exactly; each loader's translated images must be its
own untranslated images moved by a whole-pixel shift within the range (to the 1e-4 the
flip tests use), with a black border.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import UserError
from pipeline.loading.augment import AugmentConfig, augment_preset, translate
from tests.conftest import gpu_train_graph
from tests.test_loader import BACKENDS, HAVE_DALI, epoch, loader

BLACK = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)


def test_translate_moves_pixels_and_blackens_the_rest():
    img = torch.arange(1, 13, dtype=torch.uint8).view(1, 3, 4)
    right_up = translate(img, 1, -1)
    assert right_up.tolist() == [[[0, 5, 6, 7], [0, 9, 10, 11], [0, 0, 0, 0]]]
    assert translate(img, 0, 0).equal(img)
    assert translate(img, -4, 0).eq(0).all()


def test_options_and_the_preset():
    assert AugmentConfig(translate=0.2).max_shift(64) == 12
    assert AugmentConfig(translate=0.2).max_shift(512) == 102
    with pytest.raises(UserError, match="translation"):
        AugmentConfig(translate=0.6)
    huang = augment_preset("huang2023")
    assert (huang.hflip, huang.vflip, huang.rotate, huang.translate, huang.color, huang.scale) == (
        True,
        True,
        180.0,
        0.2,
        0.2,
        0.0,
    )
    assert augment_preset("reference", translate=0.1).translate == 0.1


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
def test_dali_graph_equals_the_torch_function():
    from nvidia.dali import fn, pipeline_def

    from pipeline.loading.dali import translate as dali_translate

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 20, 3), dtype=np.uint8) for _ in range(4)]
    shifts = [(3, -2), (-5, 4), (0, 0), (19, 1)]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def shifted():
        im = fn.external_source(source=lambda: images, layout="HWC", batch=True)
        dx = fn.external_source(source=lambda: [np.float32(s[0]) for s in shifts], batch=True)
        dy = fn.external_source(source=lambda: [np.float32(s[1]) for s in shifts], batch=True)
        return dali_translate(im, dx, dy)

    pipe = shifted()
    pipe.build()
    (out,) = pipe.run()
    for i, (dx, dy) in enumerate(shifts):
        expected = translate(torch.from_numpy(images[i]).permute(2, 0, 1), dx, dy)
        assert np.array_equal(np.asarray(out[i]), expected.permute(1, 2, 0).numpy()), (dx, dy)


def shift_of(img: torch.Tensor, plain: torch.Tensor, most: int) -> tuple[int, int] | None:
    """The (dx, dy) within ``most`` that moves ``plain`` onto ``img`` (black border), if any."""
    black = BLACK.expand_as(plain)
    for dy in range(-most, most + 1):
        for dx in range(-most, most + 1):
            moved = translate(plain - black, dx, dy) + black
            if torch.allclose(img, moved, atol=1e-4):
                return dx, dy
    return None


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaders_translate_within_the_range(tiny_shards, backend):
    plain = {
        k: img
        for images, _, keys in epoch(loader(tiny_shards, "train", backend=backend, train=False))
        for k, img in zip(keys, images, strict=True)
    }
    augment = AugmentConfig(hflip=False, vflip=False, translate=0.2)
    shifts = [
        shift_of(img, plain[k], 12)
        for images, _, keys in epoch(loader(tiny_shards, "train", backend=backend, augment=augment))
        for k, img in zip(keys, images, strict=True)
    ]
    assert len(shifts) == 40 and None not in shifts
    assert sum(s != (0, 0) for s in shifts) >= 36
    assert {np.sign(dx) for dx, _ in shifts} >= {-1, 1} and {np.sign(dy) for _, dy in shifts} >= {
        -1,
        1,
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_huang2023_set_runs_and_is_seeded(tiny_shards, backend):
    augment = augment_preset("huang2023")
    first = epoch(loader(tiny_shards, "train", backend=backend, augment=augment, seed=3))
    again = epoch(loader(tiny_shards, "train", backend=backend, augment=augment, seed=3))
    for (a, _, ka), (b, _, kb) in zip(first, again, strict=True):
        assert ka == kb and a.shape == (4, 3, 64, 64) and torch.isfinite(a).all()
        assert torch.equal(a, b)


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
def test_the_gpu_graph_with_translation_is_well_formed(tiny_shards):
    """On the GPU the images are warped on the device with a matrix built on the CPU from
    the random shifts; the graph defines and serialises without a GPU (not run on one here)."""
    graph = gpu_train_graph(
        tiny_shards,
        augment_preset("huang2023"),
        mean=(100.0, 90.0, 80.0),
        std=(50.0, 40.0, 30.0),
    )
    assert b"WarpAffine" in graph and b"transforms__Translation" in graph
