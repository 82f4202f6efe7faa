"""tools/predict.py: a folder with one corrupt photo, raw-photo preprocessing, TTA."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools.make_synthetic import render_fundus
from tools.predict import load_for_model, predict_batch
from trainer.checkpoint import load_best, save_best
from trainer.model import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_best(
        path,
        build_model("resnet18").state_dict(),
        arch="resnet18",
        image_size=64,
        epoch=1,
        metrics={"test_qwk": 0.0},
        config={"arch": "resnet18"},
    )
    return path


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
    assert "graded 3 image(s), 1 unreadable" in proc.stdout


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
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: no .jpeg/.jpg/.png images found in {tmp_path}"


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
    mean = torch.tensor(info["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(info["std"]).view(1, 3, 1, 1)
    plain = predict_batch(model, x, mean, std, tta=False)
    tta = predict_batch(model, x, mean, std, tta=True)
    flipped = predict_batch(model, x.flip(-1), mean, std, tta=False)
    assert torch.allclose(plain.sum(1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(plain, tta)
    assert torch.allclose(predict_batch(model, x.flip(-1), mean, std, tta=True), tta, atol=1e-5)
    assert not torch.allclose(plain, flipped)
