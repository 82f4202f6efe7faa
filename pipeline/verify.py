"""Full verification of a shard folder: everything the manifest promises, checked byte by byte.

``verify_shards(root)`` returns every problem it finds, one sentence each (an empty list
when the folder is sound): the sha256 of every shard against the manifest, each index
against the tar's own headers, sample counts per shard and class counts per split, keys
unique across splits, no patient in two splits, every grade one digit 0-4. It reads every
byte, so it costs about as much as reading the shards once; the loaders' cheap check at
start (``pipeline.manifest.verify_split``) covers sizes and index counts only.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.constants import IMAGE_EXT, LABEL_EXT, NUM_CLASSES
from pipeline.errors import UserError
from pipeline.fileio import file_sha256
from pipeline.manifest import Manifest, read_manifest
from pipeline.samplelist import SAMPLES_NAME, read_sample_table
from pipeline.shardformat import SampleRef, ShardInfo, member_problem, patient_of, read_index

MAX_LISTED = 50  # problems listed in full; the rest are counted


@dataclass
class Report:
    manifest: Manifest
    problems: list[str]
    samples: int
    shards: int


def verify_shards(root: str | Path) -> Report:
    """Check the shard folder ``root``; UserError only if its manifest cannot be read at all."""
    manifest = read_manifest(root)  # refuses shard file names that are not plain names
    table = read_sample_table(manifest.root)  # patients and original paths, when written
    problems: list[str] = []
    owner: dict[str, str] = {}  # key -> split
    patient_split: dict[str, str] = {}
    samples = shards = 0
    for split, info in manifest.splits.items():
        counts = [0] * NUM_CLASSES
        for shard in info.shards:
            shards += 1
            for ref, grade in _check_shard(manifest.root, shard, problems):
                samples += 1
                shown = _shown(ref.key, table)
                if ref.key in owner:
                    problems.append(
                        f"key {shown} is in {split} ({shard.file}) and also in {owner[ref.key]}"
                    )
                owner.setdefault(ref.key, split)
                record = table.get(ref.key) if table is not None else None
                if table is not None and (record is None or record.split != split):
                    where = "not listed" if record is None else f"listed in {record.split}"
                    problems.append(f"sample {shown} in {shard.file} is {where} in {SAMPLES_NAME}")
                patient = record.patient if record else patient_of(ref.key)
                if patient_split.setdefault(patient, split) != split:
                    problems.append(
                        f"patient {patient} has images in {patient_split[patient]} and in {split} ({shown})"
                    )
                if grade is not None:
                    counts[grade] += 1
        if counts != list(info.class_counts):
            problems.append(
                f"split {split} holds {counts} images per grade but the manifest says {list(info.class_counts)}"
            )
    return Report(manifest, problems, samples, shards)


def _shown(key: str, table) -> str:
    """``key`` with the file it came from, when the sample table says and it differs."""
    record = table.get(key) if table is not None else None
    if record is None or not record.path or Path(record.path).stem == key:
        return key
    return f"{key} ({record.path})"


def _check_shard(
    root: Path, shard: ShardInfo, problems: list[str]
) -> Iterator[tuple[SampleRef, int | None]]:
    """Problems of one shard go to ``problems``; yields its samples with their grades."""
    tar, idx = root / shard.file, root / shard.index
    if not tar.is_file():
        problems.append(f"shard {shard.file} is missing")
        return
    if tar.stat().st_size != shard.bytes:
        problems.append(
            f"shard {shard.file} is {tar.stat().st_size} bytes, the manifest says {shard.bytes}"
        )
    elif file_sha256(tar) != shard.sha256:
        problems.append(f"shard {shard.file} does not match its sha256 in the manifest")
    try:
        refs = read_index(idx, shard.file) if idx.is_file() else None
    except UserError as err:
        problems.append(str(err))
        refs = None
    if refs is None:
        problems.append(f"index {shard.index} of {shard.file} is missing or unreadable")
        return
    if len(refs) != shard.samples:
        problems.append(
            f"index {shard.index} lists {len(refs)} samples, the manifest says {shard.samples}"
        )
    members = _tar_members(tar, problems)
    if members is None:
        return
    for ref in refs:
        for ext, (offset, size) in ((IMAGE_EXT, ref.jpg), (LABEL_EXT, ref.cls)):
            if members.get(f"{ref.key}.{ext}") != (offset, size):
                problems.append(
                    f"index {shard.index} disagrees with {shard.file} about {ref.key}.{ext}"
                )
    if len(members) != 2 * len(refs):
        problems.append(
            f"{shard.file} has {len(members)} members, its index accounts for {2 * len(refs)}"
        )
    with open(tar, "rb") as f:
        for ref in refs:
            f.seek(ref.cls[0])
            text = f.read(ref.cls[1])
            grade = text[0] - ord("0") if len(text) == 1 and text[:1].isdigit() else None
            if grade is None or grade >= NUM_CLASSES:
                problems.append(
                    f"sample {ref.key} in {shard.file} has grade {text[:10]!r}, not one of 0-4"
                )
                grade = None
            yield ref, grade


def _tar_members(tar: Path, problems: list[str]) -> dict[str, tuple[int, int]] | None:
    """name -> (offset of the data, size), read from the tar's own headers."""
    try:
        with tarfile.open(tar, "r:") as t:
            members = t.getmembers()
    except (tarfile.TarError, OSError) as err:
        problems.append(f"shard {tar.name} is not a readable tar ({err})")
        return None
    for m in members:  # the writer's own rule: a name like ../../x.jpg is never a sample
        if problem := member_problem(m.name) or (None if m.isfile() else "not a regular file"):
            problems.append(f"shard {tar.name}: {problem} ({m.name[:40]!r})")
    return {m.name: (m.offset_data, m.size) for m in members if m.isfile()}


def summary(report: Report, limit: int = MAX_LISTED) -> str:
    """What ``make_shards --verify`` prints."""
    root = report.manifest.root
    if not report.problems:
        return (
            f"{root}: {report.samples} samples in {report.shards} shards verified "
            "(sha256, indexes, counts, unique keys, no patient in two splits, grades 0-4)"
        )
    lines = [f"{root}: {len(report.problems)} problem(s):"]
    lines += [f"  {p}" for p in report.problems[:limit]]
    if len(report.problems) > limit:
        lines.append(f"  ... and {len(report.problems) - limit} more")
    return "\n".join(lines)
