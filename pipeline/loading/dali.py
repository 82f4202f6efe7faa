"""The DALI backends: ``dali-gpu`` (decode "mixed", augment on the GPU) and ``dali-cpu``.

The reader (``read_shards``) is apart from the processing (``decode_and_augment``); the
``@pipeline_def`` builders join them. Each train epoch has its own pipeline seeded from
(seed, epoch, rank), so an epoch's batches depend only on those -- ``set_epoch`` after a
resume gives the same batches as the first run -- and a train epoch can stop after its
``steps`` batches without leaving a half-read epoch in the reader. Its start is not paid
at the epoch's start: when a train epoch hands out its last batch, the next epoch's
pipeline is built and its first batch run on a background thread (DALI keeps the pipeline
being defined per thread), on a CUDA stream of its own (so the evaluation's kernels are not
queued behind it), while the last step and the evaluation run; torch's stream waits for
that stream when the batch is used. The next epoch
takes it if it is the epoch asked for, and builds its own otherwise (after ``set_epoch``
to another epoch). The batches are the same either way.
An evaluation pipeline has no randomness and always reads the same slice to its end, so
it is built once and reused for every epoch (docs/benchmarks.md has what a build costs).

Failures: ``pipeline.loading.dali_errors`` tells a sample that cannot be read or decoded
(named by shard and key, found on the CPU: a UserError) from everything else, which keeps
DALI's own words as a ``DeviceError``.

Slicing: ``shard_id``/``num_shards`` give rank r the samples ``[r*N//w, (r+1)*N//w)``
(``pipeline.loading.contract.rank_range``; checked against DALI in the tests). With
``pad_last_batch=True`` the reader pads the rank's slice with copies of its last
sample; eval drops that padding using the rank's exact share, train stops before it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dali_math
from nvidia.dali.plugin.pytorch import feed_ndarray

from pipeline.constants import IMAGE_EXT, IMAGENET_MEAN, IMAGENET_STD, LABEL_EXT, NUM_CLASSES
from pipeline.errors import DeviceError, UserError
from pipeline.loading.augment import GREY_WEIGHTS, NO_AUGMENT, AugmentConfig
from pipeline.loading.contract import Loader, LoaderSpec, rank_range
from pipeline.loading.dali_errors import DEVICE, classify
from pipeline.loading.samples import find_bad_sample

READER = "shards"
SHUFFLE_FILL = 1024  # DALI's shuffle buffer (undecoded samples); shards are pre-shuffled on disk
# nvJPEG on the GPU: share of each batch sent to the hardware JPEG decoder (A100, H100 and
# H200 have one; DALI ignores it where there is none), the rest to the CUDA decoder. DALI's
# usual split: the hardware engine takes most of the decoding off the CUDA cores that train.
# Both decoders' pixels are held to the CPU's (what predict.py sees) by
# tests/test_loader.py::test_dali_gpu_pixels_match_the_cpu_path at loads 0 and 1, which
# gpu_check runs; set 0 here if the load-1 case fails on a GPU (docs/gpu.md).
HW_DECODER_LOAD = 0.65


def memory_padding(stored_size: int) -> int:
    """nvJPEG's allocation padding, per decoder thread, for shards of ``stored_size`` px:
    room for two decoded images (1.5 MiB at 512 px), so a slightly larger JPEG never
    reallocates, without DALI's fixed 16-64 MiB per thread (GBs over many threads and ranks)."""
    return max(1 << 20, 2 * stored_size * stored_size * 3)


def read_shards(
    files, indexes, *, shard_id: int, num_shards: int, shuffle: bool, mmap: bool = True
):
    """(jpegs, cls) from the split's tars, this rank's slice, padded to whole batches."""
    return fn.readers.webdataset(
        dont_use_mmap=not mmap,
        paths=files,
        index_paths=indexes,
        ext=[IMAGE_EXT, LABEL_EXT],
        missing_component_behavior="error",
        shard_id=shard_id,
        num_shards=num_shards,
        stick_to_shard=True,  # the slice is chosen per epoch by the loader, not rotated by DALI
        pad_last_batch=True,
        random_shuffle=shuffle,
        initial_fill=SHUFFLE_FILL,
        name=READER,
    )


