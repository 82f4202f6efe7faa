"""The input layouts read into one list of samples: ``read_source(data_dir)``.

The layout's reader (``pipeline.writing.layouts``: lab, eyepacs, aptos, messidor2, idrid,
ddr, or generic ``--labels``) lists rows; here every row becomes a sample or a reject with
its reason, the same way whatever the layout: the image is found with one walk of the data
folder (symbolic links followed, each loop reported once), a key is derived from its name
(``pipeline.shardformat.make_key``, unique across the folder), and the original relative
path is kept for the rejects, the sample table and the reports. Rows without a split are
split by ``assign_splits``: seeded, stratified by grade and grouped by patient; it also
carves the validation split out of the training samples.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from pipeline.constants import IMAGE_EXTENSIONS, NUM_CLASSES
from pipeline.errors import UserError
from pipeline.shardformat import make_key, patient_of, unique_keys
from pipeline.writing.labelfile import parse_grade, strip_image_ext
from pipeline.writing.layouts import Options, Row, find_reader

__all__ = ["Sample", "Source", "read_source", "assign_splits", "strip_image_ext", "parse_label"]


@dataclass(frozen=True)
class Sample:
    key: str  # the sample's key in the shard, derived from the image's name
    path: Path
    label: int
    split: str | None  # None until assign_splits for layouts without a split
    patient: str
    source: str = ""  # the original path relative to the data folder


@dataclass
class Source:
    layout: str  # a reader's name (pipeline.writing.layouts)
    root: Path
    samples: list[Sample]
    rejects: list[tuple[str, str]]  # (image as listed or file:line, reason)
    notes: list[str] = field(
        default_factory=list
    )  # for the summary: protocol, files not packed, loops


def parse_label(text: str) -> int | None:
    return parse_grade(text)


class ImageIndex:
    """Every image file under ``root`` (extensions ``IMAGE_EXTENSIONS``, any case), found by one
    walk that follows symbolic links; hidden folders skipped; a loop is reported once."""

    def __init__(self, root: Path):
        self.root = root
        self.by_stem: dict[str, list[Path]] = defaultdict(list)
        self.loops: list[str] = []
        seen: dict[tuple[int, int], str] = {}
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            st = os.stat(dirpath)
            here = Path(dirpath).relative_to(root).as_posix()
            if (st.st_dev, st.st_ino) in seen:
                self.loops.append(
                    f"symlink loop at {here} (back to {seen[st.st_dev, st.st_ino]}): not searched twice"
                )
                dirnames.clear()
                continue
            seen[st.st_dev, st.st_ino] = here
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                stem, ext = os.path.splitext(name)
                if ext.lower() in IMAGE_EXTENSIONS:
                    self.by_stem[stem].append(Path(dirpath) / name)

    def find(self, name: str, under: str | None = None) -> list[Path]:
        """The files a listed image may be: ``name`` is an id, a file name or a path relative to
        the root, with or without extension; ``under`` keeps those in that folder."""
        name = name.strip().replace("\\", "/")
        folder, _, base = name.rpartition("/")
        stem = strip_image_ext(base)
        found = self.by_stem.get(stem, [])
        if folder or under is not None:
            where = "/".join(p for p in (under, folder) if p)
            inside = self.root / where if where else self.root
            found = [p for p in found if p.parent == inside or (not folder and inside in p.parents)]
        if stem != base and len(found) > 1:  # the listed extension decides among equal stems
            same = [p for p in found if p.name.lower() == base.lower()]
            found = same or found
        return found


class _Collector:
    """Rows to samples and rejects, in row order, whatever the layout."""

    def __init__(self, index: ImageIndex):
        self.index = index
        self._found: dict[object, tuple[Row, Path, int]] = {}  # by image, in row order
        self.rejects: list[tuple[str, str]] = []
        self._seen: dict[object, tuple[str, int | None]] = {}  # image -> (first row, grade)
        self._conflicting: set[object] = set()

    @property
    def found(self) -> list[tuple[Row, Path, int]]:
        return list(self._found.values())

    def add(self, row: Row) -> None:
        shown = strip_image_ext(row.name) or row.where
        paths = self.index.find(row.name, row.under) if row.name else []
        ident = paths[0] if len(paths) == 1 else (row.under, strip_image_ext(row.name))
        if not row.name.strip():
            self.rejects.append((row.where, "empty id"))
            return
        if ident in self._seen:
            self._again(ident, shown, row)
            return
        self._seen[ident] = (row.where, parse_grade(row.grade))
        if row.reject:
            self.rejects.append((shown, row.reject))
            return
        label = parse_grade(row.grade)
        if label is None:
            reason = f"bad label: {row.grade.strip()!r} is not an integer 0-{NUM_CLASSES - 1}"
            self.rejects.append((shown, reason))
            return
        if not paths:
            self.rejects.append((shown, "missing"))
            return
        if len(paths) > 1:
            names = ", ".join(self._rel(p) for p in paths[:3])
            self.rejects.append((shown, f"ambiguous: {len(paths)} files for this id ({names})"))
            return
        self._found[ident] = (row, paths[0], label)

    def _again(self, ident, shown: str, row: Row) -> None:
        """A second row for one image: a duplicate if it gives the same grade (the first is
        kept), else both rows are rejected, since nobody can tell which grade is right."""
        kept, grade = self._seen[ident]
        here = parse_grade(row.grade)
        if ident not in self._conflicting and here == grade:
            self.rejects.append((shown, f"duplicate: listed again at {row.where}, kept {kept}"))
            return
        self.rejects.append(
            (shown, f"conflicting grades: {here} at {row.where}, {grade} at {kept}")
        )
        if ident not in self._conflicting:
            self._conflicting.add(ident)
            first = self._found.pop(ident, None)
            if first is not None:  # the first row was kept: it goes too
                self.rejects.append(
                    (shown, f"conflicting grades: {grade} at {kept}, {here} at {row.where}")
                )

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.index.root).as_posix()

    def samples(self) -> list[Sample]:
        """The found images as samples, with keys unique across the data folder."""
        wanted = [
            make_key(strip_image_ext(row.name.replace("\\", "/").rpartition("/")[2]))
            for row, _, _ in self.found
        ]
        folders = [  # equal names in two folders get their folder's name as a prefix
            path.parent.name if path.parent != self.index.root else "" for _, path, _ in self.found
        ]
        keys = unique_keys(wanted, folders)
        return [
            Sample(key, path, label, row.split, row.patient or patient_of(key), self._rel(path))
            for key, (row, path, label) in zip(keys, self.found, strict=True)
        ]


def read_source(
    data_dir: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    layout: str | None = None,
    options: Options | None = None,
) -> Source:
    """Samples and rejects of the data folder, in the order the label files list them.

    ``layout`` forces a reader (``pipeline.writing.layouts.READERS``); by default the first
    that recognises its files, or the generic one when ``labels`` is given."""
    root = Path(data_dir).resolve()
    if not root.is_dir():
        raise UserError(
            f"data folder {root} does not exist (for a synthetic one: python tools/make_synthetic.py --out {root})"
        )
    if labels is not None and not Path(labels).is_file():
        raise UserError(f"labels file {labels} does not exist")
    options = replace(options or Options(), labels=Path(labels) if labels is not None else None)
    reader, base = find_reader(root, layout, options.labels)
    listing = reader.read(root, base, options)
    if not listing.rows and not listing.rejects:
        raise UserError(f"the label files in {root} list no images ({reader.name} layout)")
    index = ImageIndex(root)
    out = _Collector(index)
    for row in listing.rows:
        out.add(row)
    rejects = listing.rejects + out.rejects
    samples = out.samples()
    if reader.name == "generic":  # the split column is the user's: --verify's rule, up front
        refuse_patients_in_two_splits(samples, options.labels)
    return Source(reader.name, root, samples, rejects, listing.notes + index.loops)


SHOWN_PATIENTS = 5  # named in the message; the count says how many more


def refuse_patients_in_two_splits(samples: list[Sample], labels: Path | None) -> None:
    """Stop before packing when a label file's split column puts one patient's images in
    two splits: ``make_shards --verify`` refuses such a folder (patient leakage makes the
    test figures optimistic), so it is never written."""
    splits: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        if s.split is not None:
            splits[s.patient].add(s.split)
    mixed = sorted(p for p, where in splits.items() if len(where) > 1)
    if not mixed:
        return
    shown = "; ".join(f"{p} in {' and '.join(sorted(splits[p]))}" for p in mixed[:SHOWN_PATIENTS])
    more = f" and {len(mixed) - SHOWN_PATIENTS} more" if len(mixed) > SHOWN_PATIENTS else ""
    raise UserError(
        f"{labels or 'the label file'}'s split column puts {len(mixed)} patient(s) in two "
        f"splits (patient {shown}{more}), which leaks a patient between them; give each of "
        "their rows one split, or leave their split cells empty for make_shards to assign "
        "them whole"
    )


def assign_splits(
    samples: list[Sample],
    test_fraction: float,
    seed: int,
    val_fraction: float = 0.0,
    split_as: str | None = None,
) -> list[Sample]:
    """Give every sample a split: train, val or test, stratified by grade, grouped by patient.

    ``split_as`` puts every sample in that one split (an external set packed for evaluation).
    Samples without a split take the split of their patient's other images if those have
    one; the rest (eyepacs, or --labels without a split column): about
    ``test_fraction`` of each grade go to test, the rest to train. Then, unless some sample
    already is in val, about ``val_fraction`` of the train samples go to val; a patient who
    also has an image outside train (the lab layout's lists may mix them) stays in train.
    """
    if split_as is not None:
        return [replace(s, split=split_as) for s in samples]
    given: dict[str, str] = {}
    for s in samples:  # a patient listed with a split keeps it for their other images
        if s.split is not None:
            given.setdefault(s.patient, s.split)
    samples = [replace(s, split=given.get(s.patient)) if s.split is None else s for s in samples]
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
