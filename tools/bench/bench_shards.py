"""Shard-builder benchmark: pass-through packing vs ``tar cf``, draft vs full JPEG decoding.

    python tools/bench/bench_shards.py --out bench/

1. ``--n`` synthetic 512x512 JPEGs (copies of ``--unique`` rendered ones) in the kaggle
   layout, packed by ``pipeline.writing.packing.pack`` (already the target size: pass-through,
   original bytes) vs ``tar cf`` of the same files; goal: packing >= 0.8x tar's throughput.
   Both read from a warm page cache; the packer also hashes (sha256) and fsyncs its shards,
   so the table also compares with ``tar cf`` followed by an fsync of its output.
2. ``--raw-n`` synthetic raw-camera photos (``--raw-width`` x ``--raw-height``, rendered at
   half size, upscaled and given full-size sensor noise so they weigh about what raw EyePACS
   JPEGs weigh) preprocessed to 512 px on one core, with DCT-domain draft decoding vs a full
   decode and then the same crop/pad/resize/encode; goal: draft >= 3x faster.

Results are printed as a table and written to ``OUT/bench_shards.json``. The defaults
take about 35 s on 2 cores; measured figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import io
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, features
from rich.console import Console
from rich.table import Table

from pipeline.cli import IMAGE_SIZE, arg, parse_config, run_cli
from pipeline.cli import console as cli_console
from pipeline.constants import DEFAULT_SHARD_SIZE
from pipeline.errors import UserError
from pipeline.fileio import atomic_write_json
from pipeline.writing.packing import PackConfig, pack
from pipeline.writing.preprocess import encode_jpeg, open_image, preprocess
from tools.make_synthetic import generate, image_ids, render_fundus

PASS_GOAL = 0.8
DRAFT_GOAL = 3.0


@dataclass
class BenchConfig:
    n: int = arg(3000, "pass-through images packed")
    shard_size: int = arg(DEFAULT_SHARD_SIZE, "samples per shard")
    unique: int = arg(40, "of the --n images, how many are rendered (the rest are copies)")
    size: int = arg(512, "side of the pass-through images", **IMAGE_SIZE)
    raw_n: int = arg(16, "raw-camera photos preprocessed")
    raw_width: int = arg(3888, "raw photo width")
    raw_height: int = arg(2592, "raw photo height")
    repeats: int = arg(3, "timings per figure (the best is kept)")
    seed: int = arg(0, "seed of the synthetic photos")
    work_dir: Path | None = arg(None, "where to build the inputs (default: a temporary folder)")
    out: Path | None = arg(None, "folder to write bench_shards.json into", metavar="DIR")

    def __post_init__(self):
        if self.n < self.unique or self.unique < 2 or self.raw_n < 1 or self.repeats < 1:
            raise UserError("need --n >= --unique >= 2, --raw-n >= 1 and --repeats >= 1")


def best_time(fn, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_pass_through_set(folder: Path, n: int, unique: int, size: int, seed: int) -> int:
    """Kaggle layout with n size x size JPEGs; returns their total bytes."""
    items = generate(folder, n=unique, size=size, layout="kaggle", seed=seed)
    labels = dict(items)
    ids = image_ids(n)
    rendered = [i for i, _ in items]
    for k, image_id in enumerate(ids[unique:], start=unique):
        source = rendered[k % unique]
        shutil.copyfile(folder / "train" / f"{source}.jpeg", folder / "train" / f"{image_id}.jpeg")
        labels[image_id] = labels[source]
    (folder / "trainLabels.csv").write_text(
        "image,level\n" + "".join(f"{i},{labels[i]}\n" for i in ids)
    )
    return sum(p.stat().st_size for p in (folder / "train").iterdir())


def make_raw_set(folder: Path, n: int, width: int, height: int, seed: int) -> list[bytes]:
    """n raw-size photos: 4 renders at half size, upscaled, each with its own full-size noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bases = [
        Image.fromarray(render_fundus(g, rng, height // 2, eye, width=width // 2)).resize(
            (width, height), Image.Resampling.BICUBIC
        )
        for g, eye in ((0, "left"), (2, "right"), (3, "left"), (4, "right"))[: max(1, min(4, n))]
    ]
    out = []
    for i in range(n):
        arr = np.asarray(bases[i % len(bases)], np.int16)
        noisy = np.clip(
            arr + rng.normal(0, 2.0, arr.shape[:2] + (1,)).astype(np.int16), 0, 255
        ).astype(np.uint8)
        path = folder / f"{i}_left.jpeg"
        Image.fromarray(noisy).save(path, "JPEG", quality=92)
        out.append(path.read_bytes())
    return out


def bench_pass_through(cfg: BenchConfig, work: Path, console: Console) -> dict:
    data = work / "pass"
    total = make_pass_through_set(data, cfg.n, cfg.unique, cfg.size, cfg.seed)
    for p in (data / "train").iterdir():  # warm the page cache for both contenders
        p.read_bytes()
    tar_out, shards = work / "pass.tar", work / "pass_shards"

    def run_tar():
        subprocess.run(["tar", "cf", str(tar_out), "-C", str(data), "train"], check=True)

    def run_tar_fsync():  # the same durability as the shards, which are fsynced before renaming
        run_tar()
        with open(tar_out, "rb+") as f:
            os.fsync(f.fileno())

    def run_pack():
        pack(
            PackConfig(data, shards, size=cfg.size, shard_size=cfg.shard_size, quiet=True),
            console=Console(file=io.StringIO()),
        )

    def clean():  # every repeat builds from scratch (a rerun would reuse the shards)
        shutil.rmtree(shards, ignore_errors=True)
        tar_out.unlink(missing_ok=True)

    t_tar = best_time(run_tar, cfg.repeats, clean)
    t_tar_fsync = best_time(run_tar_fsync, cfg.repeats, clean)
    t_pack = best_time(run_pack, cfg.repeats, clean)
    mb = total / 1e6
    return {
        "images": cfg.n,
        "megabytes": round(mb, 2),
        "tar_s": round(t_tar, 4),
        "pack_s": round(t_pack, 4),
        "tar_fsync_s": round(t_tar_fsync, 4),
        "tar_mb_s": round(mb / t_tar, 1),
        "tar_fsync_mb_s": round(mb / t_tar_fsync, 1),
        "pack_mb_s": round(mb / t_pack, 1),
        "pack_images_s": round(cfg.n / t_pack, 1),
        "ratio_pack_vs_tar": round(t_tar / t_pack, 3),
        "ratio_pack_vs_tar_fsync": round(t_tar_fsync / t_pack, 3),
    }


def bench_draft(cfg: BenchConfig, work: Path) -> dict:
    raw = make_raw_set(work / "raw", cfg.raw_n, cfg.raw_width, cfg.raw_height, cfg.seed)

    def run(draft: bool) -> list[bytes]:
        return [
            encode_jpeg(preprocess(open_image(d, draft_size=cfg.size if draft else None), cfg.size))
            for d in raw
        ]

    t_draft = best_time(lambda: run(True), cfg.repeats)
    t_full = best_time(lambda: run(False), cfg.repeats)
    a = np.stack([np.asarray(Image.open(io.BytesIO(b)), np.float32) for b in run(True)])
    b = np.stack([np.asarray(Image.open(io.BytesIO(b)), np.float32) for b in run(False)])
    return {
        "images": cfg.raw_n,
        "source": f"{cfg.raw_width}x{cfg.raw_height}",
        "mean_file_kb": round(sum(map(len, raw)) / len(raw) / 1024, 1),
        "draft_ms_per_image": round(1000 * t_draft / cfg.raw_n, 1),
        "full_ms_per_image": round(1000 * t_full / cfg.raw_n, 1),
        "ratio_full_vs_draft": round(t_full / t_draft, 2),
        "mean_abs_pixel_diff": round(float(np.abs(a - b).mean()), 2),
    }


def environment() -> dict:
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "tar": subprocess.run(
            ["tar", "--version"], capture_output=True, text=True
        ).stdout.splitlines()[0],
    }