def decode(jpegs, *, gpu: bool, size_hint: int, crop_area: float = 0.0):
    """Decode to uint8 RGB HWC (on the GPU when ``gpu``), optionally a random square crop."""
    opts = {"device": "mixed" if gpu else "cpu", "output_type": types.RGB}
    if gpu:
        opts.update(
            hw_decoder_load=HW_DECODER_LOAD,
            device_memory_padding=memory_padding(size_hint),
            host_memory_padding=memory_padding(size_hint),
            # libjpeg's chroma upsampling, as the CPU decoders (PIL, torchvision) do: a model
            # trained on GPU-decoded pictures then sees the same pictures in predict.py
            jpeg_fancy_upsampling=True,
            preallocate_width_hint=size_hint,
            preallocate_height_hint=size_hint,
        )
    if crop_area > 0:
        return fn.decoders.image_random_crop(
            jpegs,
            random_area=[1.0 - crop_area, 1.0],
            random_aspect_ratio=[1.0, 1.0],
            num_attempts=16,
            **opts,
        )
    return fn.decoders.image(jpegs, **opts)


def grey_mean(images):
    """Per-image mean of the luma (torchvision's contrast centre), where the images are."""
    mean = fn.reductions.mean(images, axes=[0, 1], dtype=types.FLOAT)
    return mean[0] * GREY_WEIGHTS[0] + mean[1] * GREY_WEIGHTS[1] + mean[2] * GREY_WEIGHTS[2]


def brightness_contrast(images, brightness, contrast, *, gpu: bool):
    """``fn.brightness_contrast`` (brightness * (centre + contrast * (x - centre)), rounded and
    saturated to uint8) about each image's grey mean, written as arithmetic so that the centre
    stays on the GPU: the operator takes it only as a CPU argument, which on the GPU costs a
    device-to-host copy and a wait per batch. Equal to the operator to the level (tested)."""
    centre = grey_mean(images)
    if gpu:  # the factors are drawn on the CPU; a host-to-device copy needs no wait
        brightness, contrast = brightness.gpu(), contrast.gpu()
    x = fn.cast(images, dtype=types.FLOAT)
    out = dali_math.clamp(brightness * (centre + contrast * (x - centre)), 0, 255)
    return fn.cast(out, dtype=types.UINT8)


def translate(images, dx, dy):
    """Images moved ``dx`` pixels right and ``dy`` down (per-sample CPU scalars), black fill.

    ``warp_affine`` with the forward matrix ``[[1, 0, dx], [0, 1, dy]]``: a whole-pixel shift
    samples pixel centres exactly, so this equals ``pipeline.loading.augment.translate``."""
    offset = fn.stack(dx, dy)
    matrix = fn.transforms.translation(offset=offset)
    return fn.warp_affine(
        images, matrix=matrix, inverse_map=False, fill_value=0, interp_type=types.INTERP_NN
    )


def random_shift(most: int):
    """A whole number of pixels, uniform over ``[-most, most]``, per sample."""
    return fn.random.uniform(values=[float(v) for v in range(-most, most + 1)])


def decode_and_augment(
    jpegs,
    *,
    gpu: bool,
    size: int,
    stored_size: int,
    augment: AugmentConfig | None,
    channels_last: bool,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
):
    """JPEG bytes -> float normalised images; the steps and order of ``pipeline.loading.augment``."""
    aug = augment or NO_AUGMENT
    images = decode(jpegs, gpu=gpu, size_hint=stored_size, crop_area=aug.scale)
    if aug.scale > 0 or size != stored_size:
        images = fn.resize(images, size=[size, size], antialias=True)
    if aug.rotate > 0:
        angle = fn.random.uniform(range=[-aug.rotate, aug.rotate])
        images = fn.rotate(images, angle=angle, keep_size=True, fill_value=0)
    if aug.translate > 0 and aug.max_shift(size) > 0:
        most = aug.max_shift(size)
        images = translate(images, random_shift(most), random_shift(most))
    if aug.vflip:
        images = fn.flip(images, horizontal=0, vertical=fn.random.coin_flip(probability=0.5))
    if aug.color > 0:
        low, high = 1.0 - aug.color, 1.0 + aug.color
        images = brightness_contrast(
            images,
            fn.random.uniform(range=[low, high]),
            fn.random.uniform(range=[low, high]),
            gpu=gpu,
        )
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="HWC" if channels_last else "CHW",
        mean=list(mean),
        std=list(std),
        mirror=fn.random.coin_flip(probability=0.5) if aug.hflip else 0,
    )


