"""The torch-nvjpeg backend's logic on the CPU: the same code with the decode on the CPU
(the test seam ``DR_TEST_ONLY_NVJPEG_ON_CPU``), against the torch backend."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pipeline.errors import UserError
from pipeline.loading.augment import AugmentConfig
from pipeline.loading.loader import EvalSpec, TrainSpec, build_loader, resolve_backend
from pipeline.loading.nvjpeg import CPU_SEAM, NvjpegLoader
from tests.test_loader import corrupt_jpeg

EVERYTHING = AugmentConfig(rotate=180.0, scale=0.25, color=0.2, translate=0.2)


@pytest.fixture
def seam(monkeypatch):
    monkeypatch.setenv(CPU_SEAM, "1")


def by_key(ld) -> dict[str, torch.Tensor]:
    return {k: x for images, _, keys in ld for k, x in zip(keys, images, strict=True)}


def eval_loader(shards, backend: str, size: int, **kw):
    spec = EvalSpec(split="test", batch_size=4, image_size=size, backend=backend, with_keys=True)
    return build_loader(shards, spec.__class__(**{**spec.__dict__, **kw}))


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message of a machine without CUDA"
)
def test_without_a_gpu_it_ends_in_one_sentence_naming_the_gpu(tiny_shards):
    with pytest.raises(UserError, match="decodes JPEGs on a CUDA GPU.*no GPU here"):
        eval_loader(tiny_shards, "torch-nvjpeg", 64, workers=0)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message of a machine without CUDA"
)
def test_the_trainer_says_so_in_one_line_exit_2(tiny_shards, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "trainer/train.py",
            "--shards",
            str(tiny_shards),
            "--out",
            str(tmp_path / "run"),
            "--backend",
            "torch-nvjpeg",
            "--image-size",
            "64",
            "--epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "GPU" in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "torch-nvjpeg" in line]) == 1


def test_auto_picks_dali_then_nvjpeg_on_a_gpu_then_torch(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr("pipeline.loading.loader.dali_available", lambda: True)
    assert resolve_backend("auto", cuda) == "dali-gpu"
    monkeypatch.setattr("pipeline.loading.loader.dali_available", lambda: False)
    assert resolve_backend("auto", cuda) == "torch-nvjpeg"
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch-nvjpeg", cuda) == "torch-nvjpeg"


@pytest.mark.parametrize("size", [64, 48])  # the stored size, and a resize after decoding
def test_eval_batches_match_the_torch_backend(tiny_shards, seam, size):
    """Pixel parity of the decoded, normalised eval batches. On the CPU both decode with
    libjpeg-turbo, so this holds the pipeline's logic (bytes, order, resize, normalisation)
    to the torch backend's exactly; nvJPEG's own pixels are gpu_check's to measure."""
    ours = eval_loader(tiny_shards, "torch-nvjpeg", size, workers=2)
    assert isinstance(ours, NvjpegLoader)
    theirs = eval_loader(tiny_shards, "torch", size, workers=2)
    a, b = by_key(ours), by_key(theirs)
    assert len(a) == ours.num_samples == 13 and set(a) == set(b)
    diff = torch.stack([(a[k] - b[k]).abs() for k in sorted(a)])
    print(f"torch-nvjpeg vs torch, eval {size} px: max {diff.max():.3g}, mean {diff.mean():.3g}")
    assert diff.max() == 0


def test_train_batches_match_the_torch_backends_device_path(tiny_shards, seam):
    """Same seed: the same samples in the same batches with the same crops and augmentation
    draws as the torch backend's GPU path (forced on the CPU), pixel for pixel."""

    def build(backend):
        spec = TrainSpec(
            batch_size=4,
            image_size=48,
            seed=2,
            workers=2,
            augment=EVERYTHING,
            backend=backend,
            with_keys=True,
        )
        return build_loader(tiny_shards, spec)

    ours, reference = build("torch-nvjpeg"), build("torch")
    reference.augment_on_device = True
    for ld in (ours, reference):
        ld.set_epoch(1)
    got, want = list(ours), list(reference)
    assert len(got) == len(want) == ours.steps == 10
    for (x, y, k), (x2, y2, k2) in zip(got, want, strict=True):
        assert k == k2 and torch.equal(y, y2)
        assert torch.equal(x, x2)


