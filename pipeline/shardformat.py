"""The shard format on disk: one GNU tar of WebDataset samples and its DALI index.

A shard ``train-000000.tar`` holds samples ``<key>.jpg`` (JPEG bytes) + ``<key>.cls`` (the
grade as ASCII decimal), GNU tar headers (PAX headers have broken DALI's reader). Beside
it, ``train-000000.idx`` is the index ``wds2idx`` would write: ``v1.2 N``, then one line per
sample, ``ext offset size name`` for each member (offset of the data, not the header).

Both halves of ``pipeline`` use this module: the shard builder writes with ``write_shard``,
the loaders read with ``read_index``. The manifest that lists the shards is
``pipeline.manifest``.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.constants import IMAGE_EXT, INDEX_SUFFIX, LABEL_EXT
from pipeline.errors import UserError
from pipeline.fileio import partial_path, reporting_disk_full


@dataclass(frozen=True)
class ShardInfo:
    """One written shard, as the manifest lists it."""

    file: str
    index: str
    samples: int
    bytes: int
    sha256: str


_EYE_SUFFIX = re.compile(r"_(left|right)$", re.IGNORECASE)
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tar writes whole records of 20 blocks
INDEX_VERSION = "v1.2"
MAX_KEY_BYTES = 90  # + ".jpg" stays inside the 100-byte name field of a tar header


# ---------------------------------------------------------------- writing


def _padded(size: int) -> int:
    return (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK


def patient_of(key: str) -> str:
    """``10_left`` and ``10_right`` are patient ``10``; other ids are their own patient."""
    match = _EYE_SUFFIX.search(key)
    return key[: match.start()] if match else key


def eye_of(key: str) -> str:
    """``left`` or ``right`` from an EyePACS id (any case), ``""`` for other ids."""
    match = _EYE_SUFFIX.search(key)
    return match.group(1).lower() if match else ""


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a sample key, or None: the one rule for the builder and the writer."""
    if not key:
        return "empty id"
    # WebDataset splits a member name at the first dot of its base name; the index splits
    # its lines at whitespace.
    if any(c in key for c in "./\\") or key.startswith("_") or not key.isprintable():
        return "id not usable as a shard key (contains '.', '/' or '\\', or starts with '_')"
    if any(c.isspace() for c in key):
        return "id not usable as a shard key (contains a space)"
    if len(key.encode()) > MAX_KEY_BYTES:
        # Longer member names need GNU long-name headers, which wds2idx indexes wrongly.
        return f"id longer than {MAX_KEY_BYTES} bytes"
    return None


def member_problem(name: str) -> str | None:
    """Why ``name`` cannot be a member of a shard (``<key>.jpg`` or ``<key>.cls`` with a key
    ``key_problem`` accepts), or None. Readers check every name they read from a shard with
    it: a name such as ``../../x.jpg`` would otherwise become a path outside the folder."""
    key, dot, ext = name.rpartition(".")
    if not dot or ext not in (IMAGE_EXT, LABEL_EXT):
        return f"member {name[:40]!r} is not <key>.{IMAGE_EXT} or <key>.{LABEL_EXT}"
    if problem := key_problem(key):
        return f"member {name[:40]!r}: {problem}"
    return None


def file_problem(name: str, suffix: str) -> str | None:
    """Why ``name``, a shard or index file named in a manifest, is not a plain file name
    ending in ``suffix`` inside the shard folder, or None."""
    if not name.endswith(suffix) or key_problem(name[: -len(suffix)]) or name.startswith("."):
        return f"{name[:60]!r} is not a {suffix} file name of the shard folder"
    return None


_NOT_KEY = re.compile(r"[^A-Za-z0-9_-]+")
KEY_ROOM = 80  # a derived key leaves room for a "-2" or a folder prefix


