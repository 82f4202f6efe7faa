"""The loading contract on both CPU backends, against the tiny fixture.

References are read independently of the loader: Python's tarfile + PIL decode each
sample, and the manifest's order gives the expected keys.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import UserError
from pipeline.loading.augment import NO_AUGMENT, AugmentConfig
from pipeline.loading.contract import rank_range
from pipeline.loading.loader import EvalSpec, TrainSpec, build_loader
from tests.conftest import build_shard_dir, gpu_train_graph

try:
    import nvidia.dali  # noqa: F401

    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False

BACKENDS = [
    "torch",
    pytest.param(
        "dali-cpu", marks=pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
    ),
]
NO_FLIPS = NO_AUGMENT
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def reference(root: Path, split: str) -> dict[str, tuple[np.ndarray, int]]:
    """key -> (uint8 HWC image decoded by PIL, grade), in manifest order."""
    manifest = json.loads((root / "manifest.json").read_text())
    out = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(root / shard["file"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".jpg"):
                key = name[:-4]
                image = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
                out[key] = (image, int(members[f"{key}.cls"]))
    return out


def loader(root, split="test", *, backend, keys=True, **kw):
    """build_loader, with the sample keys added to every batch (the backends' test option)."""
    train = kw.pop("train", split == "train")
    verify = kw.pop("verify", False)
    opts = {"batch_size": 4, "image_size": 64, "workers": 2, "backend": backend}
    spec = (TrainSpec if train else EvalSpec)(split=split, with_keys=keys, **{**opts, **kw})
    return build_loader(root, spec, verify=verify)


def epoch(ld) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    return list(ld)


def denormalise(images: torch.Tensor) -> torch.Tensor:
    return images * STD + MEAN


def all_keys(batches) -> list[str]:
    return [k for _, _, keys in batches for k in keys]


@pytest.fixture(scope="module")
def test_ref(tiny_shards):
    return reference(tiny_shards, "test")


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_batches_match_the_jpegs_and_the_manifest(tiny_shards, test_ref, backend):
    ld = loader(tiny_shards, backend=backend)
    batches = epoch(ld)
    assert ld.backend == backend and len(ld) == len(batches) == 4 and ld.num_samples == 13
    assert [len(b[1]) for b in batches] == [4, 4, 4, 1]
    for images, labels, keys in batches:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 64, 64)
        assert labels.dtype == torch.int64 and images.device.type == "cpu"
        assert labels.tolist() == [test_ref[k][1] for k in keys]
        expected = torch.stack(
            [torch.from_numpy(test_ref[k][0]).permute(2, 0, 1) for k in keys]
        ).float()
        diff = (denormalise(images) - expected).abs()
        assert diff.mean() < 1.0 and diff.max() < 16, f"{backend}: decoded pixels differ from PIL's"
    # normalised with the ImageNet statistics: recovering the mean brightness of the split
    images = torch.cat([b[0] for b in batches])
    ref_mean = np.mean([img.mean(axis=(0, 1)) for img, _ in test_ref.values()], axis=0)
    assert np.allclose(denormalise(images).mean(dim=(0, 2, 3)).numpy(), ref_mean, atol=0.5)
    assert sorted(all_keys(batches)) == sorted(test_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_covers_every_sample_exactly_once(tiny_shards, test_ref, backend, world):
    seen, total = [], 0
    for rank in range(world):
        ld = loader(tiny_shards, backend=backend, rank=rank, world_size=world)
        batches = epoch(ld)
        lo, hi = rank_range(13, rank, world)
        assert ld.num_samples == hi - lo == sum(len(b[1]) for b in batches)
        assert len(ld) == len(batches) and all(len(b[1]) > 0 for b in batches)
        assert all(len(b[1]) == 4 for b in batches[:-1])
        # rank r owns samples [r*N//w, (r+1)*N//w) in manifest order: DALI's slicing
        assert set(all_keys(batches)) == set(list(test_ref)[lo:hi])
        total += ld.num_samples
        seen += all_keys(batches)
    assert total == 13 and sorted(seen) == sorted(test_ref)  # no duplicates, no drops


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_without_samples_yields_nothing(tmp_path, backend):
    root = build_shard_dir(tmp_path / "s", counts={"train": 8, "test": 2}, size=32)
    counts = []
    for rank in range(3):
        ld = loader(root, backend=backend, rank=rank, world_size=3, image_size=32)
        counts.append((len(ld), ld.num_samples, len(epoch(ld))))
    assert counts == [(0, 0, 0), (1, 1, 1), (1, 1, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_gives_equal_full_steps_on_every_rank(tiny_shards, backend):
    world, batch = 3, 4  # 40 samples in shards of 7: slices of 13, 13, 14
    for ep in range(2):  # two consecutive epochs through the same loaders
        keys = []
        for rank in range(world):
            ld = loader(
                tiny_shards, "train", backend=backend, rank=rank, world_size=world, batch_size=batch
            )
            ld.set_epoch(ep)
            batches = epoch(ld)
            assert len(ld) == len(batches) == 40 // (world * batch) == 3
            assert ld.num_samples == 12 and all(len(b[1]) == batch for b in batches)
            keys += all_keys(batches)
        assert len(set(keys)) == len(keys) == 36  # the ranks' slices do not overlap


@pytest.mark.parametrize("backend", BACKENDS)
def test_consecutive_epochs_differ_and_the_seed_reproduces_them(tiny_shards, backend):
    ld = loader(tiny_shards, "train", backend=backend, seed=3)
    first, second = epoch(ld), epoch(ld)  # iter() advances the epoch
    assert len(first) == len(second) == 10
    assert all_keys(first) != all_keys(second)
    again = loader(tiny_shards, "train", backend=backend, seed=3)
    again.set_epoch(1)
    replay = epoch(again)
    assert all_keys(replay) == all_keys(second)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(replay, second, strict=True)
    )
    other = loader(tiny_shards, "train", backend=backend, seed=4)
    assert all_keys(epoch(other)) != all_keys(first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flip", ["hflip", "vflip"])
def test_flips_actually_flip(tiny_shards, backend, flip):
    plain = {
        k: img
        for images, _, keys in epoch(loader(tiny_shards, "train", backend=backend, train=False))
        for k, img in zip(keys, images, strict=True)
    }
    augment = AugmentConfig(hflip=flip == "hflip", vflip=flip == "vflip")
    dim = -1 if flip == "hflip" else -2
    flipped = same = 0
    for images, _, keys in epoch(loader(tiny_shards, "train", backend=backend, augment=augment)):
        for key, img in zip(keys, images, strict=True):
            if torch.allclose(img, plain[key], atol=1e-4):
                same += 1
            elif torch.allclose(img, plain[key].flip(dim), atol=1e-4):
                flipped += 1
    assert same + flipped == 40 and flipped >= 8 and same >= 8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", [{"rotate": 30.0}, {"scale": 0.5}, {"color": 0.4}])
def test_augment_options_change_pixels(tiny_shards, backend, option):
    plain = {
        k: img
        for images, _, keys in epoch(loader(tiny_shards, "train", backend=backend, train=False))
        for k, img in zip(keys, images, strict=True)
    }
    augment = AugmentConfig(hflip=False, vflip=False, **option)
    changed = 0
    for images, _, keys in epoch(loader(tiny_shards, "train", backend=backend, augment=augment)):
        assert images.shape == (4, 3, 64, 64) and torch.isfinite(images).all()
        changed += sum(
            (img - plain[k]).abs().mean().item() > 0.05 for k, img in zip(keys, images, strict=True)
        )
    assert changed >= 36


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_and_channels_last(tiny_shards, test_ref, backend):
    small = epoch(loader(tiny_shards, backend=backend, image_size=32, channels_last=True))
    images, _, keys = small[0]
    assert images.shape == (4, 3, 32, 32) and images.is_contiguous(
        memory_format=torch.channels_last
    )
    expected = torch.stack(
        [
            torch.from_numpy(
                np.asarray(Image.fromarray(test_ref[k][0]).resize((32, 32), Image.BILINEAR))
            ).permute(2, 0, 1)
            for k in keys
        ]
    ).float()
    assert (denormalise(images) - expected).abs().mean() < 4.0


@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_workers_uint8_path_matches_their_normalised_path(tiny_shards, channels_last):
    """A CPU target gets float batches normalised in the workers; a GPU target gets uint8 ones,
    normalised on the device. Both must give the same pixels (the uint8 path checked on CPU)."""
    from torch.utils.data import DataLoader

    from pipeline.loading.samples import chunked
    from pipeline.loading.torch_backend import ShardSlice

    ld = loader(tiny_shards, "train", backend="torch", channels_last=channels_last)
    chunks = chunked(ld.spec.samples(0, 40))

    def batches(normalize):
        data = ShardSlice(ld.spec, chunks, epoch=0, normalize=normalize)
        return list(DataLoader(data, batch_size=None, num_workers=2))

    floats, uint8s = batches(True), batches(False)
    assert len(floats) == len(uint8s) and sum(len(b[1]) for b in floats) == 40  # raw worker batches
    for (f, fl, fk), (u, ul, uk) in zip(floats, uint8s, strict=True):
        assert (
            f.dtype == torch.float32 and u.dtype == torch.uint8 and fk == uk and torch.equal(fl, ul)
        )
        assert f.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
        images, _ = ld.normalize(u, ul)
        assert torch.allclose(images, f, atol=1e-5)
        assert torch.allclose(denormalise(f), u.float(), atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "dali", "auto"])
def test_backend_choice(tiny_shards, backend, monkeypatch):
    if not HAVE_DALI and backend != "torch":
        pytest.skip("nvidia-dali not installed")
    ld = loader(tiny_shards, backend=backend, keys=False)
    assert ld.backend == ("torch" if backend == "torch" else "dali-cpu")
    monkeypatch.setattr("pipeline.loading.loader.dali_available", lambda: False)
    if backend == "dali":
        with pytest.raises(UserError, match="--backend torch"):
            loader(tiny_shards, backend=backend)
    else:
        assert loader(tiny_shards, backend=backend, keys=False).backend == "torch"


def test_user_errors_at_build(tiny_shards, tmp_path):
    with pytest.raises(UserError, match="too few"):
        build_loader(tiny_shards, TrainSpec(batch_size=16, image_size=64, world_size=3))
    with pytest.raises(UserError, match="unknown loader backend"):
        build_loader(
            tiny_shards, EvalSpec(split="test", batch_size=4, image_size=64, backend="jax")
        )
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            build_loader(
                tiny_shards, EvalSpec(split="test", batch_size=4, image_size=64, device="cuda")
            )
    root = shutil.copytree(tiny_shards, tmp_path / "missing")
    (root / "test-000001.tar").unlink()
    with pytest.raises(UserError, match="test-000001.tar"):
        build_loader(root, EvalSpec(split="test", batch_size=4, image_size=64, backend="torch"))
    root = shutil.copytree(tiny_shards, tmp_path / "grown")
    with open(root / "test-000000.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(UserError, match="test-000000.tar"):
        build_loader(root, EvalSpec(split="test", batch_size=4, image_size=64, backend="torch"))


def corrupt_jpeg(root: Path, shard: str, sample: int) -> str:
    """Overwrite a JPEG's bytes with garbage of the same length; the shard keeps its size."""
    line = (root / shard.replace(".tar", ".idx")).read_text().splitlines()[1 + sample].split()
    offset, size, name = int(line[1]), int(line[2]), line[3]
    with open(root / shard, "r+b") as f:
        f.seek(offset)
        f.write(b"\x5a" * size)
    return name[: -len(".jpg")]


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory, tiny_shards):
    root = shutil.copytree(tiny_shards, tmp_path_factory.mktemp("corrupt") / "s")
    key = corrupt_jpeg(root, "test-000001.tar", 2)
    return root, key


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_corrupt_jpeg_is_one_clear_error(corrupt_shards, backend):
    root, key = corrupt_shards
    ld = loader(root, backend=backend, keys=False)  # the size check passes
    with pytest.raises(UserError) as err:
        epoch(ld)
    assert (
        "test-000001.tar" in str(err.value) and key in str(err.value) and "\n" not in str(err.value)
    )
    with pytest.raises(UserError, match="sha256"):
        loader(root, backend=backend, verify=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_truncated_tar_is_one_clear_error(tiny_shards, tmp_path, backend):
    root = shutil.copytree(tiny_shards, tmp_path / "s")
    tar = root / "test-000001.tar"
    tar.write_bytes(tar.read_bytes()[:6000])
    manifest = json.loads((root / "manifest.json").read_text())  # a manifest that agrees with it
    for shard in manifest["splits"]["test"]["shards"]:
        if shard["file"] == tar.name:
            shard["bytes"] = 6000
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError) as err:
        epoch(loader(root, backend=backend, keys=False))
    assert (
        "test-000001.tar" in str(err.value)
        and "test" in str(err.value)
        and "\n" not in str(err.value)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_manifest_counts_are_checked_against_the_indexes(tiny_shards, tmp_path, backend):
    """A manifest edited to list fewer samples (its sums still adding up) is refused at start."""
    root = shutil.copytree(tiny_shards, tmp_path / "s")
    manifest = json.loads((root / "manifest.json").read_text())
    test = manifest["splits"]["test"]
    shard = test["shards"][0]
    real = shard["samples"]
    shard["samples"] -= 2
    test["samples"] -= 2
    for _ in range(2):
        grade = next(g for g, c in enumerate(test["class_counts"]) if c > 0)
        test["class_counts"][grade] -= 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    message = f"lists {real} samples but the manifest says {real - 2} for {shard['file']}"
    with pytest.raises(UserError, match=message):
        loader(root, backend=backend)


def set_grade(root: Path, shard: str, sample: int, grade: bytes) -> str:
    """Overwrite one sample's .cls in place (same length: the shard keeps its size)."""
    line = (root / shard.replace(".tar", ".idx")).read_text().splitlines()[1 + sample].split()
    offset, size, name = int(line[5]), int(line[6]), line[7]
    assert name.endswith(".cls") and size == len(grade)
    with open(root / shard, "r+b") as f:
        f.seek(offset)
        f.write(grade)
    return name[: -len(".cls")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_a_grade_outside_0_4_is_one_clear_error(tmp_path, backend, split):
    root = build_shard_dir(tmp_path / "s", {"train": 16, "test": 8}, shard_size=8)
    key = set_grade(root, f"{split}-000001.tar" if split == "train" else "test-000000.tar", 3, b"7")
    ld = loader(root, split, backend=backend, keys=False)  # sizes and indexes agree
    with pytest.raises(UserError) as err:
        epoch(ld)
    assert str(err.value) == (
        f"sample {key} in shard {split}-00000{1 if split == 'train' else 0}.tar has grade '7', "
        "not one of 0-4; rebuild the shards"
    )


@pytest.mark.gpu
@pytest.mark.skipif(
    not (HAVE_DALI and torch.cuda.is_available()), reason="needs DALI and a CUDA GPU"
)
def test_dali_gpu_meets_the_contract(tiny_shards, test_ref):
    seen = []
    for rank in range(2):
        ld = loader(tiny_shards, backend="dali", device="cuda", rank=rank, world_size=2)
        assert ld.backend == "dali-gpu"
        for images, labels, keys in epoch(ld):
            assert images.is_cuda and labels.is_cuda and images.dtype == torch.float32
            assert labels.cpu().tolist() == [test_ref[k][1] for k in keys]
            seen += keys
    assert sorted(seen) == sorted(test_ref)
    augment = AugmentConfig(rotate=20, scale=0.3, color=0.3)
    ld = loader(
        tiny_shards, "train", backend="dali", device="cuda", augment=augment, channels_last=True
    )
    batches = epoch(ld)
    assert len(batches) == len(ld) == 10
    assert all(b[0].is_contiguous(memory_format=torch.channels_last) for b in batches)


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
def test_dali_gpu_graph_is_well_formed(tiny_shards):
    """The GPU graph (mixed decode, GPU augment, contrast centre on the GPU) defines and serialises
    without a GPU; only building it needs one (test_dali_gpu_meets_the_contract)."""
    graph = gpu_train_graph(
        tiny_shards, AugmentConfig(rotate=10, scale=0.2, color=0.2), with_keys=True
    )
    assert b"mixed" in graph and b"hw_decoder_load" in graph


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
def test_dali_builds_an_eval_pipeline_once_and_a_train_pipeline_per_epoch(tiny_shards):
    ev = loader(tiny_shards, backend="dali-cpu")
    first, second = epoch(ev), epoch(ev)
    assert [k for _, _, keys in first for k in keys] == [k for _, _, keys in second for k in keys]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))
    assert ev.builds == 1  # reused: no randomness, and it read its slice to the end
    # rank 0 of 2 holds 6 samples, rank 1 holds 7: DALI pads rank 0 to 3 batches of 3 too
    for rank in range(2):
        ev = loader(tiny_shards, backend="dali-cpu", batch_size=3, rank=rank, world_size=2)
        keys = [[k for _, _, ks in epoch(ev) for k in ks] for _ in range(3)]
        assert (
            keys[0] == keys[1] == keys[2] and len(set(keys[0])) == len(keys[0]) and ev.builds == 1
        )
    tr = loader(tiny_shards, "train", backend="dali-cpu", keys=False)
    epoch(tr), epoch(tr)
    tr.prepared[1].result()  # epoch 2's, built ahead during epoch 1's end
    assert tr.builds == 3  # seeded per epoch, so a resumed run gets the same batches


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
def test_dali_reads_without_mmap_as_with_it(tiny_shards, test_ref):
    plain = epoch(loader(tiny_shards, backend="dali-cpu", mmap=True))
    streamed = epoch(loader(tiny_shards, backend="dali-cpu", mmap=False))
    assert all(
        torch.equal(a[0], b[0]) and a[2] == b[2] for a, b in zip(plain, streamed, strict=True)
    )


def test_network_filesystems_are_recognised(tmp_path):
    from pipeline.loading.loader import on_network_filesystem

    mounts = (
        "/dev/vda / ext4 rw 0 0\n"
        "server:/export /shared nfs4 rw 0 0\n"
        "s3fs /buckets fuse.s3fs rw 0 0\n"
        "tmpfs /shared/tmp tmpfs rw 0 0\n"
    )
    assert on_network_filesystem(Path("/shared/shards"), mounts)
    assert on_network_filesystem(Path("/buckets/x"), mounts)
    assert not on_network_filesystem(Path("/shared/tmp/shards"), mounts)  # the deeper mount wins
    assert not on_network_filesystem(Path("/sharedX/shards"), mounts)
    assert not on_network_filesystem(Path("/home/shards"), mounts)


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
def test_device_errors_pass_through_and_data_errors_are_explained(tiny_shards, monkeypatch):
    """Out of memory is not a data error: it keeps its own message and type."""
    from pipeline.loading.dali import is_device_error

    assert is_device_error(RuntimeError("CUDA error: out of memory"))
    assert is_device_error(
        RuntimeError("[/opt/dali/...] CUDA allocation failed: cudaErrorMemoryAllocation")
    )
    assert not is_device_error(
        RuntimeError("Error in thread 0: [webdataset_loader.cc] Unexpected end of file")
    )
    ld = loader(tiny_shards, backend="dali-cpu", keys=False)

    class Failing:
        def __init__(self, message):
            self.message = message

        def run(self):
            raise RuntimeError(self.message)

    monkeypatch.setattr(ld, "build_pipeline", lambda epoch: Failing("CUDA error: out of memory"))
    with pytest.raises(RuntimeError, match="CUDA error: out of memory") as err:
        epoch(ld)
    assert not isinstance(err.value, UserError)
    # a text that says nothing of a sample is not blamed on the data (tests/test_dali_errors.py)
    monkeypatch.setattr(ld, "build_pipeline", lambda epoch: Failing("tar header damaged"))
    with pytest.raises(RuntimeError, match="DALI failed while reading split 'test'.*tar header"):
        epoch(ld)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (HAVE_DALI and torch.cuda.is_available()), reason="needs DALI and a CUDA GPU"
)
@pytest.mark.parametrize("hw_decoder_load", [0.0, 1.0])
def test_dali_gpu_pixels_match_the_cpu_path(tiny_shards, hw_decoder_load, monkeypatch):
    """The GPU decoder (nvJPEG, fancy upsampling on) against libjpeg-turbo on the CPU, on the
    same stored JPEGs at their stored size, with every image on the CUDA decoder (0, what
    training uses) and on the hardware decoder (1; the CUDA decoder where a GPU has none).
    Tolerance, on the 0-255 scale: at most 3 levels anywhere and 0.5 on average, the spread
    two standard-conforming IDCTs and colour conversions may show; without fancy upsampling,
    chroma edges differ by tens of levels."""
    import pipeline.loading.dali as dali

    monkeypatch.setattr(dali, "HW_DECODER_LOAD", hw_decoder_load)
    gpu = {
        k: x
        for b in epoch(loader(tiny_shards, backend="dali", device="cuda"))
        for k, x in zip(b[2], b[0], strict=True)
    }
    cpu = {
        k: x
        for b in epoch(loader(tiny_shards, backend="torch"))
        for k, x in zip(b[2], b[0], strict=True)
    }
    assert set(gpu) == set(cpu)
    std = STD.view(3, 1, 1)
    diffs = torch.stack([((gpu[k].cpu() - cpu[k]) * std).abs() for k in cpu])
    assert diffs.max() <= 3.0 and diffs.mean() <= 0.5, (float(diffs.max()), float(diffs.mean()))


def test_the_next_train_epoch_starts_ahead_and_gives_the_same_batches(tiny_shards):
    """The last train batch starts the next epoch's workers; that epoch then yields what a
    fresh loader pinned to it yields. ``set_epoch`` elsewhere drops what was started."""
    ld = loader(tiny_shards, "train", backend="torch", seed=3)
    it = iter(ld)
    for _ in range(len(ld) - 1):
        next(it)
    assert ld.ahead is None
    next(it)
    assert ld.ahead[0] == 1  # started while the caller still holds epoch 0's last batch
    assert list(it) == []
    second = epoch(ld)
    assert ld.ahead[0] == 2
    fresh = loader(tiny_shards, "train", backend="torch", seed=3)
    fresh.set_epoch(1)
    replay = epoch(fresh)
    assert all_keys(replay) == all_keys(second)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(replay, second, strict=True))
    ld.set_epoch(7)
    fresh.set_epoch(7)
    assert all_keys(epoch(ld)) == all_keys(epoch(fresh))  # epoch 2's start was not used


