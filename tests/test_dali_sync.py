"""The DALI GPU path without host waits: brightness/contrast as arithmetic (its centre stays on
the GPU), outputs on torch's stream, pinned labels; and a GPU run under CUDA's sync debug mode
with --augment strong (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.loading.augment import PRESETS
from pipeline.loading.loader import TrainSpec, build_loader
from tests.conftest import epoch_without_host_waits, gpu_train_graph

try:
    from nvidia.dali import fn, pipeline_def, types

    from pipeline.loading.dali import brightness_contrast, grey_mean

    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False

needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")


@needs_dali
def test_brightness_contrast_arithmetic_equals_dalis_operator():
    """The arithmetic the GPU graph uses gives the operator's uint8 images, level for level
    (on the CPU, where both run)."""

    @pipeline_def
    def both():
        noise = fn.random.uniform(range=[0, 255], shape=[24, 20, 3], dtype=types.FLOAT)
        images = fn.cast(noise, dtype=types.UINT8)
        brightness = fn.random.uniform(range=[0.7, 1.3])
        contrast = fn.random.uniform(range=[0.7, 1.3])
        operator = fn.brightness_contrast(
            images, brightness=brightness, contrast=contrast, contrast_center=grey_mean(images)
        )
        return operator, brightness_contrast(images, brightness, contrast, gpu=False), images

    pipe = both(batch_size=6, num_threads=1, device_id=None, seed=5, exec_dynamic=True)
    pipe.build()
    for _ in range(2):
        operator, arithmetic, images = pipe.run()
        for i in range(6):
            ours = np.array(arithmetic[i])
            assert ours.dtype == np.uint8
            assert np.array_equal(ours, np.array(operator[i]))
        assert not np.array_equal(np.array(arithmetic[0]), np.array(images[0]))  # it did change


@needs_dali
def test_dali_gpu_graph_has_no_gpu_to_cpu_copy(tiny_shards):
    """The strong augmentation's GPU graph defines without a GPU, with the arithmetic in place
    of the operator that needed its contrast centre copied back to the CPU."""
    graph = gpu_train_graph(tiny_shards, PRESETS["strong"])
    assert b"ArithmeticGenericOp" in graph and b"BrightnessContrast" not in graph


@pytest.mark.gpu
@pytest.mark.skipif(
    not (HAVE_DALI and torch.cuda.is_available()), reason="needs DALI and a CUDA GPU"
)
def test_dali_gpu_strong_augment_batches_never_wait_for_the_host(tiny_shards):
    """A train epoch of --augment strong on the GPU under CUDA's sync debug mode: taking a
    batch (run on torch's stream, the images copied there, the pinned labels copied
    asynchronously) makes torch wait for nothing. The first batch, which builds and starts
    the pipeline, is taken before the mode is on."""
    ld = build_loader(
        tiny_shards,
        TrainSpec(
            batch_size=4,
            image_size=64,
            workers=2,
            backend="dali",
            device="cuda",
            augment=PRESETS["strong"],
            channels_last=True,
        ),
    )
    assert ld.backend == "dali-gpu"
    seen, images, labels = epoch_without_host_waits(ld)
    assert seen == len(ld)
    assert torch.isfinite(images).all() and int(labels.max()) < 5
