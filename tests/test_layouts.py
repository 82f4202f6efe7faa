"""The public datasets' layouts as distributed, any image format, any file name, label files
as people write them, symlinked folders, loud warnings (make_shards, issue 16)."""

from __future__ import annotations

import csv
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from pipeline.errors import UserError
from pipeline.manifest import read_manifest
from pipeline.samplelist import read_sample_table
from pipeline.shardformat import key_problem, make_key, unique_keys
from pipeline.verify import verify_shards
from pipeline.writing.labelfile import parse_grade, read_table
from pipeline.writing.layouts import Options
from pipeline.writing.packing import PackConfig, pack
from pipeline.writing.preprocess import open_image
from pipeline.writing.sources import read_source
from tools.make_synthetic import generate

SIZE = 32


def run_pack(data: Path, out: Path, **kw):
    console = Console(file=io.StringIO(), width=200)
    cfg = PackConfig(data, out, size=SIZE, shard_size=16, workers=1, quiet=True, **kw)
    result = pack(cfg, console=console)
    return result, " ".join(console.file.getvalue().split())  # the table wraps lines


def split_counts(out: Path) -> dict[str, int]:
    return {name: info.samples for name, info in read_manifest(out).splits.items()}


def rejects(out: Path) -> list[dict]:
    with open(out / "rejects.csv", newline="") as f:
        return list(csv.DictReader(f))


def rows(path: Path, sep: str = ",") -> list[list[str]]:
    """The non-blank data rows of a label file, read here independently of the tool."""
    lines = path.read_text().splitlines()[1 if sep == "," else 0 :]
    cells = [line.split(sep) if sep else line.split() for line in lines]
    return [c for c in cells if any(x.strip() for x in c)]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, tuple[Path, Path, str]]:
    """Each public layout written by make_synthetic (20 pictures at 32 px) and packed once."""
    base = tmp_path_factory.mktemp("layouts")
    made = {}
    for i, layout in enumerate(("eyepacs", "aptos", "messidor2", "idrid", "ddr")):
        data, out = base / layout, base / f"{layout}-shards"
        generate(data, n=20, size=SIZE, layout=layout, seed=i)
        _, printed = run_pack(data, out)
        made[layout] = (data, out, printed)
    return made


def test_every_layout_is_recognised_and_verifies(layouts):
    for layout, (_, out, printed) in layouts.items():
        manifest = read_manifest(out)
        assert manifest.source["layout"] == layout and f"({layout} layout)" in printed
        assert verify_shards(out).problems == [], layout


def test_eyepacs_test_release_is_the_published_protocol(layouts):
    data, out, printed = layouts["eyepacs"]
    solution = rows(data / "retinopathy_solution.csv")
    assert split_counts(out) == {
        "train": len(rows(data / "trainLabels.csv")),
        "val": sum(r[2] == "Public" for r in solution),
        "test": sum(r[2] == "Private" for r in solution),
    }
    assert "published protocol" in printed and rejects(out) == []


def test_aptos_packs_pngs_and_says_the_unlabeled_test_csv_is_not_packed(layouts):
    data, out, printed = layouts["aptos"]
    assert sum(split_counts(out).values()) == len(rows(data / "train.csv"))
    n_test = len(rows(data / "test.csv"))
    assert n_test > 0 and f"test.csv lists {n_test} images without grades" in printed
    assert all(r.path.endswith(".png") for r in read_sample_table(out).values())


def test_messidor2_ungradable_rows_are_rejected_as_such(layouts):
    data, out, printed = layouts["messidor2"]
    table = rows(data / "messidor_data.csv")
    ungradable = [r[0] for r in table if r[3] == "0"]
    assert ungradable and sum(split_counts(out).values()) == len(table) - len(ungradable)
    assert [(r["image"], r["reason"]) for r in rejects(out)] == [
        (name.rsplit(".", 1)[0], "ungradable") for name in ungradable
    ]
    assert "ungradable" in printed  # more than 5 % rejected: the warning names the reason


def test_idrid_training_set_is_train_and_val_testing_set_is_test(layouts):
    data, out, _ = layouts["idrid"]
    truth = data / "B. Disease Grading" / "2. Groundtruths"
    train = rows(next(truth.glob("*Training*")))
    test = rows(next(truth.glob("*Testing*")))
    counts = split_counts(out)
    assert counts["train"] + counts["val"] == len(train) and counts["val"] > 0
    assert counts["test"] == len(test) and rejects(out) == []
    paths = {r.path for r in read_sample_table(out).values()}
    both = {p for p in paths if p.endswith("IDRiD_001.jpg")}
    assert len(both) == 2  # the same name in both sets: two images, two keys


