"""Loader throughput against the reference-style baseline, on the same shards and images.

    python tools/bench/bench_loader.py --shards shards/ --split train --batch-size 32 --out bench/

Paths, each yielding normalised float NCHW batches of the same shape (decode-only excepted):
(a) baseline: the split's JPEGs extracted once to a temp folder as loose files, a Dataset
reading each with PIL, per-image torchvision transforms (flips, ToTensor, Normalize),
a DataLoader with one worker per core -- the reference lab's recipe; (b) the torch backend;
(c) DALI CPU; (d) DALI GPU when CUDA is available; (e) DALI reader + decode only, the decode
limit of the machine (CPU, and GPU "mixed" when present); (f) the torch backend feeding the
GPU (uint8 from the workers, flipped and normalised on the GPU); (f') torch-nvjpeg (the
workers read, the GPU decodes with nvJPEG); (g) the torch backend's own
reading and libjpeg-turbo decoding alone in the same workers, its decode limit (what a
machine without DALI can reach). Train mode with the default
flips. Each path's window lies inside one epoch: its first batch (start-up) is timed apart
(``first_batch_s``), then ``--warmup`` untimed and ``--batches`` timed batches; an epoch
too short for them times fewer (``timed_batches``), never an epoch's restart. Beside the
figures: the split's mean JPEG size and libjpeg-turbo's decode time per image (one core).
Writes ``OUT/bench_loader.json``; measured figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import os
import platform
import tarfile
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.cli import arg, parse_config, run_cli
from pipeline.cli import console as cli_console
from pipeline.constants import SPLITS
from pipeline.errors import UserError
from pipeline.fileio import atomic_write_json
from pipeline.hostinfo import usable_cores
from pipeline.manifest import read_manifest

# torch, torchvision and the loaders load inside the functions that use them (the torch
# datasets in tools/bench/torch_paths.py): --help and option errors are answered at once

PATHS = (
    "baseline",
    "torch",
    "torch-gpu",
    "torch-nvjpeg",
    "dali-cpu",
    "dali-gpu",
    "decode-cpu",
    "decode-gpu",
    "decode-torch",
)


@dataclass(frozen=True)
class BenchConfig:
    shards: Path = arg(help="shard folder (manifest.json + tars)", metavar="DIR")
    split: str = arg("train", "split to read", choices=SPLITS)
    batch_size: int = arg(32, "images per batch")
    image_size: int | None = arg(None, "output size in pixels (default: the shards' size)")
    batches: int = arg(30, "timed batches per path")
    warmup: int = arg(3, "untimed batches per path first")
    out: Path | None = arg(None, "folder to write bench_loader.json into", metavar="DIR")
    make_synthetic: int = arg(
        0, "if --shards does not exist, build it from N synthetic fundus images", metavar="N"
    )
    seed: int = arg(0, "seed of the synthetic images and the shuffles")
    paths: list[str] | None = arg(
        None, "paths to time (default: every one this machine can run)", choices=PATHS
    )
    workers: int | None = arg(
        None, "the torch paths' worker processes (default: the loader's choice)"
    )

    def __post_init__(self):
        if self.batches < 1 or self.warmup < 0 or self.batch_size < 1:
            raise UserError("--batches and --batch-size must be at least 1, --warmup at least 0")


# ---------------------------------------------------------------- (a) the reference-style baseline


def extract_split(shards: Path, split: str, out: Path) -> list[tuple[Path, int]]:
    """The split's JPEGs as loose ``<key>.jpeg`` files (done once, outside the timing)."""
    items = []
    for tar_path in read_manifest(shards).tar_paths(split):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name, data in members.items():
            key, ext = name.rsplit(".", 1)
            if ext == "jpg":
                path = out / f"{key}.jpeg"
                path.write_bytes(data)
                items.append((path, int(members[f"{key}.cls"])))
    return items


# ---------------------------------------------------------------- the other paths


def loader_batches(cfg: BenchConfig, size: int, backend: str, device: str):
    """One train epoch of ``backend`` (``len()`` batches): a timing window never crosses
    an epoch's start (workers forked, a pipeline built, a batch decoded before any arrives)."""
    from pipeline.loading.loader import TrainSpec, build_loader

    return build_loader(
        cfg.shards,
        TrainSpec(
            split=cfg.split,
            batch_size=cfg.batch_size,
            image_size=size,
            backend=backend,
            device=device,
            seed=cfg.seed,
            workers=cfg.workers if backend.startswith("torch") else None,
        ),
    )


def decode_only_batches(cfg: BenchConfig, gpu: bool) -> Iterable:
    import torch

    from pipeline.loading.dali import decode_only_pipeline

    manifest = read_manifest(cfg.shards)
    pipe = decode_only_pipeline(
        [str(p) for p in manifest.tar_paths(cfg.split)],
        [str(p) for p in manifest.index_paths(cfg.split)],
        gpu=gpu,
        size_hint=manifest.image_size,
        batch_size=cfg.batch_size,
        num_threads=usable_cores(),
        device_id=torch.cuda.current_device() if gpu else None,
        prefetch_queue_depth=2,
    )
    pipe.build()
    while True:
        images, labels = pipe.run()
        yield images, labels


