"""The shard format on disk: writing one shard, reading and verifying the manifest.

A shard folder holds ``train-000000.tar`` ... and ``test-000000.tar`` ... (GNU tar,
WebDataset samples ``<key>.jpg`` + ``<key>.cls``), a DALI index ``.idx`` beside each
tar (the ``wds2idx`` format), ``manifest.json`` and ``rejects.csv``.

``manifest.json`` (format version 1)::

    {
      "format_version": 1,
      "created": "2026-11-28T00:00:00+00:00",
      "source": {"layout": "kaggle", "path": "/abs/data"},
      "preprocess": {"size": 512, "graham": false, ...},
      "image_size": 512,
      "seed": 0,
      "splits": {
        "train": {"samples": 28099, "class_counts": [..5 ints..],
                  "shards": [{"file": "train-000000.tar", "index": "train-000000.idx",
                              "samples": 1000, "bytes": 123456, "sha256": "..."}, ...]},
        "test": {...}
      },
      "rejected": 3
    }

Readers trust the manifest for counts and check it against the files (by size at
start, by sha256 when asked).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.constants import (
    IMAGE_EXT,
    INDEX_SUFFIX,
    LABEL_EXT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    NUM_CLASSES,
    SPLITS,
)
from pipeline.errors import UserError
from pipeline.fileio import atomic_write_json, partial_path

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tar writes whole records of 20 blocks
INDEX_VERSION = "v1.2"
MAX_KEY_BYTES = 90  # + ".jpg" stays inside the 100-byte name field of a tar header


@dataclass(frozen=True)
class ShardInfo:
    file: str
    index: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    samples: int
    class_counts: tuple[int, ...]
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Manifest:
    root: Path
    image_size: int
    splits: dict[str, SplitInfo]
    raw: dict = field(repr=False, compare=False)

    def split(self, name: str) -> SplitInfo:
        """The split's entry, or a clear error if the manifest has none or it is empty."""
        info = self.splits.get(name)
        if info is None or info.samples == 0:
            raise UserError(f"split '{name}' is empty or missing in {self.root / MANIFEST_NAME}")
        return info

    def tar_paths(self, name: str) -> list[Path]:
        return [self.root / s.file for s in self.split(name).shards]

    def index_paths(self, name: str) -> list[Path]:
        return [self.root / s.index for s in self.split(name).shards]


# ---------------------------------------------------------------- writing


