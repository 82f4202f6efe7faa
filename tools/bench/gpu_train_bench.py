"""Training throughput on one GPU, and what the loader costs of it.

    python tools/bench/gpu_train_bench.py --out bench/                        # on a GPU machine
    python tools/bench/gpu_train_bench.py --device cpu --steps 3 --warmup 1 \\
        --image-size 64 --batch-size 4 --images 32 --out /tmp/bench        # CPU smoke test

For each --batch-size and --arch, the trainer's own step (``trainer.fitting.engine.train_step``:
bf16 autocast, channels_last, cudnn.benchmark, SGD) runs twice after --warmup steps: fed
by ``build_loader`` (--backend: DALI decoding on the GPU, or the torch backend) from a
synthetic fundus-like shard folder at --image-size, and fed one GPU-resident random batch
over and over, the timed steps inside the loader's first epoch (its first batch apart,
its last unused: no epoch restart in the window; the resident batch gets the same window).
Prints and writes images/s of each, ``loader_overhead = 1 - loader/resident``,
the seconds to the loader's first batch and the peak GPU memory to
``OUT/gpu_train_bench.json``. Goal on one H100/H200 at 512 px: resnet50 >= 700 images/s
with the loader costing <= 5 %.
"""

from __future__ import annotations

import io
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.cli import arg, parse_config, run_cli
from pipeline.constants import NUM_CLASSES, SHARD_NAME
from pipeline.errors import UserError
from pipeline.fileio import atomic_write_json
from pipeline.hostinfo import usable_cores
from pipeline.manifest import Manifest, SplitInfo
from pipeline.shardformat import write_shard
from tools.bench.bench_loader import jpeg_profile, window

# torch, Accelerate and the trainer's modules load inside the functions that use them: --help
# and option errors are answered before they load

SHARD_SIZE = 1000


# Sensor-like noise and JPEG quality that make a 512 px image the size of a 512 px EyePACS
# photograph (100-200 KB, ~4 ms to decode on one core): with the smooth disc alone it was
# ~30 KB and decoded 2-3 times faster than a real photograph, flattering every loader figure.
NOISE, QUALITY = 14.0, 97


