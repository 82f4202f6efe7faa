"""DALI failures say what they are: the classification fed with the texts DALI raises, the
loader naming a damaged sample, and the next train epoch's pipeline built ahead (CPU mode).

The texts are DALI's own: those marked "DALI 2.4" were raised here by the installed DALI
(damaged shards on the CPU); the GPU ones are quoted from DALI's issue tracker (the issue
number beside each), with the words DALI's libraries still carry (``strings libdali_core.so``:
"Can't allocate %zu bytes on device %d.").
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline.errors import DeviceError, RunError, UserError
from pipeline.loading.dali_errors import DEVICE, SAMPLE, classify, detail_of
from pipeline.loading.loader import EvalSpec, TrainSpec, build_loader, dali_available
from pipeline.manifest import read_manifest
from tests.conftest import build_shard_dir

TRACEBACK = (
    "which was used in the pipeline definition with the following traceback:\n\n"
    '  File "/work/pipeline/loading/dali.py", line 88, in decode\n'
    "    return fn.decoders.image(jpegs, **opts)\n\n"
    "encountered:\n\n"
)
# DALI 2.4, CPU: a JPEG whose entropy-coded data was overwritten
BAD_CODESTREAM = (
    "Critical error in pipeline:\nCritical error in pipeline:\n"
    "Error in CPU operator `nvidia.dali.fn.decoders.image`,\n" + TRACEBACK + "nvImageCodec "
    "failure: '#3'\nCurrent pipeline object is no longer valid.\n"
    "Current pipeline object is no longer valid."
)
# DALI 2.4, CPU: a JPEG whose first bytes are not a JPEG marker
NOT_A_JPEG = BAD_CODESTREAM.replace("'#3'", "'#4'")
# DALI 2.4, CPU: a tar cut short after its index was written
TRUNCATED_TAR = (
    "Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.readers.webdataset`,\n"
    + TRACEBACK
    + 'Assert on "component.offset < static_cast<int64_t>(current_wds_shard->Size())" failed: '
    'Malformed index file at "/s/train-000000.idx" line 1 - offset is outside of the archive '
    "file\nC++ context: [/opt/dali/dali/operators/reader/loader/webdataset_loader.cc:320] \n"
    "Current pipeline object is no longer valid."
)
# DALI 2.4, building: a tar that is not there
MISSING_TAR = (
    "Critical error when building pipeline:\n"
    "Error in CPU operator `nvidia.dali.fn.readers.webdataset`,\n" + TRACEBACK + "File mapping "
    "failed: /s/train-000000.tar\nC++ context: [/opt/dali/dali/util/mmaped_file.cc:105] \n"
    "Current pipeline object is no longer valid."
)
# DALI issue #1137: the mixed decoder out of device memory (batch too large)
CANT_ALLOCATE = (
    "Critical error in pipeline:\nError when executing Mixed operator ImageDecoder "
    "encountered:\nCan't allocate 129499136 bytes on device 0.\n"
    "Current pipeline object is no longer valid."
)
# the same in DALI 2.x's layout
CANT_ALLOCATE_2X = (
    "Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.image`,\n"
    + TRACEBACK
    + "Can't allocate 402653184 bytes on device 0.\nCurrent pipeline object is no longer valid."
)
# DALI issue #2084
CUDA_ALLOCATION = "Critical error in pipeline: CUDA allocation failed\nCurrent pipeline object is no longer valid."
# DALI issue #4382: NVML failing inside the mixed decoder
NVML = (
    'Error when executing Mixed operator decoders__Image, instance name: "__Image_4", '
    "encountered:\nError in thread 0: nvml error (999): A nvml internal driver error occurred\n"
    "Current pipeline object is no longer valid."
)
# DALI issue #1137 (title): nvJPEG's allocator failing
NVJPEG_ALLOCATOR = 'NVJPEG error "5" : NVJPEG_STATUS_ALLOCATOR_FAILURE'
# DALI issues #3163, #3178: CUDA failing to start when the pipeline is built
CUDA_INIT = "CUDA runtime API error cudaErrorInitializationError (3):\ninitialization error"
# DALI issue #3387: no usable driver
CU_INIT = (
    '[/opt/dali/dali/core/device_guard.cc:33] Assert on "cuInitChecked()" failed: Failed to '
    "load libcuda.so. Check your library paths and if the driver is installed correctly."
)
# nvImageCodec's decoder failing to start on the GPU (status 10: MISSED_DEPENDENCIES)
CODEC_START = BAD_CODESTREAM.replace("CPU operator", "MIXED operator").replace("'#3'", "'#10'")


@pytest.mark.parametrize(
    "text",
    [
        CANT_ALLOCATE,
        CANT_ALLOCATE_2X,
        CUDA_ALLOCATION,
        NVML,
        NVJPEG_ALLOCATOR,
        CUDA_INIT,
        CU_INIT,
        CODEC_START,
        "Critical error in pipeline: std::bad_alloc\nCurrent pipeline object is no longer valid.",
        "something DALI says that no rule knows",
    ],
)
def test_device_and_library_failures_are_never_the_data(text):
    assert classify(text).kind == DEVICE


@pytest.mark.parametrize("text", [BAD_CODESTREAM, NOT_A_JPEG, TRUNCATED_TAR])
def test_read_and_decode_failures_of_a_sample_are_the_data(text):
    assert classify(text).kind == SAMPLE


def test_a_pipeline_that_does_not_build_is_never_the_data():
    """Even a reader's complaint at build time: the shards were verified before building."""
    failure = classify(MISSING_TAR, building=True)
    assert failure.kind == DEVICE and failure.building
    sentence = failure.sentence("reading split 'train' on cpu")
    assert sentence == (
        "DALI could not build its pipeline for reading split 'train' on cpu in "
        "nvidia.dali.fn.readers.webdataset (cpu): File mapping failed: /s/train-000000.tar"
    )
    assert classify(BAD_CODESTREAM, building=True).kind == DEVICE