@pipeline_def
def shard_pipeline(
    files,
    indexes,
    *,
    shard_id,
    num_shards,
    train,
    gpu,
    size,
    stored_size,
    augment,
    channels_last,
    with_keys,
    mmap=True,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
):
    jpegs, cls = read_shards(
        files, indexes, shard_id=shard_id, num_shards=num_shards, shuffle=train, mmap=mmap
    )
    images = decode_and_augment(
        jpegs,
        gpu=gpu,
        size=size,
        stored_size=stored_size,
        augment=augment if train else None,
        channels_last=channels_last,
        mean=mean,
        std=std,
    )
    labels = fn.cast(cls, dtype=types.INT64) - ord("0")  # grades are one ASCII digit
    if with_keys:
        return images, labels, fn.get_property(jpegs, key="source_info")
    return images, labels


@pipeline_def
def decode_only_pipeline(files, indexes, *, gpu, size_hint):
    """Reader + decode, nothing else: the decode limit that ``tools/bench/bench_loader.py`` reports."""
    jpegs, cls = read_shards(files, indexes, shard_id=0, num_shards=1, shuffle=False)
    return decode(jpegs, gpu=gpu, size_hint=size_hint), cls


def pipeline_kwargs(spec: LoaderSpec, seed: int) -> dict:
    """The Pipeline arguments: CPU-only (``device_id=None``) unless the target is a GPU."""
    gpu = spec.device.type == "cuda"
    return {
        "batch_size": spec.batch_size,
        "num_threads": max(1, spec.workers),
        "device_id": spec.device.index if gpu else None,
        "seed": seed,
        "prefetch_queue_depth": 2,
        "exec_dynamic": True,  # run(cuda_stream): outputs ordered on torch's stream, no wait
    }


def reader_slice(total: int, slice_id: int, world: int) -> tuple[int, int]:
    """(shard_id, num_shards) for DALI's reader: the slice ``rank_range(total, slice_id, world)``.

    DALI refuses more shards than samples; with ``world > total`` every non-empty slice is
    one sample, ``[lo, lo + 1)``, which is DALI's shard ``lo`` of ``total``.
    """
    if world <= total:
        return slice_id, world
    return rank_range(total, slice_id, world)[0], total


def source_key(info: np.ndarray) -> str:
    """``path:offset:key.jpg`` (DALI's source_info) -> ``key``."""
    name = bytes(info).decode().rsplit(":", 1)[-1]
    return name[: -len(IMAGE_EXT) - 1]