def _padded(size: int) -> int:
    return (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK


def _check_key(key: str) -> None:
    # WebDataset splits a member name at the first dot of its base name.
    if not key or "." in key or "/" in key or key.startswith("_"):
        raise ValueError(f"shard key {key!r} must be non-empty, without '.', '/' or a leading '_'")
    if len(key.encode()) > MAX_KEY_BYTES:
        # Longer member names need GNU long-name headers, which wds2idx indexes wrongly.
        raise ValueError(f"shard key {key[:20]!r}... is longer than {MAX_KEY_BYTES} bytes")


# The fields of a GNU header that are the same for every member (see _gnu_header).
_MODE_OWNER = b"0000644\x000000000\x000000000\x00"  # mode, uid, gid: bytes 100-124
_MTIME = b"00000000000\x00"  # bytes 136-148
_TYPE_TO_END = b"0" + bytes(100) + b"ustar  \x00" + bytes(TAR_BLOCK - 265)  # type, link name, GNU magic, rest
_FIXED_SUM = sum(_MODE_OWNER) + sum(_MTIME) + sum(b" " * 8) + sum(_TYPE_TO_END)  # the checksum counts as spaces


def _gnu_header(name: bytes, size: int) -> bytes:
    """A GNU tar header for a regular file, byte for byte what ``tarfile`` writes with
    ``GNU_FORMAT``, mode 0644, owner 0/0 and mtime 0 (so the same inputs give the same bytes)."""
    size_field = b"%011o\x00" % size
    checksum = _FIXED_SUM + sum(name) + sum(size_field)
    return b"".join(
        (name, bytes(100 - len(name)), _MODE_OWNER, size_field, _MTIME, b"%06o\x00 " % checksum, _TYPE_TO_END)
    )


def write_shard(
    tar_path: Path, samples: Iterable[tuple[str, bytes, int]], fsync: bool = True
) -> ShardInfo:
    """Write ``(key, jpeg_bytes, label)`` samples to a GNU tar with its DALI index beside it.

    Both files appear under their final names only when complete (temp name, rename; the
    tar last), so an interrupted run never leaves a shard that looks whole. ``fsync=False``
    leaves flushing to the caller (``fsync_files``), much cheaper done once for many
    shards than once per shard; the tar's writeback is started before returning.
    """
    tar_path = Path(tar_path)
    idx_path = tar_path.with_suffix(INDEX_SUFFIX)
    tmp_tar, tmp_idx = partial_path(tar_path), partial_path(idx_path)
    lines: list[str] = []
    digest = hashlib.sha256()
    offset = 0
    try:
        with open(tmp_tar, "wb") as f:
            for key, data, label in samples:
                _check_key(key)
                parts, pieces = [], []
                for ext, payload in ((IMAGE_EXT, data), (LABEL_EXT, b"%d" % int(label))):
                    name = f"{key}.{ext}"
                    size = len(payload)
                    pieces += (_gnu_header(name.encode(), size), payload, bytes(_padded(size) - size))
                    parts.append(f"{ext} {offset + TAR_BLOCK} {size} {name}")
                    offset += TAR_BLOCK + _padded(size)
                block = b"".join(pieces)  # one write and one hash update per sample
                digest.update(block)
                f.write(block)
                lines.append(" ".join(parts))
            if not lines:
                raise ValueError(f"refusing to write an empty shard {tar_path.name}")
            # two zero blocks end the archive, padded to a whole record as tar does
            end = bytes(_padded_record(offset + 2 * TAR_BLOCK) - offset)
            digest.update(end)
            f.write(end)
            offset += len(end)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
            elif hasattr(os, "posix_fadvise"):
                # Start writing back now, without waiting: the caller's fsync later finds
                # little left (PostgreSQL's pg_flush_data does the same where it has no
                # sync_file_range). Only pages already clean are dropped from the cache.
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with open(tmp_idx, "w") as f:
            f.write(f"{INDEX_VERSION} {len(lines)}\n" + "\n".join(lines) + "\n")
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp_idx, idx_path)
        os.replace(tmp_tar, tar_path)
    finally:
        for tmp in (tmp_tar, tmp_idx):
            tmp.unlink(missing_ok=True)
    return ShardInfo(
        file=tar_path.name, index=idx_path.name, samples=len(lines), bytes=offset, sha256=digest.hexdigest()
    )


def _padded_record(size: int) -> int:
    return (size + TAR_RECORD - 1) // TAR_RECORD * TAR_RECORD


def fsync_files(paths: Iterable[Path]) -> None:
    """Flush written files to disk (after the first, the rest cost little)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_manifest(root: Path, manifest: dict) -> Path:
    """Write ``manifest.json`` atomically."""
    return atomic_write_json(Path(root) / MANIFEST_NAME, manifest)


def split_entry(shards: list[ShardInfo], class_counts: list[int]) -> dict:
    """The manifest's entry for one split."""
    return {
        "samples": sum(s.samples for s in shards),
        "class_counts": list(class_counts),
        "shards": [asdict(s) for s in shards],
    }


# ---------------------------------------------------------------- reading


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
                f"{path} has format version {version}, this code reads {MANIFEST_VERSION}; "
                "rebuild the shards"
            )
        splits = {}
        for name, entry in raw["splits"].items():
            shards = tuple(ShardInfo(**s) for s in entry["shards"])
            counts = tuple(int(c) for c in entry["class_counts"])
            if len(counts) != NUM_CLASSES:
                raise ValueError(f"class_counts of {name} has {len(counts)} entries")
            if sum(s.samples for s in shards) != entry["samples"] or sum(counts) != entry["samples"]:
                raise ValueError(f"sample counts of split {name} do not add up")
            splits[name] = SplitInfo(int(entry["samples"]), counts, shards)
        return Manifest(root=root, image_size=int(raw["image_size"]), splits=splits, raw=raw)
    except UserError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a valid shard manifest ({err})") from None


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_split(manifest: Manifest, split: str, full: bool = False) -> None:
    """Check that every shard of ``split`` and its index exist with the manifest's size.

    ``full`` also compares sha256 (reads every byte). Raises UserError naming the shard.
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
        if full and file_sha256(tar) != shard.sha256:
            raise UserError(f"shard {tar} does not match the sha256 in the manifest; rebuild the shards")


def splits_present(manifest: Manifest) -> list[str]:
    return [s for s in SPLITS if s in manifest.splits and manifest.splits[s].samples > 0]
