"""Hostile input: each attack of the bad-input review, built here, and what must come of it.

Nothing is written outside an output folder, nothing is overwritten that a run does not own,
nothing hangs, and nothing is silently wrong: every case ends in a reject with its reason or
one line and exit 2.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import UserError
from pipeline.fileio import HOST, folder_lock, inside, md_cell, safe_cell
from pipeline.manifest import read_manifest, verify_split
from pipeline.samplelist import SampleRecord, write_sample_table
from pipeline.shardformat import read_index
from pipeline.verify import verify_shards
from pipeline.writing.preprocess import BadImage, open_image, prepare
from pipeline.writing.sources import read_source
from tests.conftest import ROOT, build_shard_dir, python, untrained_best
from tools.make_synthetic import render_fundus
from trainer.base.bestfile import load_best
from trainer.base.model import read_state_dict
from trainer.fitting.checkpoint import CHECKPOINTS, save_last

SIZE = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    return untrained_best(path, image_size=SIZE, config={"batch_size": 4, "backend": "torch"})


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    return build_shard_dir(tmp_path_factory.mktemp("shards"), {"train": 10, "test": 6}, SIZE, 10)


def photo(path: Path, size: int = 96, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_fundus(2, np.random.default_rng(seed), size)).save(path)
    return path


def one_line_exit_2(proc: subprocess.CompletedProcess, words: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and words in proc.stderr, proc.stderr[-2000:]


# ---------------------------------------------------------------- 1. names that climb out


def climbing_copy(shards: Path, out: Path) -> Path:
    """``shards`` with the test shard's members and index lines renamed ``../../evil/KEY.ext``
    and the manifest's size and sha256 rewritten to match: only the names give it away."""
    import shutil

    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["splits"]["test"]["shards"][0]
    tar_path, idx_path = out / entry["file"], out / entry["index"]
    refs = read_index(idx_path, entry["file"])
    data = tar_path.read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for ref in refs:
            for ext, (offset, size) in (("jpg", ref.jpg), ("cls", ref.cls)):
                info = tarfile.TarInfo(f"../../evil/{ref.key}.{ext}")
                info.size = size
                tar.addfile(info, io.BytesIO(data[offset : offset + size]))
    tar_path.write_bytes(buf.getvalue())
    with tarfile.open(tar_path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    lines = [f"v1.2 {len(refs)}"]
    for ref in refs:
        parts = []
        for ext in ("jpg", "cls"):
            m = members[f"../../evil/{ref.key}.{ext}"]
            parts.append(f"{ext} {m.offset_data} {m.size} {m.name}")
        lines.append(" ".join(parts))
    idx_path.write_text("\n".join(lines) + "\n")
    entry["bytes"] = tar_path.stat().st_size
    entry["sha256"] = hashlib.sha256(tar_path.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_member_names_that_climb_out_are_refused_by_readers_and_verify(small_shards, tmp_path):
    bad = climbing_copy(small_shards, tmp_path / "bad")
    manifest = read_manifest(bad)
    with pytest.raises(UserError, match="test-000000.tar"):
        verify_split(manifest, "test")  # what every loader does at start
    report = verify_shards(bad)
    assert any("test-000000.tar" in p for p in report.problems), report.problems
    proc = python("tools/make_shards.py", "--verify", bad, tmp=tmp_path, check=False)
    assert proc.returncode != 0 and "verified" not in proc.stdout


def test_manifest_file_names_outside_the_folder_are_refused(small_shards, tmp_path):
    import shutil

    shutil.copytree(small_shards, tmp_path / "m")
    manifest = json.loads((tmp_path / "m/manifest.json").read_text())
    manifest["splits"]["test"]["shards"][0]["file"] = "../elsewhere/test-000000.tar"
    (tmp_path / "m/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="not a .tar file name"):
        read_manifest(tmp_path / "m")


def test_output_paths_resolve_inside_their_folder(tmp_path):
    assert inside(tmp_path / "cam", "10_left.png") == (tmp_path / "cam/10_left.png").resolve()
    for name in ("../x.png", "../../evil/x.png", "/etc/x.png", "."):
        with pytest.raises(UserError, match="outside"):
            inside(tmp_path / "cam", name)


# ---------------------------------------------------------------- 2. one run per folder


def foreign(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True)
    for name in ("best.pt", "config.json", "report.html", "summary.json"):
        (folder / name).write_bytes(f"someone's {name}".encode())
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("case", ["foreign", "locked", "file"])
def test_train_out_refused_before_any_work(case, tiny_shards, tmp_path):
    """In process (a UserError is one line and exit 2 from the command: pipeline.cli)."""
    from trainer.train import main as train

    out = tmp_path / "out"
    args = ["--shards", str(tiny_shards), "--out", str(out), "--image-size", "32"]
    args += ["--epochs", "1", "--backend", "torch", "--workers", "0", "--quiet"]
    if case == "foreign":
        before = foreign(out)
        with pytest.raises(UserError, match="not a run of this project"):
            train(args)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    elif case == "file":
        out.write_text("a file")
        with pytest.raises(UserError, match="is a file, not a folder"):
            train(args)
    else:
        out.mkdir()
        with folder_lock(out, "train"), pytest.raises(UserError, match="is writing to"):
            train(args)
        assert not (out / "metrics.jsonl").exists()


def test_checkpoint_temp_folder_is_the_writers_own(tmp_path, monkeypatch):
    """Two trainings in one folder once shared ``.last.partial`` (one crashed); a live
    writer's temp folder is left alone, and this one's carries host and pid."""
    other = tmp_path / CHECKPOINTS / f".last.{HOST}.{os.getppid()}.partial"  # alive, writing
    other.mkdir(parents=True)
    renamed = []
    real = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (renamed.append(Path(a).name), real(a, b)))
    save_last(tmp_path, {"epoch": 1, "model": {}, "config": {}})
    assert other.is_dir() and (tmp_path / CHECKPOINTS / "last/info.json").exists()
    assert renamed == [f".last.{HOST}.{os.getpid()}.partial"]


def predict(checkpoint: Path, out: Path, *inputs, tmp: Path, cwd: Path = ROOT):
    cmd = [sys.executable, str(ROOT / "tools/predict.py"), "--checkpoint", str(checkpoint)]
    return subprocess.run(
        [*cmd, *map(str, inputs), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_HOME": str(tmp / "torch")},
    )


def test_predict_out_locked_or_a_file_is_one_line(checkpoint, tmp_path):
    photos = photo(tmp_path / "photos/1_left.jpeg").parent
    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out, "predict"):
        one_line_exit_2(predict(checkpoint, out, photos, tmp=tmp_path), f"is writing to {out}")
    assert not (out / "predictions.csv").exists()
    (tmp_path / "file").write_text("x")
    from tools.predict import main as predict_main

    with pytest.raises(UserError, match="is a file, not a folder"):  # before the model loads
        predict_main(["--checkpoint", str(tmp_path / "none.pt"), str(photos), "--out", str(tmp_path / "file")])  # fmt: skip


def test_evaluate_and_fuse_out_locked_is_one_line(checkpoint, small_shards, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    args = ["--checkpoint", checkpoint, "--shards", small_shards, "--out", out]
    with folder_lock(out, "evaluate"):
        proc = python("trainer/evaluate.py", *args, tmp=tmp_path, check=False)
    one_line_exit_2(proc, f"is writing to {out}")
    fuse = ["tools/fuse.py", "--checkpoint", checkpoint, "--shards", small_shards, "--out", out]
    with folder_lock(out, "train"):  # fuse writes fusion.json into --out, a run folder
        one_line_exit_2(python(*fuse, tmp=tmp_path, check=False), f"is writing to {out}")


# ---------------------------------------------------------------- 3. bounded reads


def test_fifo_and_device_are_rejected_without_reading(tmp_path):
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)  # nobody writes it: opening it for reading would wait forever
    zero = tmp_path / "zero.jpg"
    zero.symlink_to("/dev/zero")  # endless: read whole, it would fill the memory
    code = (
        "import resource, sys; from pipeline.writing.preprocess import prepare, BadImage\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "for p in sys.argv[1:]:\n"
        "    try: prepare(p, 64)\n"
        "    except BadImage as e: print(e.reason)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, fifo, zero],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert proc.stdout.splitlines() == [
        "not an image (a FIFO)",
        "not an image (a character device)",
    ], proc.stderr


def test_file_over_the_size_limit_is_rejected_before_reading(tmp_path):
    big = photo(tmp_path / "big.png")
    with pytest.raises(BadImage, match=r"file too large \(0 MB; the limit is 0 MB\)"):
        prepare(big, 64, max_bytes=1000)
    assert prepare(big, 64)  # under the default limit


def peak_rss_mb(path: Path) -> float:
    """Peak memory (MB) of a fresh process preparing ``path`` for 64 px shards, less its peak
    before. VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's (pytest's)."""
    code = (
        "import sys; from pipeline.writing.preprocess import prepare\n"
        "def hwm(): return int(next(l for l in open('/proc/self/status') "
        "if l.startswith('VmHWM')).split()[1])\n"
        "base = hwm(); prepare(sys.argv[1], 64); print((hwm() - base) / 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    return float(out.stdout)


def test_16_bit_png_costs_at_most_twice_the_8_bit_one(tmp_path):
    grey = (np.arange(3000 * 3000, dtype=np.uint32).reshape(3000, 3000) % 251).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I;16")
    eight, sixteen = peak_rss_mb(tmp_path / "8.png"), peak_rss_mb(tmp_path / "16.png")
    assert sixteen <= 2 * eight, (eight, sixteen)


def test_decompression_bomb_is_a_reject(tmp_path):
    pixels = Image.MAX_IMAGE_PIXELS + 1_000_000  # over Pillow's limit, under MAX_PIXELS
    side = int(pixels**0.5) + 1
    img = Image.new("L", (side, side))
    img.save(tmp_path / "bomb.png", optimize=False)
    with pytest.raises(BadImage, match="too large"):
        open_image(tmp_path / "bomb.png")


# ---------------------------------------------------------------- 4. complete or absent


class Interrupted(KeyboardInterrupt):
    pass


def test_interrupted_predict_leaves_the_previous_predictions(checkpoint, tmp_path, monkeypatch):
    import tools.predict as predict_tool

    photos = tmp_path / "photos"
    for i in range(4):
        photo(photos / f"{i}_left.jpeg", seed=i)
    out = tmp_path / "out"
    assert predict_tool.main(["--checkpoint", str(checkpoint), str(photos), "--out", str(out)]) == 0
    before = (out / "predictions.csv").read_bytes()
    real = csv.writer

    def writer_that_stops(f, *a, **k):  # Ctrl-C after the header and two rows
        inner, rows = real(f, *a, **k), []

        class W:
            def writerow(self, row):
                rows.append(row)
                if len(rows) > 3:
                    raise Interrupted
                return inner.writerow(row)

        return W()

    monkeypatch.setattr(predict_tool.csv, "writer", writer_that_stops)
    with pytest.raises(Interrupted):
        predict_tool.main(["--checkpoint", str(checkpoint), str(photos / "0_left.jpeg"),
                           str(photos / "1_left.jpeg"), str(photos / "2_left.jpeg"), "--out", str(out)])  # fmt: skip
    assert (out / "predictions.csv").read_bytes() == before
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["predictions.csv"]


def test_interrupted_evaluate_leaves_the_previous_outputs(
    checkpoint, small_shards, tmp_path, monkeypatch
):
    import trainer.evaluate as evaluate_tool

    out = tmp_path / "eval"
    args = ["--checkpoint", str(checkpoint), "--shards", str(small_shards), "--out", str(out)]
    assert evaluate_tool.main([*args, "--split", "test", "--backend", "torch"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def stop(*a, **k):
        raise Interrupted

    monkeypatch.setattr(evaluate_tool, "plot_roc", stop)
    with pytest.raises(Interrupted):
        evaluate_tool.main([*args, "--split", "train", "--backend", "torch"])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# ---------------------------------------------------------------- 5. safe cells


def test_cells_for_people_are_formula_safe():
    assert [safe_cell(v) for v in ("=1+1", "@SUM(1+1)", "+x", "-x", "\tx", "\rx")] == [
        "'=1+1",
        "'@SUM(1+1)",
        "'+x",
        "'-x",
        "'\tx",
        "'\rx",
    ]
    assert [safe_cell(v) for v in ("-0.5", "+3", "10_left", 4, None)] == [
        "-0.5",
        "+3",
        "10_left",
        4,
        None,
    ]
    assert md_cell("<img src=x onerror=alert(1)>|b") == "&lt;img src=x onerror=alert(1)&gt;\\|b"


def test_photo_and_patient_names_reach_csv_files_as_text(checkpoint, tmp_path):
    photos = tmp_path / "photos"
    for name in ("=1+1.jpeg", "@SUM(1+1).jpeg"):
        photo(photos / name)
    out = tmp_path / "out"
    proc = predict(checkpoint, out, "=1+1.jpeg", "@SUM(1+1).jpeg", tmp=tmp_path, cwd=photos)
    assert proc.returncode == 0, proc.stderr
    images = [r["image"] for r in csv.DictReader((out / "predictions.csv").open())]
    assert images == ["'=1+1.jpeg", "'@SUM(1+1).jpeg"]
    write_sample_table(
        tmp_path / "samples.csv",
        [SampleRecord("a", "test", 1, '=HYPERLINK("http://x","y")', "=1+1.jpeg")],
    )
    row = next(csv.DictReader((tmp_path / "samples.csv").open()))
    assert row["patient"].startswith("'=") and row["path"] == "'=1+1.jpeg"


def test_external_tables_escape_names(tmp_path):
    from trainer.judging.external import ExternalRow, write_tables

    name = "<img src=x onerror=alert(1)>"
    row = ExternalRow(name, "=x", "test", 5, 1, 0.5, 0.1, None, None, None, None)
    write_tables([row], tmp_path, None, "nowhere")
    assert "<img" not in (tmp_path / "external.md").read_text()
    cells = next(csv.DictReader((tmp_path / "external.csv").open()))
    assert cells["shards"] == "'=x"


# ---------------------------------------------------------------- 6. as a viewer shows it


def turned_jpeg(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A JPEG stored landscape with EXIF Orientation 6 (shown turned 90 degrees clockwise),
    its left half bright; returns the picture as a viewer shows it."""
    pixels = np.full((size[1], size[0], 3), 70, np.uint8)  # not dark: no border to crop
    pixels[:, : size[0] // 2] = 220
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return np.rot90(pixels, k=-1)  # clockwise: the bright half ends on top


@pytest.mark.parametrize("size", [(128, 96), (64, 64)])  # decoded, and a would-be pass-through
def test_exif_orientation_is_applied_when_packing_and_predicting(size, tmp_path, checkpoint):
    from tools.predict import load_for_model

    shown = turned_jpeg(tmp_path / "turned.jpeg", size)
    packed = np.asarray(Image.open(io.BytesIO(prepare(tmp_path / "turned.jpeg", 64))))
    top, bottom = packed[:20].mean(), packed[-20:].mean()
    assert top > 150 > 100 > bottom, (top, bottom)  # upright: bright above, as the viewer shows
    assert shown[:5].mean() > 150
    seen = load_for_model(tmp_path / "turned.jpeg", 64, 64, False).numpy()
    assert seen[:, :20].mean() > 150 > 100 > seen[:, -20:].mean()


def test_one_minimum_size_for_packing_and_predict(tmp_path, checkpoint):
    from tools.predict import load_for_model

    Image.new("RGB", (1, 1), (200, 10, 10)).save(tmp_path / "dot.png")
    with pytest.raises(BadImage, match="too small to grade") as packing:
        prepare(tmp_path / "dot.png", 64)
    with pytest.raises(BadImage) as predicting:
        load_for_model(tmp_path / "dot.png", 64, 64, False)
    assert packing.value.reason == predicting.value.reason


# ---------------------------------------------------------------- 7. one line, not a traceback


def edited(checkpoint: Path, tmp_path: Path, **changes) -> Path:
    info = torch.load(checkpoint, weights_only=True)
    for key, value in changes.items():
        if value is None:
            info.pop(key)
        else:
            info[key] = value
    path = tmp_path / "edited.pt"
    torch.save(info, path)
    return path


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"arch": "resnet50"}, "do not fit a resnet50"),
        ({"image_size": None}, "no 'image_size'"),
        ({"temperature": "abc"}, "'temperature' is 'abc', not a positive number"),
        ({"mean": [0.5]}, "'mean' is '[0.5]', not three numbers"),
        ({"arch": "vgg99"}, "unknown architecture 'vgg99'"),
    ],
)
def test_malformed_best_pt_says_what_is_wrong(changes, words, checkpoint, tmp_path):
    with pytest.raises(UserError, match=words.replace("[", r"\[").replace("]", r"\]")):
        load_best(edited(checkpoint, tmp_path, **changes))


class Payload:
    """Stands for what a malicious pickle holds: an object torch refuses to build."""


def test_no_message_recommends_weights_only_false(tmp_path):
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    for load in (load_best, read_state_dict):
        with pytest.raises(UserError) as err:
            load(tmp_path / "evil.pt")
        assert "weights_only" not in str(err.value) and "can still be loaded" not in str(err.value)
        assert "besides tensors" in str(err.value)


# ---------------------------------------------------------------- 8. labels and names


def write_images(folder: Path, names) -> None:
    for name in names:
        photo(folder / name, size=72)


def test_conflicting_grades_reject_both_rows_equal_duplicates_keep_one(tmp_path):
    write_images(tmp_path / "imgs", ["a.jpeg", "b.jpeg", "c.jpeg"])
    labels = tmp_path / "labels.csv"
    labels.write_text("image,level\na,0\nb,2\na,4\nb,2\nc,1\n")
    src = read_source(tmp_path, labels)
    assert [s.key for s in src.samples] == ["b", "c"]
    reasons = sorted(reason.split(":")[0] for name, reason in src.rejects)
    assert reasons == ["conflicting grades", "conflicting grades", "duplicate"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-8-sig", "latin-1", "cp1252"])
def test_label_files_in_the_encodings_spreadsheets_save(encoding, tmp_path):
    write_images(tmp_path / "imgs", ["José_1.jpeg", "b.jpeg"])
    labels = tmp_path / "labels.csv"
    text = "image,level\nJosé_1,2\nb,1\n"
    labels.write_bytes(text.encode(encoding))
    src = read_source(tmp_path, labels)
    assert sorted((s.source, s.label) for s in src.samples) == [
        ("imgs/José_1.jpeg", 2),
        ("imgs/b.jpeg", 1),
    ], src.rejects


def test_gif_is_packed_from_its_first_frame(tmp_path):
    frames = [Image.fromarray(render_fundus(g, np.random.default_rng(g), 96)) for g in (1, 4)]
    (tmp_path / "imgs").mkdir()
    frames[0].save(tmp_path / "imgs/a.gif", save_all=True, append_images=frames[1:])
    labels = tmp_path / "labels.csv"
    labels.write_text("image,level\na,1\n")
    src = read_source(tmp_path, labels)
    assert [s.key for s in src.samples] == ["a"], src.rejects
    first = np.asarray(Image.open(io.BytesIO(prepare(tmp_path / "imgs/a.gif", 64))), float)
    frames[0].convert("RGB").save(tmp_path / "first.png")
    expected = np.asarray(Image.open(io.BytesIO(prepare(tmp_path / "first.png", 64))), float)
    assert np.abs(first - expected).mean() < 8


def test_overlay_names_are_unique_like_shard_keys(tmp_path):
    from tools.predict import Prediction, write_explained

    graded = [
        Prediction(tmp_path / "x.jpeg", 1, [0.2] * 5),
        Prediction(tmp_path / "x.png", 2, [0.2] * 5),
        Prediction(tmp_path / "a/x.png", 0, [0.2] * 5),
    ]
    maps = [(np.zeros((SIZE, SIZE, 3), np.uint8), np.zeros((SIZE, SIZE)))] * 3
    write_explained(tmp_path / "cam", graded, maps)
    assert len(list((tmp_path / "cam").glob("*.png"))) == 3