def fundus_like(index: int, size: int, grade: int = 0) -> bytes:
    """A JPEG of a bright disc on black with smooth shading and noise (sized like a real
    fundus photograph: ``NOISE``), with ``4 * grade`` small bright spots, so that the grade
    can be learnt."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    cx, cy = rng.uniform(-0.05, 0.05, 2)
    r = np.hypot(x - cx, y - cy)
    disc = np.clip((0.48 - r) * 40, 0, 1)
    shade = 1 - 1.2 * r + 0.2 * np.sin(8 * x + rng.uniform(0, 6)) * np.cos(6 * y)
    rgb = np.stack([200 * shade, 90 * shade, 40 * shade], axis=-1) * disc[..., None]
    for sx, sy in rng.uniform(-0.3, 0.3, (4 * grade, 2)):
        rgb[np.hypot(x - sx, y - sy) < 0.02] = (250, 230, 120)
    rgb += rng.normal(0, NOISE, rgb.shape).astype(np.float32) * disc[..., None]
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


def make_shards(
    root: Path, images: int, size: int, distinct: int = 256, eval_images: int = 0
) -> Path:
    """A shard folder of ``images`` train samples cycling ``distinct`` synthetic JPEGs, and
    ``eval_images`` each of val and test, every one of those a photograph of its own (made
    in parallel on every core).

    Decoding costs the same whether or not train bytes repeat, and repeating them keeps the
    set-up to seconds; evaluation images are all distinct, so that one near-tie image moves
    one image of a comparison, not four copies of it. A photograph's grade is its number
    ``% 5`` in train, sample ``i``'s ``i % 5`` in val and test. An existing folder with a
    manifest is reused.
    """
    if (root / "manifest.json").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    counts = {"train": images, "val": eval_images, "test": eval_images}
    distinct = min(distinct, images)
    # (photograph number, grade) of sample i: train cycles photographs 0..distinct-1 (each
    # with its own grade), val and test continue after them, one photograph per sample
    first = {"train": 0, "val": distinct, "test": distinct + eval_images}

    def photo(split: str, i: int) -> tuple[int, int]:
        if split == "train":
            return i % distinct, i % distinct % NUM_CLASSES
        return first[split] + i, i % NUM_CLASSES

    wanted = sorted({photo(s, i) for s, n in counts.items() for i in range(n)})
    with ProcessPoolExecutor(max_workers=usable_cores()) as pool:
        made = pool.map(
            fundus_like,
            [number for number, _ in wanted],
            [size] * len(wanted),
            [grade for _, grade in wanted],
            chunksize=8,
        )
        jpegs = dict(zip(wanted, made, strict=True))
    splits = {}
    for split, n in counts.items():
        if n == 0:
            continue
        photos = [photo(split, i) for i in range(n)]
        shards = []
        for index, start in enumerate(range(0, n, SHARD_SIZE)):
            ids = range(start, min(start + SHARD_SIZE, n))
            samples = [(f"{split}{i}", jpegs[photos[i]], photos[i][1]) for i in ids]
            shards.append(write_shard(root / SHARD_NAME.format(split=split, index=index), samples))
        grades = [grade for _, grade in photos]
        splits[split] = SplitInfo.of(shards, np.bincount(grades, minlength=NUM_CLASSES))
    Manifest(
        root,
        image_size=size,
        splits=splits,
        preprocess={"size": size, "graham": False},
        source={"layout": "synthetic"},
    ).write()
    return root


def resident_batches(batch_size: int, size: int, device, channels_last: bool):
    import torch

    images = torch.randn(batch_size, 3, size, size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    while True:
        yield images, labels


def loader_window(loader, warmup: int, steps: int) -> tuple[int, int]:
    """(untimed, timed) steps inside the loader's first epoch: the first batch is always
    untimed, the epoch's last (it starts the next epoch) is never used."""
    if len(loader) < 3:
        raise UserError(
            f"an epoch of the shards is {len(loader)} step(s); the benchmark needs 3 (the first, "
            "one timed, the last): use a smaller --batch-size or more --images"
        )
    warm, timed = window(len(loader) - 2, max(0, warmup - 1), steps)
    return warm + 1, timed