def test_evaluation_keeps_its_dataloader_and_workers(tiny_shards):
    ld = loader(tiny_shards, "test", backend="torch")
    first = epoch(ld)
    kept = ld.kept
    assert kept is not None and kept.persistent_workers
    second = epoch(ld)
    assert ld.kept is kept and all_keys(first) == all_keys(second)
    assert sum(len(b[1]) for b in second) == ld.num_samples
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(
    not (HAVE_DALI and torch.cuda.is_available()), reason="needs DALI and a CUDA GPU"
)
def test_dali_runs_the_next_epochs_first_batch_on_a_stream_of_its_own(tiny_shards, monkeypatch):
    """The next epoch's pipeline starts during the evaluation: its first batch runs on the
    loader's side stream, not torch's, and the epoch still yields what a fresh loader does."""
    ld = loader(tiny_shards, "train", backend="dali", device="cuda", seed=5)
    streams = []
    real = ld.start_pipeline
    monkeypatch.setattr(
        ld, "start_pipeline", lambda e, stream=None: streams.append(stream) or real(e, stream)
    )
    epoch(ld)
    second = epoch(ld)
    assert streams and all(s is ld.side for s in streams)
    assert ld.side != torch.cuda.current_stream()
    fresh = loader(tiny_shards, "train", backend="dali", device="cuda", seed=5)
    fresh.set_epoch(1)
    replay = epoch(fresh)
    assert all_keys(replay) == all_keys(second)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(replay, second, strict=True))