def window(epoch_batches: int | None, warmup: int, batches: int) -> tuple[int, int]:
    """(warm-up, timed) batches that fit in one epoch of ``epoch_batches`` (None: endless):
    the timed ones shrink first, then the warm-up, and one batch is always timed."""
    if epoch_batches is None or warmup + batches <= epoch_batches:
        return warmup, batches
    timed = max(1, epoch_batches - warmup)
    return max(0, epoch_batches - timed), timed


def images_per_second(source, cfg: BenchConfig, gpu: bool) -> dict:
    """Time one window of ``source`` (an epoch's loader, or an endless generator): the
    first batch (start-up: workers, a DALI pipeline) apart, then ``--warmup`` untimed and
    ``--batches`` timed batches, all inside that one epoch (``window``)."""
    import torch

    sync = torch.cuda.synchronize if gpu else (lambda: None)
    epoch = len(source) if hasattr(source, "__len__") else None
    if epoch is not None and epoch < 3:
        raise UserError(
            f"an epoch of this split is {epoch} batch(es) of {cfg.batch_size}; the benchmark needs "
            "3 (the first, one timed, the last): use a smaller --batch-size or a larger split"
        )
    # the epoch's first batch is timed apart, and its last one starts the torch backends'
    # next epoch (forks its workers): both are left out of the window
    warmup, timed = window(None if epoch is None else epoch - 2, cfg.warmup, cfg.batches)
    shape = ()
    begin = time.perf_counter()
    it = iter(source)
    next(it)
    sync()
    first = time.perf_counter() - begin
    for _ in range(warmup):
        images, _ = next(it)
    sync()
    start = time.perf_counter()
    n = 0
    for _ in range(timed):
        images, labels = next(it)
        n += len(labels)
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else ()
    sync()
    elapsed = time.perf_counter() - start
    if hasattr(it, "close"):
        it.close()
    if hasattr(source, "close"):
        source.close()
    return {
        "images_per_s": n / elapsed,
        "batch_shape": shape,
        "first_batch_s": first,
        "warmup": warmup,
        "timed_batches": timed,
        "epoch_batches": epoch,
    }


