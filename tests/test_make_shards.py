"""tools/make_shards.py end to end: round trips through webdataset and DALI, bad inputs, reruns."""

from __future__ import annotations

import csv
import io
import itertools
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from rich.console import Console

from pipeline.cli import build_parser, run_cli
from pipeline.constants import SPLITS
from pipeline.fileio import file_sha256
from pipeline.manifest import read_manifest, verify_split
from pipeline.writing import packing
from pipeline.writing.packing import PackConfig, pack
from pipeline.writing.preprocess import jpeg_frame
from tools import make_shards
from tools.make_synthetic import generate

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


@dataclass
class Run:
    data: Path
    out: Path
    labels: dict[str, int]  # every input id -> grade
    splits: dict[str, set[str]] | None  # lab layout: ids per split as the CSVs say
    stdout: str


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_shards.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def kaggle_run(tmp_path_factory) -> Run:
    """40 synthetic 144x96 photos (black side borders) -> 64 px shards of 12, two workers."""
    root = tmp_path_factory.mktemp("kaggle")
    items = generate(root / "data", n=40, size=96, width=144, layout="kaggle", seed=1)
    proc = run_tool(
        root / "data",
        root / "shards",
        "--size",
        SIZE,
        "--shard-size",
        12,
        "--workers",
        2,
        "--seed",
        5,
    )
    assert proc.returncode == 0, proc.stderr
    return Run(root / "data", root / "shards", dict(items), None, proc.stdout)


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory) -> Run:
    """30 synthetic photos already 64x64 -> packed as they are, in one process."""
    root = tmp_path_factory.mktemp("lab")
    items = generate(root / "data", n=30, size=SIZE, layout="lab", seed=2)
    proc = run_tool(
        root / "data", root / "shards", "--size", SIZE, "--shard-size", 8, "--workers", 1
    )
    assert proc.returncode == 0, proc.stderr
    splits = {
        s: set((root / "data" / f"{s}_img.csv").read_text().split()) for s in ("train", "test")
    }
    return Run(root / "data", root / "shards", dict(items), splits, proc.stdout)


RUNS = ["kaggle_run", "lab_run"]


def read_webdataset(out: Path, split: str) -> list[tuple[str, int, bytes]]:
    urls = [str(p) for p in read_manifest(out).tar_paths(split)]
    return [
        (s["__key__"], int(s["cls"]), s["jpg"]) for s in wds.WebDataset(urls, shardshuffle=False)
    ]


