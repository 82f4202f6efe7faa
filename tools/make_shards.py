"""Pack fundus photographs and their grades into WebDataset shards for DALI and torch.

    python tools/make_shards.py data/ shards/ --size 512 --shard-size 1000 --workers 8

DATA_DIR holds one of three layouts: lab (train_img.csv, train_label.csv, test_img.csv,
test_label.csv), kaggle (trainLabels.csv + train/), or any folder of images with
``--labels FILE.csv`` (``image,level[,split]``). OUT_DIR receives ``train-000000.tar`` ...
and ``test-000000.tar`` ... with a DALI ``.idx`` beside each, ``rejects.csv`` (every input
not packed and why) and ``manifest.json``, written last. Images already SIZE x SIZE baseline
JPEGs are packed as they are; the others are cropped to the eye, padded square, resized and
re-encoded (``--graham`` also applies Ben Graham's normalisation). A rerun into the same
OUT_DIR reuses the shards whose inputs did not change.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.cli import parse_config, run_cli
from pipeline.writing.packing import PackConfig, pack


def main(argv: Sequence[str] | None = None) -> int:
    pack(
        parse_config(PackConfig, argv, prog="make_shards.py", description=__doc__.split("\n\n")[0])
    )
    return 0


def cli() -> None:
    """The ``dr-make-shards`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