def jpeg_profile(shards: Path, split: str, samples: int = 64) -> dict:
    """The split's stored photographs: mean KB and the mean milliseconds libjpeg-turbo takes
    to decode one on one core (the first ``samples``), beside the throughput figures: a
    loader on small JPEGs looks faster than it will be on real 100-200 KB photographs."""
    import torch

    from pipeline.loading.samples import chunked, decode_sample, read_chunk
    from pipeline.shardformat import read_index

    manifest = read_manifest(shards)
    refs = []
    for shard in manifest.split(split).shards:
        refs += read_index(manifest.root / shard.index, shard.file)
        if len(refs) >= samples:
            break
    datas = [
        (ref, bytes(data))
        for chunk in chunked(refs[:samples])
        for ref, data, _ in read_chunk(manifest.root, chunk)
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for ref, data in datas:
            decode_sample(ref, memoryview(bytearray(data)))
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {
        "mean_jpeg_kb": round(sum(len(d) for _, d in datas) / len(datas) / 1024, 1),
        "decode_ms_per_image": round(1000 * seconds / len(datas), 2),
        "profiled_images": len(datas),
    }


def machine_info() -> dict:
    import torch

    from pipeline.loading.loader import dali_available

    info = {
        "cpu_count": os.cpu_count(),
        "cores_available": usable_cores(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": __import__("torchvision").__version__,
        "dali": None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    if dali_available():
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    return info


def make_synthetic(cfg: BenchConfig, console: Console) -> None:
    """Build ``cfg.shards`` from ``cfg.make_synthetic`` synthetic images (tools/make_synthetic.py)."""
    try:
        from pipeline.writing.packing import PackConfig, pack
        from tools.make_synthetic import generate
    except ImportError as err:
        raise UserError(
            f"--make-synthetic needs the shard tools, which are missing ({err})"
        ) from None
    size = cfg.image_size or 512
    with tempfile.TemporaryDirectory(prefix="bench-data-") as data:
        console.print(f"building {cfg.make_synthetic} synthetic {size} px images into {cfg.shards}")
        generate(Path(data), cfg.make_synthetic, size, layout="lab", seed=cfg.seed)
        pack(PackConfig(Path(data), Path(cfg.shards), size=size, shard_size=250, quiet=True))


def runnable_paths(gpu: bool) -> list[str]:
    """The paths this machine can time: DALI's need DALI, the GPU's a GPU."""
    from pipeline.loading.loader import dali_available

    has_dali = dali_available()
    return [
        n
        for n in PATHS
        if (has_dali or not ("dali" in n or n in ("decode-cpu", "decode-gpu")))
        and (gpu or not (n.endswith("gpu") or n == "torch-nvjpeg"))
    ]


def decode_limit(path: str, by_name: dict[str, float]) -> float | None:
    """The decode-only figure a path is held against: the GPU decoder's for DALI on the GPU,
    else the CPU's (DALI's decoder, or the torch backend's where DALI is missing)."""
    if path == "dali-gpu":
        return by_name.get("decode-gpu")
    if path == "torch-nvjpeg":
        return None  # decodes on the GPU, which no decode-only path here measures alone
    return by_name.get("decode-cpu") or by_name.get("decode-torch")


def run(cfg: BenchConfig, console: Console) -> dict:
    import torch

    from tools.bench.torch_paths import baseline_batches, decode_torch_batches

    gpu = torch.cuda.is_available()
    wanted = cfg.paths or runnable_paths(gpu)
    if missing := [n for n in wanted if n not in runnable_paths(gpu)]:
        raise UserError(f"path(s) {', '.join(missing)} cannot run here (no DALI or no GPU)")
    if not Path(cfg.shards).exists():
        if not cfg.make_synthetic:
            raise UserError(
                f"shard folder {cfg.shards} does not exist; pass --make-synthetic N to build one"
            )
        make_synthetic(cfg, console)
    manifest = read_manifest(cfg.shards)
    size = cfg.image_size or manifest.image_size
    tmp = tempfile.TemporaryDirectory(prefix="bench-jpegs-")
    items = (
        extract_split(Path(cfg.shards), cfg.split, Path(tmp.name)) if "baseline" in wanted else []
    )
    # torch paths first: their DataLoader workers fork before any DALI thread exists
    candidates = {
        "baseline": (
            "PIL folder, per-image transforms",
            False,
            lambda: baseline_batches(items, cfg.batch_size, size, manifest.image_size, cfg.seed),
        ),
        "torch": ("torch backend", False, lambda: loader_batches(cfg, size, "torch", "cpu")),
        "torch-gpu": (
            "torch backend to the GPU",
            True,
            lambda: loader_batches(cfg, size, "torch", "cuda"),
        ),
        "torch-nvjpeg": (
            "torch backend, nvJPEG decoding on the GPU",
            True,
            lambda: loader_batches(cfg, size, "torch-nvjpeg", "cuda"),
        ),
        "decode-torch": (
            "torch backend decode only (CPU)",
            False,
            lambda: decode_torch_batches(cfg.shards, cfg.split, cfg.batch_size, cfg.workers),
        ),
        "dali-cpu": ("DALI CPU", False, lambda: loader_batches(cfg, size, "dali", "cpu")),
        "dali-gpu": ("DALI GPU", True, lambda: loader_batches(cfg, size, "dali", "cuda")),
        "decode-cpu": ("DALI decode only (CPU)", False, lambda: decode_only_batches(cfg, False)),
        "decode-gpu": ("DALI decode only (GPU)", True, lambda: decode_only_batches(cfg, True)),
    }
    paths = [(n, *candidates[n]) for n in candidates if n in wanted]
    results = []
    try:
        for name, what, on_gpu, make in paths:
            console.print(f"timing {what} ...")
            timing = images_per_second(make(), cfg, on_gpu)
            results.append(
                {
                    "path": name,
                    "what": what,
                    **timing,
                    "images_per_s": round(timing["images_per_s"], 1),
                    "first_batch_s": round(timing["first_batch_s"], 3),
                }
            )
    finally:
        tmp.cleanup()
    by_name = {r["path"]: r["images_per_s"] for r in results}
    for r in results:
        base = by_name.get("baseline")
        r["vs_baseline"] = round(r["images_per_s"] / base, 2) if base else None
        limit = decode_limit(r["path"], by_name)
        r["vs_decode_limit"] = round(r["images_per_s"] / limit, 2) if limit else None
    return {
        "machine": machine_info(),
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "image_size": size,
            "samples": manifest.split(cfg.split).samples,
        },
        "photographs": jpeg_profile(Path(cfg.shards), cfg.split),
        "results": results,
    }


def show(report: dict, console: Console) -> None:
    m, c, jpg = report["machine"], report["config"], report["photographs"]
    table = Table(
        title=f"{c['split']} split, {c['samples']} samples, {c['image_size']} px, batch {c['batch_size']}, "
        f"up to {c['batches']} timed batches in one epoch · JPEGs {jpg['mean_jpeg_kb']:.0f} KB, "
        f"{jpg['decode_ms_per_image']:.1f} ms to decode · {m['cores_available']} cores · {m['device']}"
    )
    for col in ("path", "what", "images/s", "x baseline", "x decode limit", "first batch (s)"):
        table.add_column(col, justify="left" if col in ("path", "what") else "right")
    for r in report["results"]:
        ratios = [
            ("" if r[k] is None else f"{r[k]:.2f}") for k in ("vs_baseline", "vs_decode_limit")
        ]
        table.add_row(
            r["path"], r["what"], f"{r['images_per_s']:.0f}", *ratios, f"{r['first_batch_s']:.2f}"
        )
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(
        BenchConfig, argv, prog="bench_loader.py", description=__doc__.split("\n\n")[0]
    )
    console = cli_console()
    report = run(cfg, console)
    show(report, console)
    if cfg.out:
        cfg.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cfg.out / "bench_loader.json", report)
        console.print(f"wrote {cfg.out / 'bench_loader.json'}")
    return 0


def cli() -> None:
    """The ``dr-bench-loader`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