def report(result: dict) -> Table:
    p, d = result["pass_through"], result["draft"]
    table = Table(title="shard builder benchmark")
    for col in ("measure", "contender", "baseline", "ratio", "goal"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    table.add_row(
        f"pass-through packing, {p['images']} x {p['megabytes'] / p['images'] * 1000:.0f} KB",
        f"{p['pack_mb_s']} MB/s pack",
        f"{p['tar_mb_s']} MB/s tar cf",
        f"{p['ratio_pack_vs_tar']:.2f}x",
        _goal(p["ratio_pack_vs_tar"], PASS_GOAL),
    )
    table.add_row(
        "  same, baseline fsyncs its tar",
        "",
        f"{p['tar_fsync_mb_s']} MB/s tar cf+fsync",
        f"{p['ratio_pack_vs_tar_fsync']:.2f}x",
        _goal(p["ratio_pack_vs_tar_fsync"], PASS_GOAL),
    )
    table.add_row(
        f"{d['source']} -> 512 preprocessing, {d['images']} photos",
        f"{d['draft_ms_per_image']} ms draft",
        f"{d['full_ms_per_image']} ms full decode",
        f"{d['ratio_full_vs_draft']:.2f}x",
        _goal(d["ratio_full_vs_draft"], DRAFT_GOAL),
    )
    return table


def _goal(value: float, goal: float) -> str:
    return f"[green]>= {goal}x ok[/]" if value >= goal else f"[red]>= {goal}x missed[/]"


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(
        BenchConfig, argv, prog="bench_shards.py", description=__doc__.splitlines()[0]
    )
    console = cli_console()
    console.print(f"[bold]bench_shards[/] {asdict(cfg)}")
    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        work = Path(cfg.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
        }
        result["environment"] = environment()
        result["pass_through"] = bench_pass_through(cfg, work, console)
        result["draft"] = bench_draft(cfg, work)
    console.print(report(result))
    if cfg.out:
        cfg.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cfg.out / "bench_shards.json", result)
        console.print(f"wrote {cfg.out / 'bench_shards.json'}")
    return 0


def cli() -> None:
    """The ``dr-bench-shards`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
