"""Rebuild the tiny shard fixture that ships with the package (``trainer/fixture/``).

    python tools/make_fixture.py                 # rewrites trainer/fixture/ in place
    python tools/make_fixture.py --out /tmp/fx   # anywhere else, e.g. to compare

40 synthetic photographs (tools/make_synthetic.py, kaggle layout, seed 0) at 64 px, packed
by the shard builder with its default options, so the fixture has whatever splits
make_shards writes today. ``trainer/smoke.py`` (``dr-train --smoke``) and ``dr-doctor``
train on it; ``tests/test_fixture.py`` checks that the committed copy is byte for byte what
this script writes.

What make_shards writes is reproducible except for three things this script normalises
in ``manifest.json``, and files it drops:

- ``created`` (the time of the build) becomes ``CREATED`` below;
- ``source.path`` (the absolute path of the temporary photo folder) becomes ``SOURCE``;
- ``config.data_dir`` and ``config.out_dir`` (the paths the builder was given) become
  ``SOURCE`` and ``.``;
- the hidden files the builder keeps for itself are not kept: ``.progress.json``, its rerun
  record (absolute paths and file times), and ``.lock``, its one-writer lock.

The JPEG bytes come from numpy's random streams and Pillow's drawing and encoder, so the
script records the two versions under ``fixture`` in the manifest; with other versions the
bytes may legitimately differ (the test then compares everything but the pixels).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import PIL
from rich.console import Console

from pipeline.cli import arg, parse_config, run_cli
from pipeline.errors import UserError
from pipeline.fileio import make_writable_dir
from pipeline.manifest import read_manifest
from pipeline.writing.packing import PackConfig, pack
from tools.make_synthetic import generate
from trainer.smoke import FIXTURE_IMAGES, FIXTURE_SIZE, fixture_dir

SEED = 0
SHARD_SIZE = 16  # more than one train shard, so a rank's slice crosses a shard boundary
CREATED = "2000-01-01T00:00:00+00:00"
SOURCE = "synthetic: tools/make_fixture.py"


def build_fixture(out: Path) -> list[str]:
    """Write the fixture into ``out`` (replacing a fixture there); the file names written."""
    out = Path(out)
    try:
        make_writable_dir(out)
    except OSError as err:
        raise UserError(f"cannot write to {out}: {err.strerror or err}") from None
    with tempfile.TemporaryDirectory(prefix="dr-fixture-") as tmp:
        photos, shards = Path(tmp) / "photos", Path(tmp) / "shards"
        generate(photos, n=FIXTURE_IMAGES, size=FIXTURE_SIZE, layout="kaggle", seed=SEED)
        # only what decides the bytes is given; every other option is make_shards' default
        pack(
            PackConfig(
                photos, shards, size=FIXTURE_SIZE, shard_size=SHARD_SIZE, workers=1, quiet=True
            ),
            console=Console(quiet=True),
        )
        normalise_manifest(shards)
        names = sorted(p.name for p in shards.iterdir() if not p.name.startswith("."))
        for old in out.iterdir():  # a split or shard that make_shards no longer writes goes
            if old.is_file() and old.name not in names:
                old.unlink()
        for name in names:
            shutil.copyfile(shards / name, out / name)
    return names


def normalise_manifest(shards: Path) -> None:
    """Replace the build's time and temporary paths (see the module docstring)."""
    manifest = read_manifest(shards)
    report = dict(manifest.report)
    report["config"] = {**report["config"], "data_dir": SOURCE, "out_dir": "."}
    report["fixture"] = {"numpy": np.__version__, "pillow": PIL.__version__}
    replace(
        manifest, created=CREATED, source={**manifest.source, "path": SOURCE}, report=report
    ).write()


@dataclass
class FixtureConfig:
    out: Path | None = arg(
        None, "folder to write (default: the package's own fixture folder)", metavar="DIR"
    )


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(
        FixtureConfig, argv, prog="make_fixture.py", description=__doc__.splitlines()[0]
    )
    out = Path(cfg.out) if cfg.out else fixture_dir(must_exist=False)
    names = build_fixture(out)
    size = sum((out / n).stat().st_size for n in names)
    print(f"wrote {len(names)} files ({size / 1024:.0f} KiB) to {out}")
    return 0


def cli() -> None:
    """The ``dr-make-fixture`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
