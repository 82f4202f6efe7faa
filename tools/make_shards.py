"""Pack fundus photographs and their grades into WebDataset shards for DALI and torch.

    python tools/make_shards.py data/ shards/ --image-size 512 --shard-size 1000 --workers 8
    python tools/make_shards.py --verify shards/        # check a shard folder byte by byte
    python tools/make_shards.py data/ s3://bucket/dr/shards    # pack here, upload, manifest last

DATA_DIR holds a dataset as it came, recognised by its own files (``--layout`` forces one):
lab, eyepacs (alias kaggle; with retinopathy_solution.csv + test/ the published protocol),
aptos, messidor2, idrid, ddr, or any folder of images with ``--labels FILE`` (csv, tsv or
whitespace; see docs/datasets.md). ``--split-as test`` packs a whole folder as one test
split (an external validation set). OUT_DIR receives ``train-000000.tar`` ...
and ``test-000000.tar`` ... with a DALI ``.idx`` beside each, ``rejects.csv`` (every input
not packed and why), ``samples.csv`` (every packed sample's key, split, grade, patient and
original path) and ``manifest.json``, written last. Images already SIZE x SIZE baseline
JPEGs are packed as they are; the others are cropped to the eye, padded square, resized and
re-encoded (``--graham`` also applies Ben Graham's normalisation). A rerun into the same
OUT_DIR reuses the shards whose inputs did not change. Only one run at a time may write to
OUT_DIR (a second one stops at once, naming the first); ``--verify`` checks a finished
folder against its manifest and lists every problem (exit 1 if there is any).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import replace

from pipeline.cli import parse_config, run_cli
from pipeline.errors import UserError
from pipeline.fileio import folder_busy
from pipeline.remote import cache_folder, is_remote, local_shards, upload_shards
from pipeline.verify import summary, verify_shards
from pipeline.writing.packing import PackConfig, pack


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(
        PackConfig, argv, prog="make_shards.py", description=__doc__.split("\n\n")[0]
    )
    if cfg.verify:
        return verify(cfg)
    if is_remote(cfg.out_dir):
        return pack_and_upload(cfg)
    pack(cfg)
    return 0


def verify(cfg: PackConfig) -> int:
    """--verify: every problem of a finished folder (a URL's: of its verified local copy)."""
    folder = local_shards(cfg.data_dir, cfg.cache, cfg.quiet)
    if holder := folder_busy(folder, "make_shards"):
        raise UserError(f"{holder} is writing to {folder}; verify it when that run has finished")
    report = verify_shards(folder)
    print(summary(report), file=sys.stderr if report.problems else sys.stdout)
    return 1 if report.problems else 0


def pack_and_upload(cfg: PackConfig) -> int:
    """OUT_DIR is a bucket prefix: pack into a local staging folder (a rerun continues it
    there), then upload it, each shard checked and the manifest last."""
    url = cfg.out_dir
    staging = cache_folder(url, cfg.cache).with_name(cache_folder(url, cfg.cache).name + ".staging")
    pack(replace(cfg, out_dir=str(staging)))
    upload_shards(staging, url, cfg.quiet)
    return 0


def cli() -> None:
    """The ``dr-make-shards`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
