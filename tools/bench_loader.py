"""Loader throughput against the reference-style baseline, on the same shards and images.

    python tools/bench_loader.py --shards shards/ --split train --batch-size 32 --json bench.json

Paths, each yielding normalised float NCHW batches of the same shape (decode-only excepted):
(a) baseline: the split's JPEGs extracted once to a temp folder as loose files, a Dataset
reading each with PIL, per-image torchvision transforms (flips, ToTensor, Normalize),
a DataLoader with one worker per core -- the reference lab's recipe; (b) the torch backend;
(c) DALI CPU; (d) DALI GPU when CUDA is available; (e) DALI reader + decode only, the decode
limit of the machine (CPU, and GPU "mixed" when present). Train mode with the default
flips. Warm-up batches are excluded; when a split is shorter than warm-up + batches the
paths run further epochs (epoch starts are then part of the figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

if __package__ in (None, ""):  # `python tools/bench_loader.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import UserError, run_cli
from pipeline.loader import available_cores, build_loader, dali_available
from pipeline.shards import read_manifest


@dataclass(frozen=True)
class BenchConfig:
    shards: Path
    split: str = "train"
    batch_size: int = 32
    image_size: int | None = None  # None: the shards' size
    batches: int = 30  # timed batches per path
    warmup: int = 3  # batches per path before the clock starts
    json: Path | None = None
    make_synthetic: int = 0  # build N synthetic 512 px samples into --shards if it does not exist
    seed: int = 0


HELP = {
    "shards": "shard folder (manifest.json + tars)",
    "image_size": "output size in pixels (default: the shards' size)",
    "batches": "timed batches per path",
    "warmup": "untimed batches per path first",
    "json": "also write the results here",
    "make_synthetic": "if --shards does not exist, build it from N synthetic fundus images",
}


# ---------------------------------------------------------------- (a) the reference-style baseline


class JpegFolder(Dataset):
    """A folder of loose JPEGs read one by one with PIL, as the reference lab did."""

    def __init__(self, items: list[tuple[Path, int]], transform):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


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


def baseline_batches(items, batch_size: int, size: int, stored: int, seed: int) -> Iterable:
    steps = [T.RandomHorizontalFlip(), T.RandomVerticalFlip()]
    if size != stored:
        steps.insert(0, T.Resize((size, size)))
    transform = T.Compose([
        *steps, T.ToTensor(),
        T.Normalize([m / 255 for m in IMAGENET_MEAN], [s / 255 for s in IMAGENET_STD]),
    ])
    loader = DataLoader(
        JpegFolder(items, transform), batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=available_cores(), generator=torch.Generator().manual_seed(seed),
    )
    while True:
        yield from loader


# ---------------------------------------------------------------- the other paths


def loader_batches(cfg: BenchConfig, size: int, backend: str, device: str) -> Iterable:
    loader = build_loader(
        cfg.shards, cfg.split, batch_size=cfg.batch_size, image_size=size, train=True,
        backend=backend, device=device, seed=cfg.seed,
    )
    try:
        while True:
            yield from loader
    finally:
        loader.close()


def decode_only_batches(cfg: BenchConfig, gpu: bool) -> Iterable:
    from pipeline.dali import decode_only_pipeline

    manifest = read_manifest(cfg.shards)
    pipe = decode_only_pipeline(
        [str(p) for p in manifest.tar_paths(cfg.split)], [str(p) for p in manifest.index_paths(cfg.split)],
        gpu=gpu, size_hint=manifest.image_size, batch_size=cfg.batch_size,
        num_threads=available_cores(), device_id=torch.cuda.current_device() if gpu else None,
        prefetch_queue_depth=2,
    )
    pipe.build()
    while True:
        images, labels = pipe.run()
        yield images, labels


def images_per_second(batches: Iterable, cfg: BenchConfig, gpu: bool) -> tuple[float, tuple]:
    """Time ``cfg.batches`` batches after ``cfg.warmup``; also return the batch shape."""
    it = iter(batches)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    shape = ()
    for _ in range(cfg.warmup):
        images, _ = next(it)
    sync()
    start = time.perf_counter()
    n = 0
    for _ in range(cfg.batches):
        images, labels = next(it)
        n += len(labels)
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else ()
    sync()
    elapsed = time.perf_counter() - start
    if hasattr(it, "close"):
        it.close()
    return n / elapsed, shape


def machine_info() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "cores_available": available_cores(),
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
        from pipeline.packing import PackConfig, pack
        from tools.make_synthetic import generate
    except ImportError as err:
        raise UserError(f"--make-synthetic needs the shard tools, which are missing ({err})") from None
    size = cfg.image_size or 512
    with tempfile.TemporaryDirectory(prefix="bench-data-") as data:
        console.print(f"building {cfg.make_synthetic} synthetic {size} px images into {cfg.shards}")
        generate(Path(data), cfg.make_synthetic, size, layout="lab", seed=cfg.seed)
        pack(PackConfig(Path(data), Path(cfg.shards), size=size, shard_size=250, quiet=True))


def run(cfg: BenchConfig, console: Console) -> dict:
    if not Path(cfg.shards).exists():
        if not cfg.make_synthetic:
            raise UserError(f"shard folder {cfg.shards} does not exist; pass --make-synthetic N to build one")
        make_synthetic(cfg, console)
    manifest = read_manifest(cfg.shards)
    size = cfg.image_size or manifest.image_size
    gpu = torch.cuda.is_available()
    paths: list[tuple[str, str, Callable[[], Iterable], bool]] = []
    tmp = tempfile.TemporaryDirectory(prefix="bench-jpegs-")
    items = extract_split(Path(cfg.shards), cfg.split, Path(tmp.name))
    # torch paths first: their DataLoader workers fork before any DALI thread exists
    paths.append(("baseline", "PIL folder, per-image transforms",
                  lambda: baseline_batches(items, cfg.batch_size, size, manifest.image_size, cfg.seed), False))
    paths.append(("torch", "torch backend", lambda: loader_batches(cfg, size, "torch", "cpu"), False))
    if dali_available():
        paths.append(("dali-cpu", "DALI CPU", lambda: loader_batches(cfg, size, "dali", "cpu"), False))
        if gpu:
            paths.append(("dali-gpu", "DALI GPU", lambda: loader_batches(cfg, size, "dali", "cuda"), True))
        paths.append(("decode-cpu", "DALI decode only (CPU)", lambda: decode_only_batches(cfg, False), False))
        if gpu:
            paths.append(("decode-gpu", "DALI decode only (GPU)", lambda: decode_only_batches(cfg, True), True))
    results = []
    try:
        for name, what, make, on_gpu in paths:
            console.print(f"timing {what} ...")
            rate, shape = images_per_second(make(), cfg, on_gpu)
            results.append({"path": name, "what": what, "images_per_s": round(rate, 1), "batch_shape": shape})
    finally:
        tmp.cleanup()
    by_name = {r["path"]: r["images_per_s"] for r in results}
    for r in results:
        r["vs_baseline"] = round(r["images_per_s"] / by_name["baseline"], 2)
        limit = by_name.get("decode-gpu" if r["path"].endswith("gpu") else "decode-cpu")
        r["vs_decode_limit"] = round(r["images_per_s"] / limit, 2) if limit else None
    return {
        "machine": machine_info(),
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                   "image_size": size, "samples": manifest.split(cfg.split).samples},
        "results": results,
    }


def show(report: dict, console: Console) -> None:
    m, c = report["machine"], report["config"]
    table = Table(title=f"{c['split']} split, {c['samples']} samples, {c['image_size']} px, batch {c['batch_size']}, "
                        f"{c['batches']} timed batches · {m['cores_available']} cores · {m['device']}")
    for col in ("path", "what", "images/s", "x baseline", "x decode limit"):
        table.add_column(col, justify="left" if col in ("path", "what") else "right")
    for r in report["results"]:
        limit = "" if r["vs_decode_limit"] is None else f"{r['vs_decode_limit']:.2f}"
        table.add_row(r["path"], r["what"], f"{r['images_per_s']:.0f}", f"{r['vs_baseline']:.2f}", limit)
    console.print(table)


def parse_args(argv: Sequence[str] | None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(BenchConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = Path if "Path" in str(f.type) else int if "int" in str(f.type) else str
        parser.add_argument(flag, type=kind, default=f.default if f.name != "shards" else None,
                            required=f.name == "shards", help=HELP.get(f.name))
    args = parser.parse_args(argv)
    return BenchConfig(**vars(args))


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.batches < 1 or cfg.warmup < 0 or cfg.batch_size < 1:
        raise UserError("--batches and --batch-size must be at least 1, --warmup at least 0")
    console = Console()
    report = run(cfg, console)
    show(report, console)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {cfg.json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
