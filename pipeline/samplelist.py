"""``samples.csv`` beside the shards: every packed sample's key, split, grade, patient and
original path relative to the data folder.

    key,split,grade,patient,path
    10_left,train,0,10,train/10_left.jpeg
    Patient-0-OD,test,2,p0,clinic A/Patient 0 OD.tif

The builder writes it before the manifest (which records its sha256); ``--verify`` groups
patients by it (a ``patient`` column of the labels, not only ``10_left``/``10_right``) and
names the original file in its messages; anything that reports per image (predictions) can
show the file a key came from. A folder without it (built before it existed) falls back to
patients from the keys.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.fileio import atomic_write, safe_cell
from pipeline.shardformat import key_problem

SAMPLES_NAME = "samples.csv"
COLUMNS = ("key", "split", "grade", "patient", "path")


@dataclass(frozen=True)
class SampleRecord:
    key: str
    split: str
    grade: int
    patient: str
    path: str


def write_sample_table(path: Path, records: list[SampleRecord]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            # patient and path come from the user's files: formula-safe for a spreadsheet
            writer.writerows(
                (r.key, r.split, r.grade, safe_cell(r.patient), safe_cell(r.path)) for r in records
            )

    atomic_write(path, write)


def read_sample_table(root: Path) -> dict[str, SampleRecord] | None:
    """key -> record from ``root/samples.csv``; None when the folder has none."""
    path = Path(root) / SAMPLES_NAME
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if problem := key_problem(row.get("key") or ""):
            raise UserError(
                f"{path} lists key {str(row.get('key'))[:40]!r} ({problem}); rebuild the shards"
            )
    return {
        r["key"]: SampleRecord(r["key"], r["split"], int(r["grade"]), r["patient"], r["path"])
        for r in rows
    }