class DaliLoader(Loader):
    def __init__(self, spec: LoaderSpec, with_keys: bool = False):
        super().__init__(spec, with_keys)
        self.gpu = spec.device.type == "cuda"
        self.backend = "dali-gpu" if self.gpu else "dali-cpu"
        self.files = [str(p) for p in spec.manifest.tar_paths(spec.split)]
        self.indexes = [str(p) for p in spec.manifest.index_paths(spec.split)]
        self.kept = None  # evaluation: the pipeline, ready for the next epoch
        self.prepared: tuple[int, Future] | None = None  # train: (epoch, its pipeline building)
        self.builder: ThreadPoolExecutor | None = None
        self.side = None  # GPU: the CUDA stream the next epoch's first batch runs on
        self.builds = 0

    def build_pipeline(self, epoch: int):
        spec = self.spec
        seed = int(np.random.SeedSequence(spec.seed_for(epoch)).generate_state(1)[0] & 0x7FFFFFFF)
        shard_id, num_shards = reader_slice(spec.total, spec.slice_id(epoch), spec.world_size)
        pipe = shard_pipeline(
            self.files,
            self.indexes,
            shard_id=shard_id,
            num_shards=num_shards,
            train=spec.train,
            gpu=self.gpu,
            size=spec.image_size,
            stored_size=spec.manifest.image_size,
            augment=spec.augment,
            channels_last=spec.channels_last,
            with_keys=self.with_keys,
            mmap=spec.mmap,
            mean=spec.mean,
            std=spec.std,
            **pipeline_kwargs(spec, seed),
        )
        pipe.build()
        self.builds += 1
        return pipe

    def prepare(self, epoch: int) -> None:
        """Start train epoch ``epoch``'s pipeline on the background thread: build it and run
        its first batch (building is the smaller part; the first batch fills the shuffle
        buffer and, on a GPU, starts nvJPEG)."""
        self.discard_prepared()
        if self.builder is None:
            self.builder = ThreadPoolExecutor(1, thread_name_prefix="dali-build")
        # a stream of its own: on torch's stream the batch would be queued in the middle of
        # the evaluation running meanwhile, each waiting on the other
        self.prepared = (epoch, self.builder.submit(self.start_pipeline, epoch, self.side_stream()))

    def start_pipeline(self, epoch: int, stream=None) -> tuple:
        """(the pipeline, its first batch's outputs or the error running it raised)."""
        pipe = self.build_pipeline(epoch)
        try:
            return pipe, run_on(pipe, stream)
        except RuntimeError as err:  # raised in the loop, as a reading failure
            return pipe, err

    def take_pipeline(self, epoch: int) -> tuple:
        """Train epoch ``epoch``'s (pipeline, first outputs): the one prepared for it if any
        (then its first batch is ready), else a new pipeline (and None)."""
        prepared, self.prepared = self.prepared, None
        if prepared and prepared[0] == epoch:
            return prepared[1].result()  # a build error is raised here, in the loop's thread
        if prepared:
            drop(prepared[1])
        return self.build_pipeline(epoch), None

    def discard_prepared(self) -> None:
        if self.prepared:
            drop(self.prepared[1])
            self.prepared = None

    def _run_epoch(self, epoch: int) -> Iterator:
        spec = self.spec
        lo, hi = spec.slice_range(epoch)
        if hi == lo:  # more ranks than samples: this rank has nothing to evaluate
            return
        steps = spec.steps
        if spec.train:
            pipe, first = self.reading(lambda: self.take_pipeline(epoch), lo, hi, building=True)
        else:
            pipe = self.kept or self.reading(
                lambda: self.build_pipeline(epoch), lo, hi, building=True
            )
            self.kept, first = None, None
        finished = False
        try:
            for step in range(steps):
                if first is None:
                    outputs = self.reading(lambda p=pipe: run_on(p, self.stream()), lo, hi)
                else:  # run ahead by the background thread, on the side stream
                    outputs, first = self.reading(lambda ran=first: outcome(ran), lo, hi), None
                    self.wait_for_side()
                if spec.train and step == steps - 1:
                    self.prepare(epoch + 1)  # built during the last step and the evaluation
                keep = min(spec.batch_size, hi - lo - step * spec.batch_size)  # drops the padding
                labels = self.grades(outputs[1], lo, hi)
                images, labels = self.normalize(self.images(outputs[0])[:keep], labels[:keep])
                if self.with_keys:
                    yield (
                        images,
                        labels,
                        [source_key(np.asarray(outputs[2][i])) for i in range(keep)],
                    )
                else:
                    yield images, labels
            if not spec.train:
                # DALI pads every rank's slice to the largest one: read this rank's share of
                # that padding too, so the next epoch starts at the slice's first sample.
                meta = pipe.reader_meta(READER)
                per_shard = meta["epoch_size_padded"] // meta["number_of_shards"]
                for _ in range(math.ceil(per_shard / spec.batch_size) - steps):
                    self.reading(lambda p=pipe: run_on(p, self.stream()), lo, hi)
            finished = True
        finally:
            # a whole eval epoch leaves the reader at the start of its slice again
            if finished and not spec.train:  # (a train epoch stops mid-reader: not reused)
                self.kept = pipe
            del pipe

    def close(self) -> None:
        self.kept = None
        self.discard_prepared()
        if self.builder is not None:
            self.builder.shutdown(wait=True)
            self.builder = None

    def reading(self, run, lo: int, hi: int, building: bool = False):
        """``run()``; a DALI failure becomes one sentence (``dali_errors``): a sample that cannot
        be read or decoded is found and named (UserError); anything else (building the
        pipeline, memory, CUDA, the decoders' own failures) is a DeviceError in DALI's words.
        """
        try:
            return run()
        except RuntimeError as err:
            if isinstance(err, torch.OutOfMemoryError | DeviceError):
                raise
            failure = classify(str(err), building)
            what = f"reading split '{self.spec.split}' on {self.spec.device}"
            if failure.kind == DEVICE:
                raise DeviceError(failure.sentence(what)) from err
            bad = find_bad_sample(self.spec.manifest.root, self.spec.samples(lo, hi))
            if bad:
                raise UserError(bad) from None
            raise DeviceError(
                f"DALI could not read or decode a sample of split '{self.spec.split}' of "
                f"{self.spec.manifest.root} that the CPU reads and decodes ({failure.detail}); "
                "train with --backend torch meanwhile"
            ) from err

    def side_stream(self):
        """The CUDA stream of the next epoch's first batch (None on the CPU)."""
        if not self.gpu:
            return None
        if self.side is None:
            self.side = torch.cuda.Stream(self.spec.device)
        return self.side

    def wait_for_side(self) -> None:
        """torch's stream waits (on the GPU, not the host) for the batch run on the side."""
        if self.side is not None:
            torch.cuda.current_stream(self.spec.device).wait_stream(self.side)

    def stream(self):
        """torch's current CUDA stream (None on the CPU): DALI hands its GPU outputs over
        ordered on it, so that ``run`` does not wait for the batch on the host."""
        return torch.cuda.current_stream(self.spec.device) if self.gpu else None

    def images(self, images) -> torch.Tensor:
        """DALI's images as a torch tensor (on the GPU copied on torch's stream, to order it with torch's work)."""
        images = images.as_tensor()
        if self.gpu:
            out = torch.empty(images.shape(), dtype=torch.float32, device=self.spec.device)
            feed_ndarray(images, out, cuda_stream=torch.cuda.current_stream(self.spec.device))
        else:  # the dynamic executor hands its output buffers over: no copy needed
            out = torch.from_dlpack(images)
        if self.spec.channels_last:
            out = out.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: channels_last strides
        return out

    def grades(self, labels, lo: int, hi: int) -> torch.Tensor:
        """The batch's grades (CPU, int64), checked: a ``.cls`` that is not one digit 0-4 stops
        the run with one sentence naming the shard and the key."""
        try:
            grades = np.array(labels.as_tensor()).reshape(-1)
        except RuntimeError:  # members of different lengths: some .cls is not one byte
            grades = None
        if (
            grades is None
            or len(grades) != self.spec.batch_size
            or not (0 <= grades.min() and grades.max() < NUM_CLASSES)
        ):
            bad = find_bad_sample(self.spec.manifest.root, self.spec.samples(lo, hi), decode=False)
            raise UserError(
                bad
                or f"DALI read grades outside 0-{NUM_CLASSES - 1} from split "
                f"'{self.spec.split}' of {self.spec.manifest.root}; rebuild the shards"
            )
        grades = torch.from_numpy(grades)
        # pinned, so that the copy to the GPU is asynchronous (normalize: non_blocking)
        return grades.pin_memory() if self.gpu else grades


def run_on(pipe, stream):
    """One batch: with a CUDA stream, DALI's GPU outputs come ordered on it, not host-synced."""
    return pipe.run() if stream is None else pipe.run(stream)


def outcome(ran):
    """What a run gave: its outputs, or the error it raised, raised again."""
    if isinstance(ran, BaseException):
        raise ran
    return ran


def drop(build: Future) -> None:
    """Forget a background build: cancelled if not started, else waited for (its errors too),
    so no pipeline is left half built by a thread nobody waits for."""
    if not build.cancel():
        build.exception()


def is_device_error(err: BaseException) -> bool:
    """Whether a DALI failure comes from the GPU or DALI itself, not from the data."""
    return isinstance(err, torch.OutOfMemoryError) or classify(str(err)).kind == DEVICE