def time_steps(
    batches, arch: str, batch_size: int, window: tuple[int, int], accelerator
) -> tuple[float, float]:
    """(images/s of the window's timed training steps after its untimed ones, seconds to
    the first batch); a fresh model each time."""
    import torch

    from trainer.base.model import build_model
    from trainer.fitting.engine import build_optimizer, build_scheduler, train_step

    warmup, steps = window
    model = build_model(arch)
    if accelerator.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
    scheduler = build_scheduler(optimizer, "constant", 0, warmup + steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    sync = torch.cuda.synchronize if accelerator.device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    first = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            start = time.perf_counter()
        images, labels = next(batches)
        if step == 0:
            first = time.perf_counter() - start
        train_step(model, images, labels, optimizer, scheduler, accelerator)
    sync()
    seconds = time.perf_counter() - start
    batches.close()  # ends the loader's epoch (frees its pipeline) before the next measurement
    accelerator.free_memory()
    return steps * batch_size / seconds, first


@dataclass
class GpuBenchConfig:
    device: str = arg("cuda", "where to train", choices=("cuda", "cpu"))
    arch: list[str] = arg(
        ["resnet18", "resnet50"], "networks to time", choices=("resnet18", "resnet50")
    )
    steps: int = arg(300, "timed steps per measurement")
    warmup: int = arg(30, "untimed steps first (cudnn autotuning, DALI start)")
    batch_size: list[int] = arg([64], "images per step (each size is measured)")
    image_size: int = arg(512, "square input size")
    images: int | None = arg(
        None, "samples in the synthetic shard folder (default: one epoch covers all steps)"
    )
    shards: Path | None = arg(None, "shard folder (default: made in --work)", metavar="DIR")
    work: Path = arg(
        Path("/tmp/gpu_train_bench"), "where the synthetic shards are made", metavar="DIR"
    )
    backend: str = arg("auto", "loader backend", choices=("auto", "dali", "torch", "torch-nvjpeg"))
    workers: int | None = arg(None, "loader workers (default: the loader's choice)")
    out: Path = arg(Path("."), "folder to write gpu_train_bench.json into", metavar="DIR")


def gpu_memory() -> dict:
    """GiB: torch's own peak since the last reset, and the device's use now (DALI's buffers too)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return {
        "torch_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "device_used_gib": (total - free) / 2**30,
    }


def measure(loader, arch: str, batch_size: int, args, accelerator) -> dict:
    """One row: ``arch`` fed by ``loader`` and by a resident batch, and its peak memory."""
    import torch

    cuda = accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    inside = loader_window(loader, args.warmup, args.steps)
    loader.set_epoch(0)
    real, first = time_steps(iter(loader), arch, batch_size, inside, accelerator)
    memory = gpu_memory() if cuda else {}
    resident, _ = time_steps(
        resident_batches(batch_size, args.image_size, accelerator.device, cuda),
        arch,
        batch_size,
        inside,
        accelerator,
    )
    row = {
        "arch": arch,
        "batch_size": batch_size,
        "loader_images_per_s": real,
        "resident_images_per_s": resident,
        "loader_overhead": 1 - real / resident,
        "first_batch_s": first,
        "warmup_steps": inside[0],
        "timed_steps": inside[1],
        **memory,
    }
    print(
        f"{arch:>9} batch {batch_size:>4}: {real:8.1f} images/s with the loader, {resident:8.1f} "
        f"with a resident batch, loader overhead {100 * row['loader_overhead']:5.1f} %, "
        f"first batch {first:.2f} s"
    )
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_config(
        GpuBenchConfig, argv, prog="gpu_train_bench.py", description=__doc__.splitlines()[0]
    )
    import torch
    from accelerate import Accelerator

    from pipeline.loading.loader import TrainSpec, build_loader

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UserError("no CUDA GPU here; run with --device cpu (and tiny settings) to smoke-test")
    precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    accelerator = Accelerator(cpu=not cuda, mixed_precision=precision)
    torch.backends.cudnn.benchmark = cuda
    # one epoch holds the window (its first and last batches besides)
    images = args.images or (args.warmup + args.steps + 2) * max(args.batch_size)
    shards = args.shards or make_shards(
        args.work / f"shards-{args.image_size}-{images}", images, args.image_size
    )
    device_name = (
        torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    )
    results: list[dict] = []
    report = {
        "device": device_name,
        "torch": torch.__version__,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "precision": precision,
        "backend": args.backend,
        "workers": args.workers,
        "steps": args.steps,
        "warmup": args.warmup,
        "photographs": jpeg_profile(Path(shards), "train"),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for batch_size in args.batch_size:
        loader = build_loader(
            shards,
            TrainSpec(
                batch_size=batch_size,
                image_size=args.image_size,
                backend=args.backend,
                device=accelerator.device,
                workers=args.workers,
                channels_last=cuda,
            ),
        )
        report["backend"] = loader.backend
        print(
            f"{device_name}: {args.image_size} px, batch {batch_size}, {precision}, "
            f"loader {loader.backend}, {args.steps} timed steps after {args.warmup}"
        )
        for arch in args.arch:
            results.append(measure(loader, arch, batch_size, args, accelerator))
            # after every row: a run stopped by a time limit keeps what it measured
            atomic_write_json(args.out / "gpu_train_bench.json", report)
        loader.close()
    print(f"wrote {args.out / 'gpu_train_bench.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
