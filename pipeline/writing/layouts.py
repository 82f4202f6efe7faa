"""The input layouts, one small reader each: the public DR datasets as distributed.

A reader recognises its layout by its own files (``base(root)``: the folder holding them,
or None) and lists what its label files say (``read(base, options)``): one :class:`Row` per
listed image (the image as written, the grade text, the split or None, the patient or
None, the folder the file must lie in, or the reader's own reason to reject it) plus notes
for the summary. Finding the files, making keys, splitting, packing and verifying never
know which layout a row came from (``pipeline.writing.sources``). A new dataset is one
reader here, one line in ``READERS``, and its test.

| layout    | recognised by                                              | split              |
|-----------|------------------------------------------------------------|--------------------|
| lab       | train_img.csv + train_label.csv (+ test_...)               | train/test as listed |
| eyepacs   | trainLabels.csv (+ retinopathy_solution.csv and test/)     | made; or the published protocol |
| aptos     | train.csv (id_code,diagnosis) + train_images/              | made               |
| messidor2 | messidor_data.csv                                          | made               |
| idrid     | B. Disease Grading/{1. Original Images,2. Groundtruths}    | training / testing set |
| ddr       | DR_grading/{train,valid,test}.txt                          | as listed          |
| generic   | --labels FILE                                              | its split column, else made |
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError
from pipeline.writing.labelfile import parse_split, read_lines, read_table, strip_image_ext


@dataclass(frozen=True)
class Row:
    name: str  # the image as listed: an id, a file name, or a path relative to the data folder
    grade: str  # the grade as written ("2", "2.0", "")
    where: str  # "file line N", for the rejects
    split: str | None = None  # train / val / test, or None: the default assignment
    patient: str | None = None  # None: from the id (10_left -> 10)
    under: str | None = None  # folder (relative to the data folder) the image lies in
    reject: str | None = None  # the reader's own verdict ("ungradable")


@dataclass
class Listing:
    rows: list[Row] = field(default_factory=list)
    rejects: list[tuple[str, str]] = field(default_factory=list)  # rows no image can come from
    notes: list[str] = field(default_factory=list)  # for the summary


@dataclass(frozen=True)
class Options:
    labels: Path | None = None
    image_col: str | None = None
    grade_col: str | None = None
    split_col: str | None = None
    patient_col: str | None = None


@dataclass(frozen=True)
class Reader:
    name: str
    looks_for: str  # what recognises it, for the message when nothing does
    base: Callable[[Path], Path | None]  # the folder holding its files, None if not this layout
    read: Callable[[Path, Path, Options], Listing]  # (data folder, base, options)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else ""


def _is_file(folder: Path, name: str) -> Path | None:
    return folder if (folder / name).is_file() else None


# ---------------------------------------------------------------- lab

LAB_FILES = {split: (f"{split}_img.csv", f"{split}_label.csv") for split in ("train", "test")}


def _lab_base(root: Path) -> Path | None:
    present = [name for pair in LAB_FILES.values() for name in pair if (root / name).is_file()]
    if not present:
        return None
    for split, pair in LAB_FILES.items():
        missing = [name for name in pair if not (root / name).is_file()]
        if missing and (split == "train" or len(missing) == 1):
            raise UserError(
                f"{root} has {', '.join(present)} but not {', '.join(missing)} (lab layout)"
            )
    return root


def _value_lines(path: Path) -> list[str]:
    lines = [line.strip().strip('"').strip() for line in read_lines(path)]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _lab_headers(ids: list[str], labels: list[str]) -> tuple[bool, bool]:
    """Whether each CSV's first line is a header rather than a sample.

    A first id is a header only if it has no digit (``image``, ``id``); a first label only
    if it is not a number. When just one of the two looks like a header, it counts only if
    dropping it makes the two files equally long, so a lone odd first line is kept as a
    sample (and rejected with its reason) rather than lost.
    """
    if not ids or not labels:
        return False, False
    id_like = not any(c.isdigit() for c in ids[0])
    label_like = not re.match(r"^[+-]?[0-9.]+$", labels[0])
    n_ids, n_labels = len(ids), len(labels)
    id_header = id_like and (label_like or n_ids - 1 == n_labels)
    label_header = label_like and (id_like or n_labels - 1 == n_ids)
    return id_header, label_header


def _read_lab(root: Path, base: Path, options: Options) -> Listing:
    out = Listing()
    for split, (img_name, label_name) in LAB_FILES.items():
        if not (base / img_name).is_file():  # a lab folder without a test pair
            continue
        ids, labels = _value_lines(base / img_name), _value_lines(base / label_name)
        id_header, label_header = _lab_headers(ids, labels)
        ids, labels = ids[id_header:], labels[label_header:]
        for i, (image, label) in enumerate(zip(ids, labels, strict=False)):  # extra rows below
            out.rows.append(Row(image, label, f"{img_name} line {i + 1 + id_header}", split))
        if len(ids) != len(labels):
            why = f"{img_name} has {len(ids)} rows, {label_name} {len(labels)}"
            for i, image in enumerate(ids[len(labels) :], start=len(labels)):
                out.rejects.append(
                    (_stem(image) or f"{img_name} line {i + 1 + id_header}", f"no label: {why}")
                )
            for i in range(len(ids), len(labels)):
                out.rejects.append(
                    (f"{label_name} line {i + 1 + label_header}", f"no image: {why}")
                )
    return out


def _stem(name: str) -> str:
    return strip_image_ext(name)


# ---------------------------------------------------------------- eyepacs (Kaggle 2015)

EYEPACS_LABELS = "trainLabels.csv"
EYEPACS_SOLUTION = "retinopathy_solution.csv"
EYEPACS_USAGE = {"public": "val", "private": "test"}


def _eyepacs_base(root: Path) -> Path | None:
    return _is_file(root, EYEPACS_LABELS)


def _folder(base: Path, name: str, root: Path) -> str | None:
    return _rel(base / name, root) if (base / name).is_dir() else None


def _read_eyepacs(root: Path, base: Path, options: Options) -> Listing:
    out = Listing()
    protocol = (base / EYEPACS_SOLUTION).is_file() and (base / "test").is_dir()
    train = _folder(base, "train", root)
    for row in read_table(base / EYEPACS_LABELS):
        where = f"{EYEPACS_LABELS} line {row.line}"
        out.rows.append(
            Row(row.image, row.grade, where, "train" if protocol else None, under=train)
        )
    if not protocol:
        if (base / EYEPACS_SOLUTION).is_file():
            out.notes.append(
                f"{EYEPACS_SOLUTION} found without test/: the test release is not packed"
            )
        return out
    for row in read_table(base / EYEPACS_SOLUTION):
        where = f"{EYEPACS_SOLUTION} line {row.line}"
        usage = row.cells.get("Usage", "")
        split = EYEPACS_USAGE.get(usage.strip().lower())
        if split is None:
            out.rejects.append(
                (row.image or where, f"bad split: Usage {usage!r} is not Public or Private")
            )
            continue
        out.rows.append(Row(row.image, row.grade, where, split, under=_rel(base / "test", root)))
    out.notes.append(
        "the published protocol: train = trainLabels.csv, val = Usage Public, test = Usage Private"
    )
    return out


# ---------------------------------------------------------------- aptos (APTOS 2019)


def _aptos_base(root: Path) -> Path | None:
    if not (root / "train.csv").is_file():
        return None
    lines = read_lines(root / "train.csv")
    return root if lines and "id_code" in lines[0] else None


def _read_aptos(root: Path, base: Path, options: Options) -> Listing:
    out = Listing()
    images = _folder(base, "train_images", root)
    for row in read_table(base / "train.csv", image_col="id_code", grade_col="diagnosis"):
        out.rows.append(Row(row.image, row.grade, f"train.csv line {row.line}", under=images))
    if (base / "test.csv").is_file():
        n = sum(1 for line in read_lines(base / "test.csv")[1:] if line.strip())
        out.notes.append(
            f"test.csv lists {n} images without grades (the hidden test set): not packed"
        )
    return out


# ---------------------------------------------------------------- messidor2 (Krause et al. grades)

MESSIDOR_LABELS = "messidor_data.csv"


def _messidor_base(root: Path) -> Path | None:
    return _is_file(root, MESSIDOR_LABELS)


def _read_messidor(root: Path, base: Path, options: Options) -> Listing:
    out = Listing()
    table = read_table(
        base / MESSIDOR_LABELS, image_col="image_id", grade_col="adjudicated_dr_grade"
    )
    for row in table:
        gradable = row.cells.get("adjudicated_gradable", "1").strip()
        reject = None
        if not row.grade or gradable in ("0", "0.0"):
            reject = "ungradable"
        where = f"{MESSIDOR_LABELS} line {row.line}"
        out.rows.append(Row(row.image, row.grade, where, reject=reject))
    return out


# ---------------------------------------------------------------- idrid (B. Disease Grading)

IDRID_FOLDER = "B. Disease Grading"
IDRID_IMAGES = "1. Original Images"
IDRID_LABELS = "2. Groundtruths"
IDRID_SETS = {"train": "Training", "test": "Testing"}


def _idrid_base(root: Path) -> Path | None:
    for base in (root / IDRID_FOLDER, root):
        if (base / IDRID_IMAGES).is_dir() and (base / IDRID_LABELS).is_dir():
            return base
    return None


def _one(folder: Path, pattern: str, what: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise UserError(
            f"{folder} should hold one {what} ({pattern}), found {len(found)} (idrid layout)"
        )
    return found[0]


def _read_idrid(root: Path, base: Path, options: Options) -> Listing:
    out = Listing()
    for split, word in IDRID_SETS.items():
        labels = _one(base / IDRID_LABELS, f"*{word}*.csv", f"{word.lower()} label file")
        images = _one(base / IDRID_IMAGES, f"*{word}*", f"{word.lower()} image folder")
        for row in read_table(labels, image_col="Image name", grade_col="Retinopathy grade"):
            where = f"{labels.name} line {row.line}"
            out.rows.append(Row(row.image, row.grade, where, split, under=_rel(images, root)))
    return out


# ---------------------------------------------------------------- ddr (DR_grading)

DDR_FOLDER = "DR_grading"
DDR_SPLITS = {"train": "train", "valid": "val", "test": "test"}
DDR_UNGRADABLE = "5"


def _ddr_base(root: Path) -> Path | None:
    for base in (root / DDR_FOLDER, root):
        if all((base / f"{name}.txt").is_file() for name in DDR_SPLITS):
            return base
    return None


def _read_ddr(root: Path, base: Path, options: Options) -> Listing:
    out = Listing()
    for name, split in DDR_SPLITS.items():
        images = _folder(base, name, root)
        for row in read_table(base / f"{name}.txt"):
            reject = "ungradable" if row.grade.strip() == DDR_UNGRADABLE else None
            where = f"{name}.txt line {row.line}"
            out.rows.append(Row(row.image, row.grade, where, split, under=images, reject=reject))
    return out


# ---------------------------------------------------------------- generic (--labels FILE)


def _read_generic(root: Path, base: Path, options: Options) -> Listing:
    out = Listing()
    path = Path(options.labels)
    table = read_table(
        path, options.image_col, options.grade_col, options.split_col, options.patient_col
    )
    for row in table:
        where = f"{path.name} line {row.line}"
        split = parse_split(row.split)
        if split is None:
            out.rejects.append(
                (_stem(row.image) or where, f"bad split: {row.split!r} is not train, val or test")
            )
            continue
        out.rows.append(Row(row.image, row.grade, where, split or None, row.patient or None))
    return out


READERS = {
    reader.name: reader
    for reader in (
        Reader("lab", "train_img.csv + train_label.csv (lab)", _lab_base, _read_lab),
        Reader("eyepacs", f"{EYEPACS_LABELS} (eyepacs)", _eyepacs_base, _read_eyepacs),
        Reader("aptos", "train.csv with id_code,diagnosis (aptos)", _aptos_base, _read_aptos),
        Reader("messidor2", f"{MESSIDOR_LABELS} (messidor2)", _messidor_base, _read_messidor),
        Reader("idrid", f"{IDRID_FOLDER}/ (idrid)", _idrid_base, _read_idrid),
        Reader("ddr", f"{DDR_FOLDER}/{{train,valid,test}}.txt (ddr)", _ddr_base, _read_ddr),
    )
}
GENERIC = Reader("generic", "--labels FILE", lambda root: root, _read_generic)
ALIASES = {"kaggle": "eyepacs"}
LAYOUT_NAMES = (*READERS, GENERIC.name, *ALIASES)


def find_reader(root: Path, layout: str | None, labels: Path | None) -> tuple[Reader, Path]:
    """The reader for ``root`` and the folder holding its files: the one named by ``layout``,
    the generic one with ``--labels``, else the first that recognises its files."""
    if labels is not None and layout in (None, GENERIC.name):
        return GENERIC, root
    if layout == GENERIC.name:
        raise UserError("--layout generic reads the label file given with --labels FILE")
    if layout is not None and labels is not None:
        raise UserError(
            f"--labels is read by the generic layout; --layout {layout} reads its own files"
        )
    if layout is not None:
        name = ALIASES.get(layout, layout)
        if name not in READERS:
            raise UserError(f"--layout must be one of {', '.join(LAYOUT_NAMES)}, got {layout!r}")
        base = READERS[name].base(root)
        if base is None:
            raise UserError(
                f"{root} is not in the {name} layout: looked for {READERS[name].looks_for}"
            )
        return READERS[name], base
    for reader in READERS.values():
        if (base := reader.base(root)) is not None:
            return reader, base
    looked = "; ".join(r.looks_for for r in READERS.values())
    raise UserError(
        f"no recognised input in {root}: looked for {looked}; pass --labels FILE.csv otherwise"
    )