def test_ddr_valid_is_val_and_grade_5_is_ungradable(layouts):
    data, out, _ = layouts["ddr"]
    lists = {s: rows(data / "DR_grading" / f"{s}.txt", sep="") for s in ("train", "valid", "test")}
    graded = {s: sum(r[1] != "5" for r in lines) for s, lines in lists.items()}
    assert split_counts(out) == {
        "train": graded["train"],
        "val": graded["valid"],
        "test": graded["test"],
    }
    n5 = sum(r[1] == "5" for lines in lists.values() for r in lines)
    assert n5 > 0 and [r["reason"] for r in rejects(out)] == ["ungradable"] * n5


def test_layout_can_be_forced_and_a_wrong_one_is_refused(layouts, tmp_path):
    data = layouts["eyepacs"][0]
    assert read_source(data, layout="kaggle").layout == "eyepacs"
    with pytest.raises(UserError, match="not in the ddr layout"):
        read_source(data, layout="ddr")


def test_split_as_test_packs_a_whole_external_set(layouts, tmp_path):
    data = layouts["aptos"][0]
    _, printed = run_pack(data, tmp_path / "ext", split_as="test")
    counts = split_counts(tmp_path / "ext")
    assert counts["train"] == counts["val"] == 0 and counts["test"] == len(rows(data / "train.csv"))
    assert "no train split" in printed and "warning" not in printed


# ---------------------------------------------------------------- names and formats


