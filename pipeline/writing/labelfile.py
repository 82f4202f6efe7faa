"""Label files as people write them: one reader for every table a layout or ``--labels`` gives.

``read_table(path)`` sniffs the separator (comma, tab, semicolon, else runs of whitespace),
finds the header if there is one, and returns the rows as :class:`TableRow` (the image as
written, the grade text, the split text, the patient, the file's line number). Columns are
found by the names the public datasets use (``COLUMN_NAMES``: ``image``, ``id_code``,
``Image name``, ``level``, ``diagnosis``, ``Retinopathy grade`` ...; case, spaces around and
``_``/space differences ignored) or named by the caller. A file without a header is read
as ``image grade [split [patient]]``. Rows whose cells are all empty (the trailing
``,,,,`` rows of spreadsheets) are skipped.

``parse_grade`` and ``parse_split`` are the one reading of a grade (``2`` and ``2.0`` are
grade 2) and of a split name (``valid``/``validation``/``dev`` are val).
"""

from __future__ import annotations

import codecs
import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.constants import IMAGE_EXTENSIONS, NUM_CLASSES
from pipeline.errors import UserError

# Column names by role, as the public datasets write them (compared after _norm).
COLUMN_NAMES = {
    "image": ("image", "id_code", "image_id", "image name", "filename", "file", "image_name"),
    "grade": (
        "level",
        "diagnosis",
        "grade",
        "retinopathy grade",
        "adjudicated_dr_grade",
        "dr_grade",
        "label",
    ),
    "split": ("split", "set", "subset", "partition"),
    "patient": ("patient", "patient_id", "patientid", "subject"),
}
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
_GRADE = re.compile(r"^[0-9]+(\.0*)?$")


@dataclass(frozen=True)
class TableRow:
    image: str
    grade: str
    split: str
    patient: str
    line: int
    cells: dict[str, str]  # every column by its stripped header name (empty without a header)


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", " ", name.strip().lower())


def parse_grade(text: str) -> int | None:
    """0-4 from ``"2"``, ``" 2 "`` or ``"2.0"`` (pandas' float for a column with blanks); else None."""
    text = text.strip()
    if _GRADE.match(text) and int(float(text)) < NUM_CLASSES:
        return int(float(text))
    return None


def parse_split(text: str) -> str | None:
    """``train``/``val``/``test`` from a split cell (any case; valid/validation/dev = val),
    ``""`` for an empty cell (the default assignment), None for anything else."""
    text = text.strip().lower()
    return "" if not text else SPLIT_NAMES.get(text)


def strip_image_ext(name: str) -> str:
    """``10_left.jpeg`` -> ``10_left``; a name without an image extension is kept whole."""
    stem, ext = os.path.splitext(name.strip())
    return stem if ext.lower() in IMAGE_EXTENSIONS else name.strip()


def _delimiter(lines: list[str]) -> str | None:
    """The separator of the first lines: ``,`` ``\\t`` ``;`` by frequency, else None (whitespace)."""
    sample = "\n".join(lines[:20])
    for sep in ("\t", ",", ";"):
        if sep in sample and all(sep in line for line in lines[:20] if line.strip()):
            return sep
    return None


def _split_lines(lines: list[str], sep: str | None) -> list[list[str]]:
    if sep is None:
        return [line.split() for line in lines]
    return list(csv.reader(lines, delimiter=sep, skipinitialspace=True))


def read_lines(path: Path) -> list[str]:
    """The file's lines, BOM dropped; a UserError naming the file if it cannot be read.

    Spreadsheets save label files as UTF-8 (with or without a BOM), UTF-16 ("Unicode
    text", with a BOM) or Latin-1/Windows-1252: all are read.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return decode_text(data).splitlines()
    except UnicodeDecodeError as err:
        raise UserError(
            f"cannot read {path}: it is not text in UTF-8, UTF-16 or Latin-1 ({err.reason} at "
            f"byte {err.start}); save it as CSV UTF-8 and pack again"
        ) from None


def decode_text(data: bytes) -> str:
    """Text from the bytes of a label file in any of the encodings ``read_lines`` names."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    if len(data) > 1 and data.count(0) * 3 >= len(data):  # UTF-16 without its BOM
        return data.decode("utf-16-le" if data[1] == 0 else "utf-16-be")
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")  # every byte is a character


def _column(header: list[str], role: str, named: str | None, path: Path) -> int | None:
    normed = [_norm(h) for h in header]
    if named is not None:
        if _norm(named) not in normed:
            raise UserError(
                f"{path} has no column {named!r} (its columns: {', '.join(h.strip() for h in header)})"
            )
        return normed.index(_norm(named))
    for name in map(_norm, COLUMN_NAMES[role]):
        if name in normed:
            return normed.index(name)
    return None


def read_table(
    path: Path,
    image_col: str | None = None,
    grade_col: str | None = None,
    split_col: str | None = None,
    patient_col: str | None = None,
) -> list[TableRow]:
    """The rows of a label file (see the module docstring); UserError when no image or
    grade column can be found."""
    lines = read_lines(path)
    rows = _split_lines(lines, _delimiter(lines))
    first = next((i for i, r in enumerate(rows) if any(c.strip() for c in r)), None)
    if first is None:
        return []
    header = rows[first]
    named = {"image": image_col, "grade": grade_col, "split": split_col, "patient": patient_col}
    has_header = (
        any(v for v in named.values())
        or _column(header, "image", None, path) is not None
        or len(header) >= 2
        and not re.match(r"^[+-]?[0-9.]*$", header[1].strip())  # a name where a grade would be
    )
    if has_header:
        cols = {role: _column(header, role, named[role], path) for role in named}
        if cols["image"] is None or cols["grade"] is None:
            want = "image" if cols["image"] is None else "grade"
            raise UserError(
                f"{path}: no {want} column among {', '.join(h.strip() for h in header)}; "
                f"name it with --{want}-col (looked for {', '.join(COLUMN_NAMES[want])})"
            )
        body = range(first + 1, len(rows))
    else:  # image grade [split [patient]]
        cols = {"image": 0, "grade": 1, "split": 2, "patient": 3}
        if len(header) < 2:
            raise UserError(
                f"{path}: line {first + 1} has one column; a label file needs at least an "
                "image and a grade (a header line 'image,level' names them)"
            )
        body = range(first, len(rows))
    names = [h.strip() for h in header] if has_header else []
    out = []
    for i in body:
        cells = [c.strip().strip('"').strip() for c in rows[i]]
        if not any(cells):
            continue

        def cell(role: str, cells=cells) -> str:
            j = cols[role]
            return cells[j] if j is not None and j < len(cells) else ""

        out.append(
            TableRow(
                image=cell("image"),
                grade=cell("grade"),
                split=cell("split"),
                patient=cell("patient"),
                line=i + 1,
                cells=dict(zip(names, cells, strict=False)),
            )
        )
    return out
