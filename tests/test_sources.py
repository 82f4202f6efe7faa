"""pipeline.writing.sources: the three layouts, header detection, rejects, the patient-grouped split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.shardformat import eye_of, patient_of
from pipeline.writing.sources import assign_splits, read_source

PLACEHOLDER = b"\xff\xd8 not decoded: the sources only look at file names"


def write_images(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(PLACEHOLDER)


def write_lab(root: Path, train: list[tuple[str, str]], test=(), header=False, images=True) -> Path:
    """A lab folder: <split>_img.csv / <split>_label.csv from (id, label text) rows."""
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        ids = (["image"] if header else []) + [r[0] for r in rows]
        labels = (["level"] if header else []) + [r[1] for r in rows]
        (root / f"{split}_img.csv").write_text("".join(f"{v}\n" for v in ids))
        (root / f"{split}_label.csv").write_text("".join(f"{v}\n" for v in labels))
        if images:
            write_images(root / "images", [f"{r[0]}.jpeg" for r in rows])
    return root


def keys(source) -> list[tuple[str, int, str]]:
    return [(s.key, s.label, s.split) for s in source.samples]


ROWS = [("1_left", "0"), ("1_right", "2"), ("2_left", "4")]


@pytest.mark.parametrize("header", [False, True])
def test_lab_with_or_without_header_loses_no_sample(tmp_path, header):
    src = read_source(write_lab(tmp_path, ROWS, [("3_left", "1")], header=header))
    assert src.layout == "lab" and src.rejects == []
    assert keys(src) == [
        ("1_left", 0, "train"),
        ("1_right", 2, "train"),
        ("2_left", 4, "train"),
        ("3_left", 1, "test"),
    ]
    assert src.samples[0].path == tmp_path / "images" / "1_left.jpeg"


def test_lab_header_in_one_file_only(tmp_path):
    root = write_lab(tmp_path, ROWS)
    (root / "train_img.csv").write_text("image\n" + (root / "train_img.csv").read_text())
    src = read_source(root)
    assert src.rejects == [] and [k for k, *_ in keys(src)][:3] == ["1_left", "1_right", "2_left"]


def test_lab_first_row_with_bad_label_is_kept_and_rejected(tmp_path):
    src = read_source(write_lab(tmp_path, [("1_left", "x"), *ROWS[1:]]))
    assert src.rejects == [("1_left", "bad label: 'x' is not an integer 0-4")]
    assert len(src.samples) == 2


def test_ids_with_extension_upper_case_and_nested(tmp_path):
    root = write_lab(
        tmp_path, [("1_left.jpeg", "0"), ("1_right", "1"), ("2_left", "3")], images=False
    )
    write_images(root / "a", ["1_left.jpeg"])
    write_images(root / "a" / "b", ["1_right.JPEG", "2_left.JpG"])
    src = read_source(root)
    assert src.rejects == []
    assert [s.path.relative_to(root).as_posix() for s in src.samples] == [
        "a/1_left.jpeg",
        "a/b/1_right.JPEG",
        "a/b/2_left.JpG",
    ]


@pytest.mark.parametrize("label", ["7", "x", "1.5", "-1", "5"])  # "2.0" is grade 2
def test_label_not_0_to_4_rejected(tmp_path, label):
    src = read_source(write_lab(tmp_path, [*ROWS, ("9_left", label)]))
    assert src.rejects == [("9_left", f"bad label: {label!r} is not an integer 0-4")]
    assert len(src.samples) == 3


def test_duplicate_id_rejected_saying_which(tmp_path):
    src = read_source(write_lab(tmp_path, [*ROWS, ("1_left", "1")], [("1_right", "2")]))
    assert src.rejects == [  # grades 0 and 1 for one image: neither row can be trusted
        ("1_left", "conflicting grades: 1 at train_img.csv line 4, 0 at train_img.csv line 1"),
        ("1_left", "conflicting grades: 0 at train_img.csv line 1, 1 at train_img.csv line 4"),
        ("1_right", "duplicate: listed again at test_img.csv line 1, kept train_img.csv line 2"),
    ]
    assert keys(src)[0] == ("1_right", 2, "train")


def test_unequal_csv_lengths_reject_unmatched_rows(tmp_path):
    root = write_lab(tmp_path, ROWS, [("3_left", "1"), ("3_right", "1")])
    (root / "train_label.csv").write_text("0\n2\n")
    (root / "test_label.csv").write_text("1\n1\n3\n")
    src = read_source(root)
    assert src.rejects == [
        ("2_left", "no label: train_img.csv has 3 rows, train_label.csv 2"),
        ("test_label.csv line 3", "no image: test_img.csv has 2 rows, test_label.csv 3"),
    ]
    assert [k for k, *_ in keys(src)] == ["1_left", "1_right", "3_left", "3_right"]


def test_missing_and_ambiguous_images(tmp_path):
    root = write_lab(tmp_path, ROWS)
    (root / "images" / "1_right.jpeg").unlink()
    write_images(root / "other", ["2_left.jpg"])
    src = read_source(root)
    assert src.rejects[0] == ("1_right", "missing")
    assert src.rejects[1][0] == "2_left" and src.rejects[1][1].startswith("ambiguous: 2 files")
    assert [s.key for s in src.samples] == ["1_left"]


def test_id_that_cannot_be_a_shard_key_gets_a_derived_key(tmp_path):
    root = write_lab(tmp_path, [*ROWS, ("scan.v2", "1")])
    (root / "images" / "scan.v2.jpeg").write_bytes(PLACEHOLDER)
    src = read_source(root)
    assert src.rejects == [] and src.samples[-1].key == "scan-v2"
    assert src.samples[-1].source == "images/scan.v2.jpeg"


def test_kaggle_layout_only_looks_in_train(tmp_path):
    write_images(tmp_path / "train", ["10_left.jpeg", "10_right.jpeg"])
    write_images(tmp_path / "test", ["10_left.jpeg"])  # unlabelled Kaggle test images
    (tmp_path / "trainLabels.csv").write_text("image,level\n10_left,0\n10_right,3\n")
    src = read_source(tmp_path)
    assert src.layout == "eyepacs" and src.rejects == []
    assert [(s.key, s.label, s.split, s.patient) for s in src.samples] == [
        ("10_left", 0, None, "10"),
        ("10_right", 3, None, "10"),
    ]


def test_generic_labels_with_split_column(tmp_path):
    write_images(tmp_path / "imgs", ["a1.jpg", "b2.jpg", "c3.jpg", "d4.jpg"])
    labels = tmp_path / "labels.csv"
    labels.write_text("image,level,split\na1,0,train\nb2.jpg,1,TEST\nc3,2,val\nd4,1,dev\ne5,1,x\n")
    src = read_source(tmp_path, labels)
    assert src.layout == "generic"
    assert keys(src) == [("a1", 0, "train"), ("b2", 1, "test"), ("c3", 2, "val"), ("d4", 1, "val")]
    assert src.rejects == [("e5", "bad split: 'x' is not train, val or test")]


def test_a_split_column_that_puts_a_patient_in_two_splits_is_refused(tmp_path):
    """--verify's patient rule, before anything is written: one line, naming the patients."""
    write_images(
        tmp_path / "imgs",
        [f"{n}.jpg" for n in ("10_left", "10_right", "11_left", "11_right", "12_left")],
    )
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "image,level,split,patient\n10_left,0,train,\n10_right,4,test,\n"
        "11_left,1,val,\n11_right,1,val,\n12_left,2,train,p7\n"
    )
    with pytest.raises(UserError) as err:
        read_source(tmp_path, labels)
    message = str(err.value)
    assert "\n" not in message
    assert "puts 1 patient(s) in two splits (patient 10 in test and train)" in message
    assert "leave their split cells empty" in message
    labels.write_text(labels.read_text().replace("10_right,4,test", "10_right,4,"))
    src = read_source(tmp_path, labels)  # the patient's empty cell follows its listed split
    assert assign_splits(src.samples, 0.2, 0)[1].split == "train"


