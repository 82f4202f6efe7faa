"""``manifest.json``: what a shard folder holds. The builder writes it last; readers trust it
for counts and check it against the files.

    {
      "format_version": 1,
      "created": "2026-11-28T00:00:00+00:00",
      "source": {"layout": "kaggle", "path": "/abs/data", "labels": null},
      "preprocess": {"size": 512, "graham": false, ...},
      "image_size": 512,
      "seed": 0,
      "splits": {
        "train": {"samples": 28099, "class_counts": [..5 ints..],
                  "shards": [{"file": "train-000000.tar", "index": "train-000000.idx",
                              "samples": 1000, "bytes": 123456, "sha256": "..."}, ...]},
        "test": {...}
      },
      "channel_stats": {"split": "train", "images": 28099,    # absent in folders packed
                        "mean": [r, g, b], "std": [r, g, b]},  # before it was measured
      ...                      # the builder's report: rejected, rejected_by_reason, config
    }

``Manifest`` is the one typed form of it: the builder, the benchmarks and the tests build one
and ``write()`` it; every reader gets one from ``read_manifest``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline.constants import INDEX_SUFFIX, MANIFEST_NAME, MANIFEST_VERSION, NUM_CLASSES
from pipeline.errors import UserError
from pipeline.fileio import atomic_write_json, file_sha256
from pipeline.shardformat import ShardInfo, file_problem, read_index


@dataclass(frozen=True)
class SplitInfo:
    samples: int
    class_counts: tuple[int, ...]
    shards: tuple[ShardInfo, ...]

    @classmethod
    def of(cls, shards, class_counts) -> SplitInfo:
        """The entry for ``shards`` (ShardInfo) holding ``class_counts`` samples per grade."""
        shards = tuple(shards)
        return cls(sum(s.samples for s in shards), tuple(int(c) for c in class_counts), shards)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Manifest:
    root: Path
    image_size: int
    splits: dict[str, SplitInfo]
    preprocess: dict = field(
        default_factory=dict
    )  # how the images were prepared (predict repeats it)
    source: dict = field(default_factory=dict)
    seed: int = 0
    created: str = field(default_factory=_now)
    report: dict = field(default_factory=dict)  # the builder's: rejects by reason, its config, ...
    # the train split's per-channel pixel mean and std (0-255), None when not measured
    channel_stats: dict | None = None

    def split(self, name: str) -> SplitInfo:
        """The split's entry, or a clear error if the manifest has none or it is empty."""
        info = self.splits.get(name)
        if info is None or info.samples == 0:
            raise UserError(f"split '{name}' is empty or missing in {self.root / MANIFEST_NAME}")
        return info

    def has(self, name: str) -> bool:
        """Whether the folder holds samples of split ``name``."""
        return name in self.splits and self.splits[name].samples > 0

    def tar_paths(self, name: str) -> list[Path]:
        return [self.root / s.file for s in self.split(name).shards]

    def index_paths(self, name: str) -> list[Path]:
        return [self.root / s.index for s in self.split(name).shards]

    def to_json(self) -> dict:
        return {
            "format_version": MANIFEST_VERSION,
            "created": self.created,
            "source": self.source,
            "preprocess": self.preprocess,
            "image_size": self.image_size,
            "seed": self.seed,
            "splits": {
                name: {
                    "samples": s.samples,
                    "class_counts": list(s.class_counts),
                    "shards": [asdict(shard) for shard in s.shards],
                }
                for name, s in self.splits.items()
            },
            **({"channel_stats": self.channel_stats} if self.channel_stats else {}),
            **self.report,
        }

    def write(self) -> Path:
        """Write ``ROOT/manifest.json`` atomically."""
        return atomic_write_json(self.root / MANIFEST_NAME, self.to_json())


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Parse ``ROOT/manifest.json``; any problem is one clear UserError."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise UserError(f"shard folder {root} does not exist; build it with tools/make_shards.py")
    if not path.is_file():
        raise UserError(f"{path} not found; is {root} a folder written by tools/make_shards.py?")
    try:
        raw = json.loads(path.read_text())
        version = raw["format_version"]
        if version != MANIFEST_VERSION:
            raise UserError(
                f"{path} has format version {version}, this code reads {MANIFEST_VERSION}; rebuild the shards"
            )
        splits = {}
        for name, entry in raw["splits"].items():
            info = SplitInfo.of((ShardInfo(**s) for s in entry["shards"]), entry["class_counts"])
            for shard in info.shards:
                if problem := file_problem(shard.file, ".tar") or file_problem(
                    shard.index, INDEX_SUFFIX
                ):
                    raise ValueError(f"split {name} lists {problem}")
            if len(info.class_counts) != NUM_CLASSES:
                raise ValueError(f"class_counts of {name} has {len(info.class_counts)} entries")
            if info.samples != entry["samples"] or sum(info.class_counts) != entry["samples"]:
                raise ValueError(f"sample counts of split {name} do not add up")
            splits[name] = info
        known = {
            "format_version",
            "created",
            "source",
            "preprocess",
            "image_size",
            "seed",
            "splits",
            "channel_stats",
        }
        return Manifest(
            root=root,
            image_size=int(raw["image_size"]),
            splits=splits,
            preprocess=dict(raw.get("preprocess") or {}),
            source=dict(raw.get("source") or {}),
            seed=int(raw.get("seed", 0)),
            created=str(raw.get("created", "")),
            report={k: v for k, v in raw.items() if k not in known},
            channel_stats=_channel_stats(raw.get("channel_stats")),
        )
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{path} is not a valid shard manifest ({err})") from None