def test_the_detail_is_dalis_message_without_its_traceback():
    assert detail_of(BAD_CODESTREAM) == "nvImageCodec failure: '#3'"
    assert detail_of(CANT_ALLOCATE) == "Can't allocate 129499136 bytes on device 0."
    assert detail_of(CANT_ALLOCATE_2X) == "Can't allocate 402653184 bytes on device 0."
    assert detail_of(CUDA_ALLOCATION) == "CUDA allocation failed"
    assert (
        detail_of(NVML)
        == "Error in thread 0: nvml error (999): A nvml internal driver error occurred"
    )
    failure = classify(CANT_ALLOCATE_2X)
    assert failure.operator == "nvidia.dali.fn.decoders.image" and failure.backend == "MIXED"
    assert failure.sentence("reading split 'train' on cuda:0") == (
        "DALI failed in nvidia.dali.fn.decoders.image (mixed) while reading split 'train' on "
        "cuda:0 (not a data problem): Can't allocate 402653184 bytes on device 0."
    )


def test_device_error_is_a_run_error_and_a_runtime_error():
    """exit 1 through run_cli (not 2, "bad input"), and caught where RuntimeError was."""
    assert issubclass(DeviceError, RunError) and issubclass(DeviceError, RuntimeError)
    assert not issubclass(DeviceError, UserError)


# ---------------------------------------------------------------- the DALI loader (CPU mode)

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")


def dali_cpu(root: Path, split: str = "train", **kw):
    spec = TrainSpec if split == "train" else EvalSpec
    return build_loader(root, spec(split=split, batch_size=4, image_size=64, backend="dali", **kw))


