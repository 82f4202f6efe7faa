"""tools/predict.py: a folder with one corrupt photo, raw-photo preprocessing, TTA."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import untrained_best
from PIL import Image

from pipeline.loading.contract import normalization
from tools.make_synthetic import render_fundus
from tools.predict import load_for_model, predict_batch
from trainer.base.bestfile import load_best

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return untrained_best(tmp_path_factory.mktemp("ckpt") / "best.pt")


def test_folder_with_a_corrupt_image(tmp_path, checkpoint):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(["1_left.jpeg", "1_right.JPG", "sub/2_left.png"]):
        Image.fromarray(render_fundus(i, rng, 96, width=144)).save(photos / name)
    (photos / "3_left.jpeg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (photos / "notes.txt").write_text("not a photo")
    out = tmp_path / "preds"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/predict.py"),
            "--checkpoint",
            str(checkpoint),
            str(photos),
            "--out",
            str(out),
            "--tta",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot grade {photos / '3_left.jpeg'}: truncated"
    ]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [Path(r["image"]).name for r in rows] == [
        "1_left.jpeg",
        "1_right.JPG",
        "3_left.jpeg",
        "2_left.png",
    ]
    graded = [r for r in rows if not r["error"]]
    assert len(graded) == 3
    for r in graded:
        probs = [float(r[f"p{g}"]) for g in range(5)]
        assert abs(sum(probs) - 1) < 1e-3
        assert int(r["grade"]) == int(np.argmax(probs))
    assert "graded 3 image(s), 1 not graded" in proc.stdout


def test_no_images_is_one_clear_error(tmp_path, checkpoint):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/predict.py"),
            "--checkpoint",
            str(checkpoint),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # predict's default --out is ".": its own folder, locked while it runs
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"error: no .jpeg/.jpg/.png/.tif/.tiff/.bmp/.gif images found in {tmp_path}"
    )


def test_missing_checkpoint(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/predict.py"),
            "--checkpoint",
            str(tmp_path / "x.pt"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_real_retina_photo_is_border_cropped_to_a_square(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    retina = skimage_data.retina()  # a real fundus photograph with a wide black frame
    path = tmp_path / "retina.jpeg"
    # a raw-camera-like 3:2 frame: extra black at the sides
    h, w = retina.shape[:2]
    frame = np.zeros((h, w * 3 // 2, 3), np.uint8)
    frame[:, w // 4 : w // 4 + w] = retina
    Image.fromarray(frame).save(path, quality=95)

    tensor = load_for_model(path, shard_size=128, image_size=128, graham=False)
    assert tensor.shape == (3, 128, 128) and tensor.dtype == torch.uint8
    img = tensor.permute(1, 2, 0).numpy()
    bright = img.max(axis=2) > 20
    rows, cols = np.where(bright)
    # the eye touches (nearly) every edge: the black frame is gone
    assert rows.min() <= 3 and cols.min() <= 3 and rows.max() >= 124 and cols.max() >= 124
    # whereas in the source, the eye spans well under the frame's width
    src_cols = np.where((frame.max(axis=2) > 20).any(axis=0))[0]
    assert (src_cols.max() - src_cols.min()) / frame.shape[1] < 0.7


def test_tta_averages_flips(checkpoint):
    model, info = load_best(checkpoint)
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    mean, std = normalization("cpu", info["mean"], info["std"])
    plain = predict_batch(model, x, mean, std, tta=False)
    tta = predict_batch(model, x, mean, std, tta=True)
    flipped = predict_batch(model, x.flip(-1), mean, std, tta=False)
    assert plain.shape == (2, 5)  # the head's raw outputs, averaged over flips with tta
    assert not torch.allclose(plain, tta)
    assert torch.allclose(predict_batch(model, x.flip(-1), mean, std, tta=True), tta, atol=1e-5)
    assert not torch.allclose(plain, flipped)


def test_symlink_loop_and_tiny_photo_are_error_rows(tmp_path, checkpoint):
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(render_fundus(2, rng, 96)).save(photos / "a" / "1_left.jpeg")
    Image.fromarray(render_fundus(2, rng, 40)).save(photos / "a" / "2_left.jpeg")  # too small
    (photos / "a" / "back").symlink_to(photos, target_is_directory=True)  # a loop
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/predict.py"),
            "--checkpoint",
            str(checkpoint),
            str(photos),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr
    rows = {Path(r["image"]).name: r for r in csv.DictReader((out / "predictions.csv").open())}
    assert rows["back"]["error"] == f"symlink loop (back to {photos})"
    assert (
        rows["2_left.jpeg"]["error"]
        == "too small to grade (40x40 pixels; at least 64 on the short side)"
    )
    assert rows["1_left.jpeg"]["grade"] != "" and not rows["1_left.jpeg"]["error"]
    assert len(rows) == 3 and "graded 1 image(s), 2 not graded" in proc.stdout


# ---------------------------------------------------------------- predict sees what training saw


def photo_set(root: Path) -> Path:
    """A lab-layout folder whose test photos cover both ways into a shard: kept as they are
    (64x64 baseline JPEGs, with and without black margins) and re-encoded (other sizes, with
    and without a black frame)."""
    rng = np.random.default_rng(7)
    images = root / "images"
    images.mkdir(parents=True)

    def save(name: str, pixels: np.ndarray) -> None:
        Image.fromarray(pixels).save(images / f"{name}.jpeg", quality=90)

    margins = np.zeros((64, 64, 3), np.uint8)
    margins[12:52, 12:52] = render_fundus(3, rng, 40)  # an eye with 12 px of black around it
    save("1_left", margins)  # pass-through, black margins
    save("1_right", render_fundus(1, rng, 96)[16:80, 16:80])  # pass-through, no margin
    save("2_left", render_fundus(2, rng, 96, width=144))  # re-encoded, black side borders
    save("2_right", render_fundus(4, rng, 120)[20:100, 20:100])  # re-encoded, no margin
    save("3_left", render_fundus(0, rng, 64))  # train split
    save("3_right", render_fundus(0, rng, 64))
    (root / "train_img.csv").write_text("3_left\n3_right\n")
    (root / "train_label.csv").write_text("0\n0\n")
    (root / "test_img.csv").write_text("1_left\n1_right\n2_left\n2_right\n")
    (root / "test_label.csv").write_text("3\n1\n2\n4\n")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("graham, image_size", [(False, 64), (True, 64), (False, 48)])
def test_predict_equals_the_loader_and_evaluate(tmp_path, graham, image_size):
    from pipeline.loading.loader import EvalSpec, build_loader
    from pipeline.manifest import read_manifest
    from pipeline.writing.packing import PackConfig, pack

    data = photo_set(tmp_path / "data")
    shards = tmp_path / "shards"
    pack(PackConfig(data, shards, size=64, graham=graham, workers=1, quiet=True))
    manifest = read_manifest(shards)
    kept = {"1_left", "1_right"} if not graham else set()  # packed as their original bytes
    for key in kept:
        assert (data / "images" / f"{key}.jpeg").read_bytes() in b"".join(
            p.read_bytes() for p in manifest.tar_paths("test")
        )
    checkpoint = untrained_best(
        tmp_path / "best.pt",
        image_size=image_size,
        metrics={},
        config={"batch_size": 3, "backend": "torch", "precision": "no", "seed": 0},
        preprocess=manifest.preprocess,
    )

    # the tensors: predict's input == the torch loader's evaluation batch, bit for bit
    loader = build_loader(
        shards,
        EvalSpec(
            split="test",
            batch_size=4,
            image_size=image_size,
            backend="torch",
            workers=0,
            with_keys=True,
        ),
    )
    ((images, _, keys),) = list(loader)
    shift, scale = normalization()
    for key, batch_image in zip(keys, images, strict=True):
        mine = load_for_model(data / "images" / f"{key}.jpeg", 64, image_size, graham)
        assert torch.equal(torch.addcmul(shift, mine, scale), batch_image), key

    # the probabilities: predict.py == evaluate.py, image by image
    env = dict(os.environ, OMP_NUM_THREADS="1")
    evaluated = subprocess.run(
        [
            sys.executable,
            str(ROOT / "trainer/evaluate.py"),
            "--checkpoint",
            str(checkpoint),
            "--shards",
            str(shards),
            "--out",
            str(tmp_path / "eval"),
            "--workers",
            "0",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    predicted = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/predict.py"),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "pred"),
            "--device",
            "cpu",
            *[
                str(data / "images" / f"{k}.jpeg")
                for k in ("1_left", "1_right", "2_left", "2_right")
            ],
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    ev = {r["key"]: r for r in csv.DictReader((tmp_path / "eval" / "predictions.csv").open())}
    pr = {
        Path(r["image"]).stem: r
        for r in csv.DictReader((tmp_path / "pred" / "predictions.csv").open())
    }
    assert set(ev) == set(pr) == {"1_left", "1_right", "2_left", "2_right"}
    for key in ev:
        for g in range(
            5
        ):  # both print 8 decimals; batches of different sizes may differ in the last float bits
            assert abs(float(ev[key][f"p{g}"]) - float(pr[key][f"p{g}"])) <= 2e-6, (key, g)
        assert ev[key]["pred"] == pr[key]["grade"]
        assert (ev[key]["patient"], ev[key]["eye"]) == (key.split("_")[0], key.split("_")[1])