def read_dali(out: Path, split: str) -> list[tuple[str, int, bytes]]:
    """Every sample of ``split`` through DALI's own webdataset reader on the CPU."""
    from nvidia.dali import fn, pipeline_def

    manifest = read_manifest(out)
    batch = 4

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def reader():
        jpegs, labels = fn.readers.webdataset(
            paths=[str(p) for p in manifest.tar_paths(split)],
            index_paths=[str(p) for p in manifest.index_paths(split)],
            ext=["jpg", "cls"],
            missing_component_behavior="error",
            pad_last_batch=True,
            name="wds",
        )
        return jpegs, labels, fn.get_property(jpegs, key="source_info")

    pipe = reader()
    pipe.build()
    n = pipe.reader_meta("wds")["epoch_size"]
    samples = []
    for _ in range(-(-n // batch)):
        jpegs, labels, info = pipe.run()
        for i in range(len(jpegs)):
            name = bytes(np.array(info[i])).decode().rsplit(":", 1)[1]  # "path:offset:key.jpg"
            samples.append(
                (
                    name.removesuffix(".jpg"),
                    int(bytes(np.array(labels[i])).decode()),
                    bytes(np.array(jpegs[i])),
                )
            )
    return samples[:n]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("run_name", RUNS)
@pytest.mark.parametrize("reader", [read_webdataset, read_dali], ids=["webdataset", "dali"])
def test_every_sample_reads_back_with_its_key_and_label(request, run_name, reader):
    run: Run = request.getfixturevalue(run_name)
    manifest = read_manifest(run.out)
    seen, keys = {}, {}
    assert manifest.has("val")  # carved out of train by default (--val-fraction 0.1)
    for split in SPLITS:
        samples = reader(run.out, split)
        assert len(samples) == manifest.split(split).samples
        assert (
            tuple(np.bincount([lab for _, lab, _ in samples], minlength=5))
            == manifest.split(split).class_counts
        )
        keys[split] = {key for key, _, _ in samples}
        for key, label, jpeg in samples:
            assert jpeg_frame(io.BytesIO(jpeg)) == (0xC0, SIZE, SIZE, 3)  # baseline RGB, square
            seen[key] = label
    assert seen == run.labels
    if run.splits is not None:  # lab: test as the lists say, val out of the train list
        assert keys["test"] == run.splits["test"]
        assert keys["train"] | keys["val"] == run.splits["train"]


@pytest.mark.parametrize("run_name", RUNS)
def test_index_files_equal_wds2idx(request, run_name, wds2idx, tmp_path):
    out = request.getfixturevalue(run_name).out
    manifest = read_manifest(out)
    for split in SPLITS:
        for tar, idx in zip(manifest.tar_paths(split), manifest.index_paths(split), strict=True):
            ref = tmp_path / f"{tar.stem}.idx"
            subprocess.run([wds2idx, str(tar), str(ref)], check=True, capture_output=True)
            assert ref.read_text() == idx.read_text()


@pytest.mark.parametrize("run_name", RUNS)
def test_manifest_counts_and_sha256_match_the_files(request, run_name):
    run: Run = request.getfixturevalue(run_name)
    manifest = read_manifest(run.out)
    on_disk = sorted(p.name for p in run.out.iterdir() if not p.name.startswith("."))
    listed = sorted(
        n for s in manifest.splits.values() for sh in s.shards for n in (sh.file, sh.index)
    )
    assert on_disk == sorted([*listed, "manifest.json", "rejects.csv", "samples.csv"])
    for split in SPLITS:
        verify_split(manifest, split, full=True)
        for shard in manifest.split(split).shards:
            tar = run.out / shard.file
            assert file_sha256(tar) == shard.sha256 and tar.stat().st_size == shard.bytes
            with tarfile.open(tar) as t:
                assert len(t.getnames()) == 2 * shard.samples
    assert manifest.report["rejected"] == 0 and manifest.source["path"] == str(run.data.resolve())
    assert sum(manifest.split(split).samples for split in SPLITS) == len(run.labels)
    assert (run.out / "rejects.csv").read_text().strip() == "image,reason,path"


def test_kaggle_split_shares_no_patient(kaggle_run):
    manifest = read_manifest(kaggle_run.out)
    assert (
        manifest.source["layout"] == "eyepacs" and manifest.report["patients_in_both_splits"] == 0
    )
    patients = {
        split: {k.rsplit("_", 1)[0] for k, _, _ in read_webdataset(kaggle_run.out, split)}
        for split in SPLITS
    }
    assert all(patients.values())
    assert not patients["train"] & patients["test"] and not patients["train"] & patients["val"]
    assert not patients["val"] & patients["test"]


def test_pass_through_packs_the_original_bytes(lab_run):
    for split in SPLITS:
        for key, _, jpeg in read_webdataset(lab_run.out, split):
            assert jpeg == (lab_run.data / "images" / f"{key}.jpeg").read_bytes()


def test_raw_3_2_photos_are_cropped_to_the_eye(kaggle_run):
    key, _, jpeg = read_webdataset(kaggle_run.out, "train")[0]
    arr = np.asarray(Image.open(io.BytesIO(jpeg)))
    assert arr.shape == (SIZE, SIZE, 3)
    # The black side borders are gone: the retina reaches the left and right edges of the middle row.
    assert arr[SIZE // 2, 1].max() > 30 and arr[SIZE // 2, -2].max() > 30


def test_train_is_shuffled_test_sorted(kaggle_run):
    train = [k for k, _, _ in read_webdataset(kaggle_run.out, "train")]
    test = [k for k, _, _ in read_webdataset(kaggle_run.out, "test")]
    assert test == sorted(test) and train != sorted(train)


def test_summary_table_and_cli_matches_config(kaggle_run):
    assert "grade 4" in kaggle_run.stdout and "train" in kaggle_run.stdout
    # for people and for files: the options as typed, not a dict, and no terminal escapes
    first = kaggle_run.stdout.splitlines()[0]
    assert first.endswith(f"(--image-size {SIZE} --shard-size 12 --workers 2 --seed 5)"), first
    assert "{" not in kaggle_run.stdout and "\x1b" not in kaggle_run.stdout
    parser = build_parser(PackConfig, "make_shards.py", "")
    options = {a.dest for a in parser._actions if a.dest != "help"}
    assert options == {f.name for f in fields(PackConfig)}


# ---------------------------------------------------------------- bad inputs


def eye_jpeg(seed: int, size: int = SIZE, **save) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 10, (size, size + size // 2, 3), dtype=np.uint8)
    yy, xx = np.ogrid[:size, : size + size // 2]
    img[np.hypot(xx - (size * 1.5 - 1) / 2, yy - (size - 1) / 2) < size / 2 - 1] = rng.integers(
        60, 220, 3
    )
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def lab_folder(
    root: Path,
    extra: list[tuple[str, str, bytes | None]] = (),
    ext: str = ".jpeg",
    square: bool = False,
) -> Path:
    """Four good train images and one test image, plus ``extra`` train rows (id, label, file bytes).

    The five are 3:2 photos (decoded and cropped), or with ``square`` already SIZE x SIZE.
    """
    images = root / "images"
    images.mkdir(parents=True)
    image = square_jpeg if square else eye_jpeg
    rows = {
        "train": [(f"{i}_left", str(i), image(i)) for i in range(4)],
        "test": [("9_left", "1", image(9))],
    }
    rows["train"] += list(extra)
    for split, entries in rows.items():
        (root / f"{split}_img.csv").write_text("".join(f"{key}\n" for key, _, _ in entries))
        (root / f"{split}_label.csv").write_text("".join(f"{label}\n" for _, label, _ in entries))
        for key, _, data in entries:
            if data is not None:
                (images / f"{key}{ext}").write_bytes(data)
    return root


def square_jpeg(seed: int, size: int = SIZE, **save) -> bytes:
    """A baseline RGB JPEG already ``size`` x ``size``: packed as its original bytes."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
        buf, "JPEG", quality=90, **save
    )
    return buf.getvalue()


def run_pack(data: Path, out: Path, **kw) -> packing.PackResult:
    cfg = PackConfig(
        data,
        out,
        size=SIZE,
        shard_size=kw.pop("shard_size", 3),
        workers=kw.pop("workers", 1),
        quiet=True,
        **kw,
    )
    return pack(cfg, console=Console(file=io.StringIO()))


def rejects_of(out: Path) -> list[tuple[str, str]]:
    with open(out / "rejects.csv", newline="") as f:
        return [tuple(row[:2]) for row in list(csv.reader(f))[1:]]  # image, reason (not path)


def bomb() -> bytes:
    data = bytearray(eye_jpeg(0))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2  # the header claims 60000x60000
    return bytes(data)


@pytest.mark.parametrize(
    "label, data, reason",
    [
        ("1", None, "missing"),
        ("1", b"", "empty file"),
        ("1", eye_jpeg(7)[:700], "truncated"),
        ("1", b"<html>not a photo</html>", "not an image"),
        ("1", bomb(), "too large"),
        ("7", eye_jpeg(7), "bad label: '7' is not an integer 0-4"),
        ("x", eye_jpeg(7), "bad label: 'x' is not an integer 0-4"),
        ("1.5", eye_jpeg(7), "bad label: '1.5' is not an integer 0-4"),
    ],
    ids=[
        "missing",
        "empty",
        "truncated",
        "not-an-image",
        "decompression-bomb",
        "label-7",
        "label-x",
        "label-1.5",
    ],
)
def test_bad_input_is_rejected_with_its_reason(tmp_path, label, data, reason):
    out = tmp_path / "shards"
    result = run_pack(lab_folder(tmp_path / "data", [("5_left", label, data)]), out)
    assert rejects_of(out) == [("5_left", reason)]
    assert result.manifest.report["rejected"] == 1 and result.manifest.splits["train"].samples == 4
    assert read_manifest(out).split("train").samples == 4


def test_duplicate_id_is_rejected_saying_which(tmp_path):
    out = tmp_path / "shards"
    # listed again with its grade: kept once (another grade: tests/test_hostile.py)
    run_pack(lab_folder(tmp_path / "data", [("2_left", "2", None)]), out)
    assert rejects_of(out) == [
        ("2_left", "duplicate: listed again at train_img.csv line 5, kept train_img.csv line 3")
    ]
    labels = {k: lab for k, lab, _ in read_webdataset(out, "train")}
    assert labels["2_left"] == 2


def test_unequal_csv_lengths_reject_the_unmatched_rows(tmp_path):
    data = lab_folder(tmp_path / "data", [("5_left", "1", eye_jpeg(5))])
    (data / "train_label.csv").write_text("0\n1\n2\n3\n")
    out = tmp_path / "shards"
    run_pack(data, out)
    assert rejects_of(out) == [("5_left", "no label: train_img.csv has 5 rows, train_label.csv 4")]
    assert read_manifest(out).split("train").samples == 4


def test_grayscale_cmyk_png_and_upper_case_extension_are_packed(tmp_path):
    rgb = Image.open(io.BytesIO(eye_jpeg(11)))
    encoded = {}
    for key, mode, fmt in (
        ("g_left", "L", "JPEG"),
        ("c_left", "CMYK", "JPEG"),
        ("p_left", "RGB", "PNG"),
    ):
        buf = io.BytesIO()
        rgb.convert(mode).save(buf, fmt)
        encoded[key] = buf.getvalue()
    data = lab_folder(tmp_path / "data", [(k, "2", v) for k, v in encoded.items()])
    (data / "images" / "u_left.JPEG").write_bytes(eye_jpeg(12))
    (data / "train_img.csv").write_text((data / "train_img.csv").read_text() + "u_left\n")
    (data / "train_label.csv").write_text((data / "train_label.csv").read_text() + "3\n")
    out = tmp_path / "shards"
    # no val: too few images to carve one, which --strict would refuse as an empty split
    result = run_pack(data, out, strict=True, val_fraction=0)
    assert result.rejects == []
    packed = {k: jpeg for k, _, jpeg in read_webdataset(out, "train")}
    for key in (*encoded, "u_left"):
        img = Image.open(io.BytesIO(packed[key]))
        assert (
            img.mode == "RGB"
            and img.size == (SIZE, SIZE)
            and jpeg_frame(io.BytesIO(packed[key]))[0] == 0xC0
        )


def exit_of(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as err:
        run_cli(lambda: make_shards.main([str(a) for a in argv]))
    return err.value.code, capsys.readouterr().err


def test_empty_folder_exits_2_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_tool(tmp_path / "empty", tmp_path / "out", "--quiet")
    assert proc.returncode == 2
    assert (
        proc.stderr.count("\n") == 1
        and "looked for train_img.csv" in proc.stderr
        and "Traceback" not in proc.stderr
    )
    assert not (tmp_path / "out").exists()


def test_unrecognised_folder_and_unknown_option_exit_2(tmp_path, capsys):
    (tmp_path / "photo.jpg").write_bytes(eye_jpeg(0))
    code, err = exit_of([tmp_path, tmp_path / "out", "--quiet"], capsys)
    assert code == 2 and err.startswith("error: no recognised input") and err.count("\n") == 1
    code, err = exit_of([tmp_path, tmp_path / "out", "--sise", "64"], capsys)
    assert code == 2 and "unrecognized arguments: --sise" in err


def test_unwritable_output_exits_2(tmp_path, capsys):
    data = lab_folder(tmp_path / "data")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = exit_of([data, blocker / "shards", "--quiet"], capsys)
    assert (
        code == 2
        and err.startswith("error: cannot write to output folder")
        and err.count("\n") == 1
    )


def test_strict_exits_nonzero_but_writes_rejects(tmp_path, capsys):
    data = lab_folder(tmp_path / "data", [("5_left", "1", None), ("6_left", "2", b"")])
    out = tmp_path / "shards"
    code, err = exit_of([data, out, "--quiet", "--strict", "--size", SIZE], capsys)
    assert code == 2 and "1 input was rejected (--strict)" in err and err.count("\n") == 1
    assert rejects_of(out) == [("5_left", "missing")]  # found before any image was decoded
    assert not (out / "manifest.json").exists()
    (data / "images" / "5_left.jpeg").write_bytes(eye_jpeg(5))
    code, err = exit_of([data, out, "--quiet", "--strict", "--size", SIZE], capsys)
    assert (
        code == 2
        and "1 input was rejected" in err
        and rejects_of(out) == [("6_left", "empty file")]
    )
    assert not (out / "manifest.json").exists()


# ---------------------------------------------------------------- reruns and interruptions


def shard_bytes(out: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(out.iterdir()) if p.suffix in (".tar", ".idx")}


def without_created(manifest) -> dict:
    return {k: v for k, v in manifest.to_json().items() if k != "created"}


def test_rerun_gives_identical_shards_and_reuses_them(tmp_path):
    data = lab_folder(
        tmp_path / "data", [(f"{i}_right", str(i % 5), eye_jpeg(20 + i)) for i in range(6)]
    )
    first = run_pack(data, tmp_path / "a")
    before = shard_bytes(tmp_path / "a")
    again = run_pack(data, tmp_path / "a")
    assert again.reused_shards == len(before) // 2 and shard_bytes(tmp_path / "a") == before
    assert without_created(again.manifest) == without_created(first.manifest)
    # A fresh folder, built from scratch by two worker processes, holds the same bytes.
    cfg = PackConfig(data, tmp_path / "b", size=SIZE, shard_size=3, workers=2, quiet=True)
    fresh = pack(cfg, console=Console(file=io.StringIO()))
    assert fresh.reused_shards == 0 and shard_bytes(tmp_path / "b") == before


def test_rerun_rebuilds_what_changed_and_removes_stale_shards(tmp_path):
    data = lab_folder(tmp_path / "data", [(f"{i}_right", "0", eye_jpeg(20 + i)) for i in range(6)])
    run_pack(data, tmp_path / "out", shard_size=2, val_fraction=0)  # shard lists, no val to move
    assert (tmp_path / "out" / "train-000004.tar").exists()
    labels = (data / "train_label.csv").read_text().splitlines()
    labels[-1] = "4"
    (data / "train_label.csv").write_text("\n".join(labels) + "\n")
    result = run_pack(data, tmp_path / "out", shard_size=4, val_fraction=0)
    assert sorted(shard_bytes(tmp_path / "out")) == [
        "test-000000.idx",
        "test-000000.tar",
        "train-000000.idx",
        "train-000000.tar",
        "train-000001.idx",
        "train-000001.tar",
        "train-000002.idx",
        "train-000002.tar",
    ]
    assert result.reused_shards == 1  # the test shard
    assert {k: lab for k, lab, _ in read_webdataset(tmp_path / "out", "train")}["5_right"] == 4


def test_parallel_pass_through_gives_the_same_bytes_and_rejects(tmp_path):
    """Pass-through shards written by worker processes equal those of one process, even when
    a shard's chunk holds files that need decoding or are rejected (the worker gives it back)."""
    extra = [(f"{i}_right", str(i % 5), square_jpeg(30 + i)) for i in range(14)]
    extra[5] = ("5_right", "0", eye_jpeg(5))  # not square: decoded, in the middle of a chunk
    extra[8] = ("8_right", "1", square_jpeg(8)[:-300])  # cut short: rejected as truncated
    extra[9] = ("9_right", "2", None)  # missing
    extra[11] = (
        "11_right",
        "3",
        square_jpeg(11, icc_profile=bytes(100_000)),
    )  # the frame after 100 KB
    data = lab_folder(tmp_path / "data", extra)
    one = run_pack(data, tmp_path / "one", shard_size=4)
    two = run_pack(data, tmp_path / "two", shard_size=4, workers=2)
    assert (
        shard_bytes(tmp_path / "two") == shard_bytes(tmp_path / "one")
        and len(shard_bytes(tmp_path / "one")) == 12
    )
    assert (
        rejects_of(tmp_path / "two")
        == rejects_of(tmp_path / "one")
        == [("9_right", "missing"), ("8_right", "truncated")]
    )
    assert without_created(two.manifest) | {"config": None} == without_created(one.manifest) | {
        "config": None
    }
    packed = {k: jpeg for k, _, jpeg in read_webdataset(tmp_path / "two", "train")}
    for key, _, original in extra:
        if key not in ("5_right", "8_right", "9_right"):
            assert packed[key] == original
    assert packed["5_right"] != extra[5][2] and jpeg_frame(io.BytesIO(packed["5_right"])) == (
        0xC0,
        SIZE,
        SIZE,
        3,
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_run_leaves_no_manifest_and_no_partial_shard(
    tmp_path, monkeypatch, wds2idx, workers
):
    # every image passes through: with two workers, each shard is written in a worker process
    data = lab_folder(
        tmp_path / "data", [(f"{i}_right", "1", square_jpeg(20 + i)) for i in range(6)], square=True
    )
    out = tmp_path / "out"
    run_pack(data, out, val_fraction=0)
    assert (out / "manifest.json").exists()

    real_write = packing.write_shard
    cut_in = tmp_path / "cut-in-process"

    def dies_halfway(path, samples, **kwargs):
        if path.name == "train-000001.tar":  # the source fails in the middle of the second shard
            cut_in.write_text(str(os.getpid()))
            samples = itertools.chain(itertools.islice(samples, 2), _power_cut())
        return real_write(path, samples, **kwargs)

    # forked workers inherit the patched function (spawned ones would not: nothing would fail)
    monkeypatch.setattr(packing, "write_shard", dies_halfway)
    with pytest.raises(RuntimeError, match="power cut"):
        run_pack(data, out, shard_size=4, seed=1, workers=workers, val_fraction=0)
    assert (cut_in.read_text() == str(os.getpid())) == (
        workers == 1
    )  # with 2, the cut hit a worker
    assert not (out / "manifest.json").exists()  # the earlier run's manifest no longer lies
    assert not [p for p in out.iterdir() if "partial" in p.name]
    for tar in out.glob("*.tar"):  # whatever is there is whole and indexed
        ref = tmp_path / "ref.idx"
        subprocess.run([wds2idx, str(tar), str(ref)], check=True, capture_output=True)
        assert ref.read_text() == tar.with_suffix(".idx").read_text()

    monkeypatch.setattr(packing, "write_shard", real_write)
    result = run_pack(data, out, shard_size=4, seed=1, val_fraction=0)
    assert (
        result.reused_shards == 2
    )  # train-000000, finished before the cut, and the unchanged test shard
    manifest = read_manifest(out)
    assert manifest.split("train").samples == 10 and manifest.split("test").samples == 1
    verify_split(manifest, "train", full=True)


def _power_cut():
    raise RuntimeError("power cut")
    yield