def _channel_stats(entry) -> dict | None:
    """The manifest's ``channel_stats``, checked (three means, three stds), or None when absent."""
    if entry is None:
        return None
    mean, std = [float(v) for v in entry["mean"]], [float(v) for v in entry["std"]]
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("channel_stats needs three means and three stds")
    return {**entry, "mean": mean, "std": std}


def dataset_normalization(manifest: Manifest) -> tuple[list[float], list[float]]:
    """(mean, std) of the train split's pixels, for ``--normalize dataset``."""
    if not manifest.channel_stats:
        raise UserError(
            f"{manifest.root / MANIFEST_NAME} has no channel statistics (packed before "
            "make_shards measured them); repack it with tools/make_shards.py to use "
            "--normalize dataset"
        )
    mean, std = manifest.channel_stats["mean"], manifest.channel_stats["std"]
    if min(std) <= 0:
        raise UserError(
            f"the train split of {manifest.root} has a channel without variation (std {std}); "
            "--normalize dataset cannot divide by it, use --normalize imagenet"
        )
    return mean, std


def verify_split(manifest: Manifest, split: str, full: bool = False) -> None:
    """Check every shard of ``split`` against the manifest; a UserError naming the first bad one.

    Cheap, done by every loader at start: each tar and index exists, the tar has the
    manifest's size, the index lists the manifest's number of samples and ends inside the
    tar. ``full`` also compares the sha256 (reads every byte).
    """
    for shard in manifest.split(split).shards:
        tar = manifest.root / shard.file
        idx = manifest.root / shard.index
        if not tar.is_file():
            raise UserError(f"shard {tar} listed in the manifest is missing")
        if not idx.is_file():
            raise UserError(f"index {idx} for shard {tar.name} is missing")
        size = tar.stat().st_size
        if size != shard.bytes:
            raise UserError(
                f"shard {tar} is {size} bytes but the manifest says {shard.bytes}; "
                "it was truncated or replaced, rebuild the shards"
            )
        refs = read_index(idx, shard.file)
        if len(refs) != shard.samples:
            raise UserError(
                f"index {idx} lists {len(refs)} samples but the manifest says {shard.samples} "
                f"for {tar.name}; the manifest or the index was edited, rebuild the shards"
            )
        end = max((max(sum(r.jpg), sum(r.cls)) for r in refs), default=0)
        if end > size:
            raise UserError(f"index {idx} points past the end of {tar.name}; rebuild the shards")
        if full and file_sha256(tar) != shard.sha256:
            raise UserError(
                f"shard {tar} does not match the sha256 in the manifest; rebuild the shards"
            )
