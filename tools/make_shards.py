"""Pack fundus photographs and their grades into WebDataset shards for DALI and torch.

    python tools/make_shards.py data/ shards/ --size 512 --shard-size 1000 --workers 8

DATA_DIR holds one of the layouts of DESIGN.md section 1: lab (train_img.csv,
train_label.csv, test_img.csv, test_label.csv), kaggle (trainLabels.csv + train/), or any
folder of images with ``--labels FILE.csv`` (``image,level[,split]``). OUT_DIR receives
``train-000000.tar`` ... and ``test-000000.tar`` ... with a DALI ``.idx`` beside each,
``rejects.csv`` (every input not packed and why) and ``manifest.json``, written last.
Images already SIZE x SIZE baseline JPEGs are packed as they are; the others are cropped
to the eye, padded square, resized and re-encoded (``--graham`` also applies Ben Graham's
normalisation). A rerun into the same OUT_DIR reuses the shards whose inputs did not change.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from pipeline.constants import DEFAULT_IMAGE_SIZE, DEFAULT_SHARD_SIZE
from pipeline.errors import UserError, run_cli
from pipeline.packing import PackConfig, pack


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2 through run_cli, not a usage dump
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", type=Path, help="folder with the images and label files")
    p.add_argument("out_dir", type=Path, help="shard folder to write (created)")
    p.add_argument("--size", type=int, default=DEFAULT_IMAGE_SIZE, help="side of the square images in px")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: every core)")
    p.add_argument("--seed", type=int, default=0, help="seeds the train order and the kaggle split")
    p.add_argument("--test-fraction", type=float, default=0.2, help="test share for kaggle/--labels without split")
    p.add_argument("--graham", action="store_true", help="Ben Graham normalisation (local average subtracted)")
    p.add_argument("--strict", action="store_true", help="fail (exit 2) if any input is rejected")
    p.add_argument("--labels", type=Path, default=None, help="CSV image,level[,split] for any other layout")
    p.add_argument("--quiet", action="store_true", help="no progress bar (for logs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = PackConfig(**{f.name: getattr(args, f.name) for f in fields(PackConfig)})
    pack(cfg)
    return 0


if __name__ == "__main__":
    run_cli(main)