def test_the_epoch_contract_across_ranks(tiny_shards, seam):
    """Train: the same number of full batches on each of 3 ranks; eval: every test sample
    exactly once across them."""
    steps, seen = [], []
    for rank in range(3):
        common = dict(
            batch_size=4,
            image_size=64,
            rank=rank,
            world_size=3,
            workers=2,
            backend="torch-nvjpeg",
            with_keys=True,
        )
        train = build_loader(tiny_shards, TrainSpec(**common))
        batches = list(train)
        assert all(len(b[1]) == 4 for b in batches)
        steps.append(len(batches))
        seen += [
            k
            for _, _, keys in build_loader(tiny_shards, EvalSpec(split="test", **common))
            for k in keys
        ]
    assert steps == [40 // 12] * 3
    assert len(seen) == 13 and len(set(seen)) == 13


def test_a_corrupt_jpeg_is_named(tiny_shards, tmp_path, seam):
    import shutil

    root = shutil.copytree(tiny_shards, tmp_path / "bad")
    key = corrupt_jpeg(root, "test-000001.tar", 2)
    with pytest.raises(UserError, match=f"sample {key} .*not a readable JPEG"):
        list(eval_loader(root, "torch-nvjpeg", 64, workers=0))
    with pytest.raises(UserError, match=key):  # the workers read headers for the crop
        spec = TrainSpec(
            split="test",
            batch_size=1,
            image_size=64,
            workers=0,
            backend="torch-nvjpeg",
            augment=EVERYTHING,
        )
        list(build_loader(root, spec))


def test_the_doctors_nvjpeg_check_decodes_like_pillow(monkeypatch):
    """dr-doctor's torch-nvjpeg line: the decode it runs on a GPU, run here on the CPU, and
    its SKIP without a GPU."""
    import io

    import numpy as np
    from PIL import Image

    from tools import doctor

    jpeg = doctor.sample_jpeg()
    decoded = doctor.decode_with_torchvision(jpeg, "cpu")
    reference = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    assert decoded.shape == reference.shape == (256, 256, 3)
    assert np.abs(decoded.astype(int) - reference).mean() < 4
    monkeypatch.setattr(doctor, "torch_gpus", lambda: 0)
    result = doctor.check_nvjpeg_decoder()
    assert result.status == doctor.SKIP and "torch-nvjpeg needs" in result.found


# ---------------------------------------------------------------- on a GPU (skipped without)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def levels(a: dict, b: dict) -> torch.Tensor:
    """|a - b| per image key, back on the 0-255 scale."""
    from pipeline.constants import IMAGENET_STD

    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return torch.stack([((a[k].cpu() - b[k].cpu()) * std).abs() for k in sorted(a)])


@pytest.mark.gpu
@needs_cuda
def test_on_the_gpu_nvjpeg_decodes_within_a_few_levels_of_libjpeg_turbo(tiny_shards):
    """nvJPEG's IDCT and chroma upsampling against libjpeg-turbo's: the figure for
    docs/loading.md (printed). torchvision does not ask nvJPEG for libjpeg's fancy chroma
    upsampling, so chroma edges may differ by tens of levels (DALI's note); the mean must
    stay small and nothing may look like a wrong picture."""
    ours = by_key(eval_loader(tiny_shards, "torch-nvjpeg", 64, workers=2, device="cuda"))
    theirs = by_key(eval_loader(tiny_shards, "torch", 64, workers=2, device="cuda"))
    diff = levels(ours, theirs)
    print(f"nvJPEG vs libjpeg-turbo, 64 px: max {diff.max():.2f}, mean {diff.mean():.4f} levels")
    assert diff.max() <= 64 and diff.mean() <= 2.0, (float(diff.max()), float(diff.mean()))


@pytest.mark.gpu
@needs_cuda
def test_on_the_gpu_a_decode_behind_queued_work_gives_the_same_pixels(tiny_shards):
    """pytorch/vision#9606: nvJPEG can write before the caller's queued work has run into
    blocks just freed on that stream. Decoding right behind ~100 ms of queued matmuls
    whose inputs were freed must give the pixels an idle GPU gives."""
    ld = eval_loader(tiny_shards, "torch-nvjpeg", 64, workers=0, device="cuda")
    reference = by_key(ld)
    for _ in range(3):
        x = torch.randn(4096, 4096, device="cuda")
        for _ in range(20):
            y = x @ x
        del x, y  # freed while the matmuls are still queued
        again = by_key(ld)
        assert all(torch.equal(again[k], reference[k]) for k in reference)


@pytest.mark.gpu
@needs_cuda
def test_on_the_gpu_a_train_epoch_keeps_the_contract(tiny_shards):
    spec = TrainSpec(
        batch_size=4,
        image_size=64,
        seed=1,
        workers=2,
        augment=EVERYTHING,
        backend="torch-nvjpeg",
        device="cuda",
        channels_last=True,
    )
    ld = build_loader(tiny_shards, spec)
    batches = list(ld)
    assert len(batches) == ld.steps == 10
    for images, labels in batches:
        assert images.is_cuda and labels.is_cuda and images.shape == (4, 3, 64, 64)
        assert images.dtype == torch.float32 and torch.isfinite(images).all()