def png16(grey: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG of ``grey`` (uint16), written by hand: PIL saves it as I;16."""
    h, w = grey.shape
    raw = b"".join(b"\x00" + grey[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    head = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", head)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def fundus_grey(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:48, :48]
    disc = np.hypot(yy - 24, xx - 24) < 20
    return np.where(disc, 60 + rng.integers(0, 40, (48, 48)), 0).astype(np.uint8)


def test_16_bit_image_keeps_its_brightness():
    grey = fundus_grey()
    as8 = np.asarray(open_image(_png(grey)), np.float64).mean()
    as16 = np.asarray(open_image(png16(grey.astype(np.uint16) * 257)), np.float64).mean()
    assert as8 > 20 and abs(as16 - as8) < 0.5


def _png(arr: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, fmt)
    return buf.getvalue()


def test_any_name_and_format_packs_and_verifies_with_original_paths(tmp_path):
    grey = fundus_grey(1)
    rgb = np.stack([grey, grey // 2, grey // 3], axis=2)
    files = {
        "clinic A/Patient 0 OD.jpg": _png(rgb, fmt="JPEG"),
        "clinic B/Patient 0 OD.jpg": _png(rgb, fmt="JPEG"),  # same name, another folder
        "clinic B/Über scan.v2.final.tif": _png(rgb, "RGBA", "TIFF"),
        "clinic B/palette.bmp": _png(rgb, "P", "BMP"),
        "clinic B/deep.png": png16(grey.astype(np.uint16) * 257),
    }
    data = tmp_path / "data"
    for name, payload in files.items():
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(payload)
    lines = ["image,grade,split"] + [f"{name},{i % 5},test" for i, name in enumerate(files)]
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    result, _ = run_pack(data, out, labels=data / "labels.csv", val_fraction=0)
    assert result.rejects == [] and split_counts(out)["test"] == len(files)
    assert verify_shards(out).problems == []
    table = read_sample_table(out)
    assert sorted(r.path for r in table.values()) == sorted(files)
    assert all(key_problem(k) is None for k in table)
    assert {"clinic-A-Patient-0-OD", "clinic-B-Patient-0-OD", "Uber-scan-v2-final"} <= set(table)


def test_keys_are_valid_and_unique():
    assert make_key("10_left") == "10_left" and make_key("Patient 0 OD") == "Patient-0-OD"
    assert make_key("_x.y") == "x-y" and key_problem(make_key("名前")) is None
    long = make_key("a" * 200)
    assert key_problem(long) is None and long != make_key("a" * 199)
    assert unique_keys(["a", "a", "a", "b"], ["f", "g", "g", ""]) == ["f-a", "g-a", "g-a-2", "b"]
    assert key_problem("has space") is not None


def test_rejects_show_the_original_path(tmp_path):
    data = tmp_path / "data"
    (data / "my photos").mkdir(parents=True)
    (data / "my photos" / "bad one.jpg").write_bytes(b"<html>not a photo</html>")
    (data / "my photos" / "good.png").write_bytes(_png(np.stack([fundus_grey()] * 3, axis=2)))
    (data / "l.csv").write_text("image,level\nbad one.jpg,1\ngood,2\nnowhere,0\n")
    out = tmp_path / "s"
    run_pack(data, out, labels=data / "l.csv", val_fraction=0, test_fraction=0)
    assert [(r["reason"], r["path"]) for r in rejects(out)] == [
        ("missing", ""),
        ("not an image", "my photos/bad one.jpg"),
    ]


# ---------------------------------------------------------------- label files


@pytest.mark.parametrize(
    "text",
    [
        "image\tlevel\tsplit\na.jpg\t2.0\tvalid\nb\t1\t\n",
        "Image name;Retinopathy grade ;Set\na;2;validation\nb;1;\n",
        "a.jpg 2 dev\nb 1\n",
        "id_code,diagnosis,split\n\na,2,val\n,,\nb,1,\n,,\n",
    ],
    ids=["tab", "semicolon-idrid-names", "whitespace-no-header", "blank-rows"],
)
def test_label_files_are_sniffed(tmp_path, text):
    path = tmp_path / "labels.txt"
    path.write_text(text)
    table = read_table(path)
    assert [(r.image.split(".")[0], parse_grade(r.grade), r.split.lower()[:1]) for r in table] == [
        ("a", 2, "v" if "dev" not in text else "d"),
        ("b", 1, ""),
    ]


def test_named_columns_relative_paths_and_patient_grouping(tmp_path):
    data = tmp_path / "data"
    pixels = _png(np.stack([fundus_grey()] * 3, axis=2))
    for name in ("x/p1a.png", "x/p1b.png", "y/p2a.png", "y/p2b.png", "y/p3a.png"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(pixels)
    (data / "l.csv").write_text(
        "File,Score,Who,Part\nx/p1a.png,1.0,P1,test\nx/p1b,2,P1,\ny/p2a,0,P2,\ny/p2b,3,P2,\ny/p3a,4,P3,train\n"
    )
    options = Options(image_col="file", grade_col="score", patient_col="who", split_col="part")
    src = read_source(data, data / "l.csv", options=options)
    assert src.rejects == [] and [s.patient for s in src.samples] == ["P1", "P1", "P2", "P2", "P3"]
    out = tmp_path / "s"
    run_pack(
        data,
        out,
        labels=data / "l.csv",
        image_col="file",
        grade_col="score",
        patient_col="who",
        split_col="part",
        test_fraction=0.5,
    )
    table = read_sample_table(out)
    assert table["p1a"].split == table["p1b"].split == "test"  # the listed split, for the patient
    assert table["p2a"].split == table["p2b"].split
    assert verify_shards(out).problems == []
    # --verify groups by the patient column: one patient across two splits is found
    text = (out / "samples.csv").read_text().replace(",P3,", ",P1,")
    (out / "samples.csv").write_text(text)
    assert any("patient P1 has images in" in p for p in verify_shards(out).problems)


# ---------------------------------------------------------------- folders and warnings


def test_symlinked_folder_is_searched_and_a_loop_reported_once(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "1_left.jpeg").write_bytes(b"\xff\xd8")
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    os.symlink(elsewhere, data / "train" / "linked")
    os.symlink(data, elsewhere / "back")  # a loop
    (data / "trainLabels.csv").write_text("image,level\n1_left,0\n")
    src = read_source(data)
    assert [s.source for s in src.samples] == ["train/linked/1_left.jpeg"] and src.rejects == []
    loops = [n for n in src.notes if "symlink loop" in n]
    assert len(loops) == 1


def test_many_rejects_warn_and_strict_fails(tmp_path):
    data = tmp_path / "data"
    generate(data, n=10, size=SIZE, layout="kaggle", seed=9)
    for name in ("1_left", "2_right"):
        (data / "train" / f"{name}.jpeg").unlink()
    _, printed = run_pack(data, tmp_path / "s", val_fraction=0)
    assert "warning: 2 of 10 listed images (20 %) were rejected: missing 2" in printed
    with pytest.raises(UserError, match="2 inputs were rejected"):
        run_pack(data, tmp_path / "s2", val_fraction=0, strict=True)


def test_an_empty_split_warns_and_strict_fails(tmp_path):
    data = tmp_path / "data"
    generate(data, n=6, size=SIZE, layout="kaggle", seed=9)
    _, printed = run_pack(data, tmp_path / "s", val_fraction=0.01)
    assert "warning: split val is empty" in printed and "no val split" in printed
    with pytest.raises(UserError, match="split val is empty"):
        run_pack(data, tmp_path / "s2", val_fraction=0.01, strict=True)


def test_predictions_show_the_original_path_and_listed_patient(tmp_path):
    import pandas as pd

    from pipeline.samplelist import SampleRecord, write_sample_table
    from trainer.evaluate import with_originals

    write_sample_table(
        tmp_path / "samples.csv",
        [SampleRecord("Patient-0-OD", "test", 2, "P0", "clinic A/Patient 0 OD.jpg")],
    )
    table = pd.DataFrame({"key": ["Patient-0-OD", "other"], "patient": ["Patient-0-OD", "other"]})
    table = with_originals(table, tmp_path)
    assert list(table["path"]) == ["clinic A/Patient 0 OD.jpg", ""]
    assert list(table["patient"]) == ["P0", "other"]
