"""The three input layouts (lab, kaggle, generic ``--labels``), read into one list of samples.

``read_source(data_dir, labels=None)`` recognises the layout, finds every listed image
with one walk of the folder, and returns the samples it can pack plus the rows it
rejects, each with a reason (bad label, duplicate id, missing file, unmatched row).
Kaggle and generic layouts without a split column are split by ``assign_splits``:
seeded, stratified by grade and grouped by patient; it also carves the validation split
out of the training samples.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.constants import IMAGE_EXTENSIONS, NUM_CLASSES, SPLITS
from pipeline.errors import UserError
from pipeline.shardformat import key_problem, patient_of

LAB_FILES = {split: (f"{split}_img.csv", f"{split}_label.csv") for split in ("train", "test")}
KAGGLE_LABELS = "trainLabels.csv"
KAGGLE_IMAGES = "train"
LOOKED_FOR = (
    "train_img.csv + train_label.csv (+ test_img.csv + test_label.csv) for the lab layout, "
    f"or {KAGGLE_LABELS} with images in {KAGGLE_IMAGES}/ for the kaggle layout"
)
_INTEGER = re.compile(r"^[0-9]+$")


@dataclass(frozen=True)
class Sample:
    key: str  # the image id, also the sample's key in the shard
    path: Path
    label: int
    split: str | None  # None until assign_splits for layouts without a split
    patient: str


@dataclass
class Source:
    layout: str  # "lab", "kaggle" or "generic"
    root: Path
    samples: list[Sample]
    rejects: list[tuple[str, str]]  # (image id or file:line, reason)


def parse_label(text: str) -> int | None:
    text = text.strip()
    if _INTEGER.match(text) and int(text) < NUM_CLASSES:
        return int(text)
    return None


def strip_image_ext(name: str) -> str:
    stem, ext = os.path.splitext(name.strip())
    return stem if ext.lower() in IMAGE_EXTENSIONS else name.strip()


def find_images(folder: Path) -> dict[str, list[Path]]:
    """Every ``*.jpeg``/``*.jpg`` (any case) under ``folder``, by stem; hidden folders skipped."""
    found: dict[str, list[Path]] = defaultdict(list)
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS:
                found[stem].append(Path(dirpath) / name)
    return found


class _Collector:
    """Turns (id, label text, split, where) rows into samples and rejects, in row order."""

    def __init__(self, images: dict[str, list[Path]], root: Path):
        self.images = images
        self.root = root
        self.samples: list[Sample] = []
        self.rejects: list[tuple[str, str]] = []
        self._seen: dict[str, str] = {}

    def add(self, key: str, label_text: str, split: str | None, where: str) -> None:
        if problem := key_problem(key):
            self.rejects.append((key or where, problem))
            return
        if key in self._seen:
            self.rejects.append(
                (key, f"duplicate: listed again at {where}, kept {self._seen[key]}")
            )
            return
        self._seen[key] = where
        label = parse_label(label_text)
        if label is None:
            self.rejects.append(
                (key, f"bad label: {label_text.strip()!r} is not an integer 0-{NUM_CLASSES - 1}")
            )
            return
        paths = self.images.get(key, [])
        if not paths:
            self.rejects.append((key, "missing"))
            return
        if len(paths) > 1:
            names = ", ".join(str(p.relative_to(self.root)) for p in paths[:3])
            self.rejects.append((key, f"ambiguous: {len(paths)} files for this id ({names})"))
            return
        self.samples.append(Sample(key, paths[0], label, split, patient_of(key)))

    def reject(self, key: str, reason: str) -> None:
        self.rejects.append((key, reason))


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    lines = [line.strip().strip('"').strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _lab_headers(ids: list[str], labels: list[str], images: dict) -> tuple[bool, bool]:
    """Whether each CSV's first line is a header rather than a sample.

    A first id is a header only if no image has that name and it has no digit (``image``,
    ``id``); a first label only if it is not a number. When just one of the two looks like
    a header, it counts only if dropping it makes the two files equally long, so a lone
    odd first line is kept as a sample (and rejected with its reason) rather than lost.
    """
    if not ids or not labels:
        return False, False
    first_id = strip_image_ext(ids[0])
    id_like = first_id not in images and not any(c.isdigit() for c in first_id)
    label_like = not re.match(r"^[+-]?[0-9.]+$", labels[0])
    n_ids, n_labels = len(ids), len(labels)
    id_header = id_like and (label_like or n_ids - 1 == n_labels)
    label_header = label_like and (id_like or n_labels - 1 == n_ids)
    return id_header, label_header


def _read_lab(root: Path, images: dict) -> _Collector:
    out = _Collector(images, root)
    for split, (img_name, label_name) in LAB_FILES.items():
        if not (root / img_name).is_file():  # a lab folder without a test pair
            continue
        ids, labels = _read_lines(root / img_name), _read_lines(root / label_name)
        id_header, label_header = _lab_headers(ids, labels, images)
        ids, labels = ids[id_header:], labels[label_header:]
        for i, (image, label) in enumerate(zip(ids, labels, strict=False)):  # extra rows below
            out.add(strip_image_ext(image), label, split, f"{img_name} line {i + 1 + id_header}")
        if len(ids) != len(labels):
            why = f"{img_name} has {len(ids)} rows, {label_name} {len(labels)}"
            for i, image in enumerate(ids[len(labels) :], start=len(labels)):
                out.reject(
                    strip_image_ext(image) or f"{img_name} line {i + 1 + id_header}",
                    f"no label: {why}",
                )
            for i in range(len(ids), len(labels)):
                out.reject(f"{label_name} line {i + 1 + label_header}", f"no image: {why}")
    return out


def _read_table(path: Path, images: dict, root: Path, allow_split: bool) -> _Collector:
    """A CSV with a header ``image,level[,split]``; every cell read as text, blank rows skipped."""
    try:
        table = pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            encoding="utf-8-sig",
            skipinitialspace=True,
        ).fillna("")
    except pd.errors.EmptyDataError:
        table = pd.DataFrame()
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise UserError(f"cannot read {path}: {str(err).strip().splitlines()[-1]}") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    if "image" not in table.columns or "level" not in table.columns:
        want = "image,level,split" if allow_split else "image,level"
        raise UserError(f"{path} must start with a header line '{want}' (split optional)")
    table = table.apply(lambda column: column.str.strip())
    table["line"] = range(2, len(table) + 2)  # the file's line numbers, for the rejects
    table = table[(table.drop(columns="line") != "").any(axis=1)]
    has_split = allow_split and "split" in table.columns and (table.get("split", "") != "").any()
    out = _Collector(images, root)
    for row in table.itertuples(index=False):
        key = strip_image_ext(row.image)
        split = None
        if has_split:
            split = row.split.lower()
            if split not in SPLITS:
                out.reject(
                    key or f"{path.name} line {row.line}",
                    f"bad split: {split!r} is not {' or '.join(SPLITS)}",
                )
                continue
        out.add(key, row.level, split, f"{path.name} line {row.line}")
    return out


def detect_layout(root: Path) -> str:
    """``lab`` or ``kaggle`` from the files in ``root``; UserError naming what was looked for."""
    if not root.is_dir():
        raise UserError(
            f"data folder {root} does not exist (for a synthetic one: python tools/make_synthetic.py --out {root})"
        )
    lab_present = [name for pair in LAB_FILES.values() for name in pair if (root / name).is_file()]
    if lab_present:
        for split, pair in LAB_FILES.items():
            missing = [name for name in pair if not (root / name).is_file()]
            if missing and (split == "train" or len(missing) == 1):
                raise UserError(
                    f"{root} has {', '.join(lab_present)} but not {', '.join(missing)} (lab layout)"
                )
        return "lab"
    if (root / KAGGLE_LABELS).is_file():
        return "kaggle"
    raise UserError(
        f"no recognised input in {root}: looked for {LOOKED_FOR}; pass --labels FILE.csv otherwise"
    )


def read_source(data_dir: str | os.PathLike, labels: str | os.PathLike | None = None) -> Source:
    """Samples and rejects of the data folder, in the order the label files list them."""
    root = Path(data_dir).resolve()
    if labels is not None:
        if not root.is_dir():
            raise UserError(
                f"data folder {root} does not exist (for a synthetic one: python tools/make_synthetic.py --out {root})"
            )
        labels_path = Path(labels)
        if not labels_path.is_file():
            raise UserError(f"labels file {labels_path} does not exist")
        layout = "generic"
        out = _read_table(labels_path, find_images(root), root, allow_split=True)
    else:
        layout = detect_layout(root)
        if layout == "lab":
            out = _read_lab(root, find_images(root))
        else:
            image_dir = root / KAGGLE_IMAGES
            images = find_images(image_dir if image_dir.is_dir() else root)
            out = _read_table(root / KAGGLE_LABELS, images, root, allow_split=False)
    if not out.samples and not out.rejects:
        raise UserError(f"the label files in {root} list no images ({layout} layout)")
    return Source(layout, root, out.samples, out.rejects)


def assign_splits(
    samples: list[Sample], test_fraction: float, seed: int, val_fraction: float = 0.0
) -> list[Sample]:
    """Give every sample a split: train, val or test, stratified by grade, grouped by patient.

    Samples without a split (kaggle, or --labels without a split column): about
    ``test_fraction`` of each grade go to test, the rest to train. Then, unless some sample
    already is in val, about ``val_fraction`` of the train samples go to val; a patient who
    also has an image outside train (the lab layout's lists may mix them) stays in train.
    """
    samples = _carve(samples, lambda s: s.split is None, "test", "train", test_fraction, seed)
    if val_fraction <= 0 or any(s.split == "val" for s in samples):
        return samples
    elsewhere = {s.patient for s in samples if s.split != "train"}
    return _carve(
        samples,
        lambda s: s.split == "train" and s.patient not in elsewhere,
        "val",
        "train",
        val_fraction,
        [seed, 2],
    )


def _carve(
    samples: list[Sample], eligible, chosen: str, rest: str, fraction: float, seed
) -> list[Sample]:
    """Move about ``fraction`` of each grade of the ``eligible`` samples to split ``chosen``
    (the others to ``rest``), whole patients at a time.

    Patients (``10_left`` + ``10_right``) are visited in a seeded random order and each is
    chosen when that brings the chosen split's per-grade counts closer to their targets
    (relative error, so rare grades count as much as grade 0).
    """
    by_patient: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        if eligible(s):
            by_patient[s.patient].append(s)
    if not by_patient:
        return samples
    patients = sorted(by_patient)
    order = np.random.default_rng(seed).permutation(len(patients))
    grades = np.array(
        [np.bincount([s.label for s in by_patient[p]], minlength=NUM_CLASSES) for p in patients]
    )
    target = fraction * grades.sum(axis=0)
    scale = np.maximum(target, 1.0)
    counts = np.zeros(NUM_CLASSES)
    picked: set[str] = set()
    for i in order:
        before = np.abs(counts - target) / scale
        after = np.abs(counts + grades[i] - target) / scale
        if after.sum() < before.sum():
            counts += grades[i]
            picked.add(patients[i])
    return [
        replace(s, split=chosen if s.patient in picked else rest) if eligible(s) else s
        for s in samples
    ]


def patients_in_both(samples: list[Sample]) -> int:
    """How many patients have images in more than one split (the lab CSVs may mix them)."""
    splits: dict[str, set] = defaultdict(set)
    for s in samples:
        splits[s.patient].add(s.split)
    return sum(1 for v in splits.values() if len(v) > 1)