def test_generic_labels_with_unknown_columns_say_which(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("photo,score\na1,0\n")
    with pytest.raises(
        UserError, match="no image column among photo, score; name it with --image-col"
    ):
        read_source(tmp_path, labels)


@pytest.mark.parametrize(
    "contents", [[], ["photo.jpeg", "notes.txt"]], ids=["empty", "unrecognised"]
)
def test_empty_or_unrecognised_folder_says_what_was_looked_for(tmp_path, contents):
    for name in contents:
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(UserError) as err:
        read_source(tmp_path)
    message = str(err.value)
    assert "train_img.csv" in message and "trainLabels.csv" in message and "--labels" in message
    assert "\n" not in message


def test_incomplete_lab_pair_and_missing_folder(tmp_path):
    (tmp_path / "train_img.csv").write_text("1_left\n")
    with pytest.raises(UserError, match="not train_label.csv"):
        read_source(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        read_source(tmp_path / "nope")


def test_patient_of():
    assert patient_of("10_left") == "10" and patient_of("10_RIGHT") == "10"
    assert eye_of("10_left") == "left" and eye_of("10_RIGHT") == "right" and eye_of("scan7") == ""
    assert patient_of("scan_7") == "scan_7"


def _kaggle_like(n_patients: int, seed: int = 0):
    from pipeline.writing.sources import Sample

    rng = np.random.default_rng(seed)
    grades = rng.choice(5, size=n_patients, p=[0.735, 0.07, 0.151, 0.025, 0.019])
    samples = []
    for p, g in enumerate(grades):
        for eye, shift in (("left", 0), ("right", rng.choice([-1, 0, 0, 0, 1]))):
            key = f"{p + 1}_{eye}"
            samples.append(Sample(key, Path(key), int(np.clip(g + shift, 0, 4)), None, str(p + 1)))
    return samples


def test_split_is_grouped_by_patient_stratified_and_seeded():
    samples = _kaggle_like(600)
    split = assign_splits(samples, 0.2, seed=3)
    sides: dict[str, set] = {}
    for s in split:
        sides.setdefault(s.patient, set()).add(s.split)
    assert all(len(v) == 1 for v in sides.values())  # no patient straddles
    total = Counter(s.label for s in split)
    test = Counter(s.label for s in split if s.split == "test")
    for grade in range(5):
        assert abs(test[grade] - 0.2 * total[grade]) <= max(2, 0.05 * total[grade]), (
            grade,
            test,
            total,
        )
    assert split == assign_splits(samples, 0.2, seed=3)
    assert split != assign_splits(samples, 0.2, seed=4)
    assert all(s.split == "train" for s in assign_splits(samples, 0.0, seed=3))


def splits_of(samples) -> dict[str, set]:
    sides: dict[str, set] = {}
    for s in samples:
        sides.setdefault(s.patient, set()).add(s.split)
    return sides


@pytest.mark.parametrize("layout", ["kaggle", "generic-train-test", "lab"])
def test_val_is_carved_from_train_by_patient_and_grade(layout):
    from dataclasses import replace

    samples = _kaggle_like(800, seed=5)
    if layout == "generic-train-test":  # a split column that says train or test, never val
        samples = [
            replace(s, split="test" if int(s.patient) % 5 == 0 else "train") for s in samples
        ]
    if layout == "lab":  # the lab's lists: one patient in both, as real lists may have
        samples = [
            replace(s, split="test" if int(s.patient) % 5 == 0 else "train") for s in samples
        ]
        samples[0] = replace(samples[0], split="test")  # patient 1: left in test, right in train
    split = assign_splits(samples, 0.2, seed=3, val_fraction=0.1)
    sides = splits_of(split)
    mixed = [p for p, v in sides.items() if len(v) > 1]
    assert mixed == (["1"] if layout == "lab" else [])  # only the lab's own overlap
    assert "val" not in sides["1"] if layout == "lab" else True
    train = Counter(s.label for s in split if s.split in ("train", "val"))
    val = Counter(s.label for s in split if s.split == "val")
    for grade in range(5):
        assert abs(val[grade] - 0.1 * train[grade]) <= max(2, 0.03 * train[grade]), grade
    if layout != "kaggle":  # the given test split is untouched
        assert [s.split == "test" for s in split] == [s.split == "test" for s in samples]
    assert split == assign_splits(samples, 0.2, seed=3, val_fraction=0.1)  # seeded


def test_val_fraction_0_or_a_given_val_split_carves_nothing():
    from dataclasses import replace

    samples = _kaggle_like(200)
    assert "val" not in {s.split for s in assign_splits(samples, 0.2, seed=1, val_fraction=0)}
    given = [replace(s, split="val" if int(s.patient) % 7 == 0 else "train") for s in samples]
    assert assign_splits(given, 0.2, seed=1, val_fraction=0.1) == given