def damage_jpegs(root: Path, split: str) -> tuple[str, str]:
    """Overwrite the stream of every JPEG of the split's first shard in place; (shard file,
    first key)."""
    manifest = read_manifest(root)
    tar, index = manifest.tar_paths(split)[0], manifest.index_paths(split)[0]
    data = bytearray(tar.read_bytes())
    keys = []
    for line in index.read_text().splitlines()[1:]:
        fields = line.split()
        offset, size = int(fields[1]), int(fields[2])
        data[offset + 2 : offset + size] = b"\xff" * (size - 2)
        keys.append(fields[3].rsplit(".", 1)[0])
    tar.write_bytes(bytes(data))
    return tar.name, keys[0]


@needs_dali
def test_a_damaged_jpeg_is_named_by_shard_and_key(tmp_path):
    root = build_shard_dir(tmp_path / "shards", {"train": 8, "test": 5})
    shard, key = damage_jpegs(root, "test")
    with pytest.raises(UserError, match=f"sample {key} in shard {shard} is not a readable JPEG"):
        for _ in dali_cpu(root, "test", with_keys=True):
            pass


@needs_dali
def test_a_pipeline_that_does_not_build_keeps_dalis_words(tmp_path):
    """A shard that vanished after the loader was made: DALI's words, exit 1, no scan."""
    root = build_shard_dir(tmp_path / "shards", {"train": 8, "test": 5})
    ld = dali_cpu(root)
    read_manifest(root).tar_paths("train")[0].unlink()
    with pytest.raises(DeviceError, match="could not build its pipeline.*File mapping failed"):
        next(iter(ld))


@needs_dali
def test_the_next_epoch_is_built_ahead_and_gives_the_same_batches(tiny_shards):
    """Epoch 1 from the pipeline built during epoch 0 equals epoch 1 built fresh (a resume)."""
    ahead = dali_cpu(tiny_shards, augment=None)
    first = [labels for _, labels in ahead]
    assert ahead.prepared is not None and ahead.prepared[0] == 1  # building since the last batch
    second = [(images, labels) for images, labels in ahead]
    assert ahead.prepared[0] == 2
    ahead.prepared[1].result()  # wait for the background build
    assert ahead.builds == 3  # epochs 0 and 1, and epoch 2 prepared after epoch 1
    fresh = dali_cpu(tiny_shards, augment=None)
    fresh.set_epoch(1)
    resumed = list(fresh)
    assert len(second) == len(resumed) == len(first)
    for (a, la), (b, lb) in zip(second, resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    fresh.set_epoch(0)  # not the epoch prepared: built now, the prepared one dropped
    assert torch.equal(next(iter(fresh))[1], first[0])
    for ld in (ahead, fresh):
        ld.close()
        assert ld.prepared is None and ld.builder is None


@needs_dali
def test_a_background_build_failure_reaches_the_loop(tmp_path, monkeypatch):
    root = build_shard_dir(tmp_path / "shards", {"train": 8, "test": 5})
    ld = dali_cpu(root)
    list(ld)  # epoch 0; epoch 1 is prepared with the files present
    ld.discard_prepared()
    shutil.move(read_manifest(root).tar_paths("train")[0], tmp_path / "away.tar")
    ld.prepare(1)
    with pytest.raises(DeviceError, match="File mapping failed"):
        next(iter(ld))
    ld.close()


@needs_dali
def test_a_damaged_sample_met_by_the_background_run_is_named_in_the_loop(tmp_path):
    root = build_shard_dir(tmp_path / "shards", {"train": 8, "test": 5})
    ld = dali_cpu(root)
    list(ld)  # epoch 0
    ld.discard_prepared()
    shard, key = damage_jpegs(root, "train")  # 7 of the 8: every batch has one
    ld.prepare(1)
    assert isinstance(ld.prepared[1].result()[1], RuntimeError)  # the first run failed there
    with pytest.raises(UserError, match=f"sample {key} in shard {shard} is not a readable JPEG"):
        next(iter(ld))
    ld.close()