def make_key(name: str) -> str:
    """A valid shard key from a file's stem or an image id, as close to it as the rules allow.

    ASCII letters, digits, ``-`` and ``_`` are kept; accented letters lose their accent
    (``é`` -> ``e``); any other run of characters (spaces, dots, other scripts) becomes one
    ``-``. A name longer than ``KEY_ROOM`` is cut and ends in a hash of the whole, so long
    names stay distinct. ``10_left`` stays ``10_left``; ``Patient 0 OD.v2`` becomes
    ``Patient-0-OD-v2``. Equal results are told apart by ``unique_keys``.
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    key = _NOT_KEY.sub("-", ascii_name).strip("-_") or "img"
    if len(key) > KEY_ROOM:
        key = f"{key[: KEY_ROOM - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return key


def unique_keys(wanted: list[str], folders: list[str]) -> list[str]:
    """Make ``wanted`` keys unique: equal keys of files in different folders get their folder
    as a prefix (``a-Training-Set-IDRiD_001``), any still equal a ``-2``, ``-3`` suffix, in
    the given order. Keys that were unique are kept as they are."""
    places: dict[str, set[str]] = {}
    for key, folder in zip(wanted, folders, strict=True):
        places.setdefault(key, set()).add(folder)
    keys = [
        make_key(f"{folder}-{key}") if len(places[key]) > 1 and folder else key
        for key, folder in zip(wanted, folders, strict=True)
    ]
    seen: dict[str, int] = {}
    taken = set(keys)
    out = []
    for key in keys:
        if key in seen:
            n = seen[key] + 1
            while f"{key}-{n}" in taken:
                n += 1
            seen[key] = n
            taken.add(f"{key}-{n}")
            key = f"{key}-{n}"
        else:
            seen[key] = 1
        out.append(key)
    return out


# The fields of a GNU header that are the same for every member (see _gnu_header).
_MODE_OWNER = b"0000644\x000000000\x000000000\x00"  # mode, uid, gid: bytes 100-124
_MTIME = b"00000000000\x00"  # bytes 136-148
_TYPE_TO_END = (
    b"0" + bytes(100) + b"ustar  \x00" + bytes(TAR_BLOCK - 265)
)  # type, link name, GNU magic, rest
_FIXED_SUM = (
    sum(_MODE_OWNER) + sum(_MTIME) + sum(b" " * 8) + sum(_TYPE_TO_END)
)  # the checksum counts as spaces


def _gnu_header(name: bytes, size: int) -> bytes:
    """A GNU tar header for a regular file, byte for byte what ``tarfile`` writes with
    ``GNU_FORMAT``, mode 0644, owner 0/0 and mtime 0 (so the same inputs give the same bytes)."""
    size_field = b"%011o\x00" % size
    checksum = _FIXED_SUM + sum(name) + sum(size_field)
    return b"".join(
        (
            name,
            bytes(100 - len(name)),
            _MODE_OWNER,
            size_field,
            _MTIME,
            b"%06o\x00 " % checksum,
            _TYPE_TO_END,
        )
    )


def write_shard(
    tar_path: Path, samples: Iterable[tuple[str, bytes, int]], fsync: bool = True
) -> ShardInfo:
    """Write ``(key, jpeg_bytes, label)`` samples to a GNU tar with its DALI index beside it.

    Both files appear under their final names only when complete (temp name, rename; the
    tar last), so an interrupted run never leaves a shard that looks whole. ``fsync=False``
    leaves flushing to the caller (``fsync_files``), much cheaper done once for many
    shards than once per shard; the tar's writeback is started before returning. A full
    disk is a UserError naming the shard.
    """
    with reporting_disk_full(tar_path):
        return _write_shard(Path(tar_path), samples, fsync)


def _write_shard(
    tar_path: Path, samples: Iterable[tuple[str, bytes, int]], fsync: bool
) -> ShardInfo:
    idx_path = tar_path.with_suffix(INDEX_SUFFIX)
    tmp_tar, tmp_idx = partial_path(tar_path), partial_path(idx_path)
    lines: list[str] = []
    digest = hashlib.sha256()
    offset = 0
    try:
        with open(tmp_tar, "wb") as f:
            for key, data, label in samples:
                if problem := key_problem(key):
                    raise ValueError(f"shard key {key[:20]!r}: {problem}")
                parts, pieces = [], []
                for ext, payload in ((IMAGE_EXT, data), (LABEL_EXT, b"%d" % int(label))):
                    name = f"{key}.{ext}"
                    size = len(payload)
                    pieces += (
                        _gnu_header(name.encode(), size),
                        payload,
                        bytes(_padded(size) - size),
                    )
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
        # an earlier run's tar goes first: a worker killed between the two renames must not
        # leave a new index beside an old tar (no tar at all is a shard a rerun writes again)
        tar_path.unlink(missing_ok=True)
        os.replace(tmp_idx, idx_path)
        os.replace(tmp_tar, tar_path)
    finally:
        for tmp in (tmp_tar, tmp_idx):
            tmp.unlink(missing_ok=True)
    return ShardInfo(
        file=tar_path.name,
        index=idx_path.name,
        samples=len(lines),
        bytes=offset,
        sha256=digest.hexdigest(),
    )


def _padded_record(size: int) -> int:
    return (size + TAR_RECORD - 1) // TAR_RECORD * TAR_RECORD


def fsync_files(paths: Iterable[Path]) -> None:
    """Flush written files to disk (after the first, the rest cost little)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            with reporting_disk_full(path):
                os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lives: the shard, its key and the byte ranges of its two members."""

    shard: str
    key: str
    jpg: tuple[int, int]  # (offset, size) of the JPEG bytes
    cls: tuple[int, int]  # (offset, size) of the ASCII grade


def read_index(path: Path, shard: str) -> list[SampleRef]:
    """Parse a shard's ``.idx``; a UserError naming the file if it is not one."""
    try:
        lines = Path(path).read_text().split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read index {path} ({err}); rebuild the shards") from None
    refs = []
    for line in lines[1:]:
        parts = line.split()
        if not parts:
            continue
        members = {}
        try:
            for i in range(0, len(parts) - 3, 4):
                ext, offset, size, name = parts[i : i + 4]
                members[ext] = (int(offset), int(size), name)
        except ValueError:
            raise UserError(f"index {path} has a malformed line; rebuild the shards") from None
        if IMAGE_EXT not in members or LABEL_EXT not in members:
            raise UserError(
                f"index {path} has a sample without .{IMAGE_EXT} and .{LABEL_EXT}; rebuild the shards"
            )
        for ext, (_, _, member) in members.items():
            if (
                ext not in (IMAGE_EXT, LABEL_EXT)
                or member_problem(member)
                or (member.rpartition(".")[2] != ext)
            ):
                problem = member_problem(member) or f"member {member[:40]!r} listed as .{ext}"
                raise UserError(f"index {path} of shard {shard}: {problem}; rebuild the shards")
        name = members[IMAGE_EXT][2]
        key = name[: -len(IMAGE_EXT) - 1]
        if members[LABEL_EXT][2] != f"{key}.{LABEL_EXT}":
            raise UserError(
                f"index {path} of shard {shard} pairs {name[:40]!r} with "
                f"{members[LABEL_EXT][2][:40]!r}; rebuild the shards"
            )
        refs.append(SampleRef(shard, key, members[IMAGE_EXT][:2], members[LABEL_EXT][:2]))
    return refs
