"""The synthetic fundus generator: layouts, pairing, split, determinism, CLI errors, learnability."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pipeline.constants import EYEPACS_CLASS_MIX, NUM_CLASSES
from pipeline.writing.preprocess import preprocess
from tools.make_synthetic import (
    DIFFICULTIES,
    EYES,
    draw_grades,
    draw_labels,
    generate,
    render_fundus,
)

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "make_synthetic.py"


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_kaggle_layout(tmp_path):
    items = generate(tmp_path, n=21, size=64, layout="kaggle", seed=1)
    rows = lines(tmp_path / "trainLabels.csv")
    assert rows[0] == "image,level"
    assert rows[1:] == [f"{i},{g}" for i, g in items]
    assert len(items) == 21
    files = sorted((tmp_path / "train").iterdir())
    assert len(files) == 21 and all(f.suffix == ".jpeg" for f in files)
    for image_id, _ in items:
        with Image.open(tmp_path / "train" / f"{image_id}.jpeg") as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 64))


def test_lab_layout_split_by_patient(tmp_path):
    items = generate(tmp_path, n=40, size=64, layout="lab", seed=2, width=96)
    split = {}
    for name in ("train", "test"):
        ids, labels = lines(tmp_path / f"{name}_img.csv"), lines(tmp_path / f"{name}_label.csv")
        assert len(ids) == len(labels) and ids, name
        assert all(not i.endswith(".jpeg") for i in ids)  # ids, no header, no extension
        split[name] = dict(zip(ids, map(int, labels), strict=True))
    assert {**split["train"], **split["test"]} == dict(items)
    assert len(split["test"]) == 8  # 20% of 20 patients, both eyes
    patients = {name: {i.split("_")[0] for i in ids} for name, ids in split.items()}
    assert not patients["train"] & patients["test"]
    for image_id, _ in items:
        with Image.open(tmp_path / "images" / f"{image_id}.jpeg") as im:
            assert im.size == (96, 64)
            assert max(im.getpixel((0, 32))) < 20  # black side border
            assert im.getpixel((48, 32))[0] > 60  # orange-red retina in the middle


def test_pairs_and_every_grade(tmp_path):
    items = generate(tmp_path, n=20, size=32, layout="kaggle", seed=3)
    ids = [i for i, _ in items]
    assert ids[:4] == ["1_left", "1_right", "2_left", "2_right"]
    grades = dict(items)
    for p in range(1, 11):
        assert abs(grades[f"{p}_left"] - grades[f"{p}_right"]) <= 1
    counts = Counter(grades.values())
    assert all(counts[g] >= 2 for g in range(NUM_CLASSES)), counts


def test_grades_follow_the_class_mix():
    grades = draw_grades(4000, EYEPACS_CLASS_MIX, np.random.default_rng(0))
    share = np.bincount(grades, minlength=NUM_CLASSES) / len(grades)
    assert np.abs(share - EYEPACS_CLASS_MIX).max() < 0.03, share.round(3)
    pairs = np.reshape(grades, (-1, 2))
    assert 0.03 < np.mean(pairs[:, 0] != pairs[:, 1]) < 0.3  # eyes mostly agree, not always


def test_same_seed_same_bytes(tmp_path):
    generate(tmp_path / "a", n=6, size=48, seed=7)
    generate(tmp_path / "b", n=6, size=48, seed=7)
    generate(tmp_path / "c", n=6, size=48, seed=8)
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    assert len(files) == 6 + 4
    assert all(
        (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files
    )
    assert (tmp_path / "a/images/1_left.jpeg").read_bytes() != (
        tmp_path / "c/images/1_left.jpeg"
    ).read_bytes()


def test_cli_writes_and_summarises(tmp_path):
    out = tmp_path / "data"
    run = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--out",
            str(out),
            "--n",
            "4",
            "--size",
            "40",
            "--layout",
            "kaggle",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "wrote 4 " in run.stdout and str(out) in run.stdout
    assert len(lines(out / "trainLabels.csv")) == 5


@pytest.mark.parametrize(
    "args",
    [
        ["--n", "1"],
        ["--size", "16"],
        ["--layout", "folder"],
        ["--n", "ten"],
        ["--bogus"],
        ["--difficulty", "hard"],
        ["--size", "64", "--width", "96", "--difficulty", "realistic"],
        "under-a-file",
    ],
)
def test_cli_bad_options(tmp_path, args):
    out = tmp_path / "out"
    if args == "under-a-file":
        (tmp_path / "file").write_text("x")
        out, args = tmp_path / "file" / "out", []
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True
    )
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and len(run.stderr.strip().splitlines()) == 1, (
        run.stderr
    )
    assert "Traceback" not in run.stderr


def features(img: np.ndarray) -> np.ndarray:
    """Colour histogram of the retina plus counts of dark and yellow spots against a local blur."""
    inside = img.max(axis=2) > 40
    q = img[inside] // 64
    hist = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64)
    local = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(3)), np.float32)
    diff = img.astype(np.float32) - local
    spots = [((diff.sum(axis=2) < t) & inside).sum() for t in (-40, -80)]
    spots += [((diff[..., 1] > t) & inside).sum() for t in (25, 50)]
    return np.log1p(np.concatenate([hist, spots]).astype(np.float32))


def test_grade_is_learnable_at_64px():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    grades = np.tile(np.arange(NUM_CLASSES), 20)
    x = np.stack(
        [
            features(render_fundus(int(g), rng, 64, ("left", "right")[i % 2]))
            for i, g in enumerate(grades)
        ]
    )
    half = len(grades) // 2
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(x[:half], grades[:half])
    accuracy = model.score(x[half:], grades[half:])
    assert accuracy > 0.6, f"grade accuracy {accuracy:.2f} from simple features (chance 0.2)"


def test_render_shapes_and_eye_side():
    rng = np.random.default_rng(0)
    left = render_fundus(0, rng, 128, "left").astype(np.float32)
    right = render_fundus(0, rng, 128, "right", width=192).astype(np.float32)
    assert left.shape == (128, 128, 3) and right.shape == (128, 192, 3)
    # The optic disc is the brightest thing in a grade-0 eye.
    assert np.unravel_index(left.sum(2).argmax(), (128, 128))[1] < 64
    assert np.unravel_index(right.sum(2).argmax(), (128, 192))[1] > 96
    with pytest.raises(ValueError):
        render_fundus(5, rng, 64)


# sha256 of the pixels render_fundus drew before --difficulty existed (numpy 2.4.6, Pillow
# 13.0.0; another Pillow may anti-alias or blur a pixel differently and change them).
EASY_PIXELS = {
    (
        2,
        2024,
        128,
        "left",
        None,
    ): "e6bc3a339bf583a7476fe625e80173b26b0bea94af1bd25022ed7a581252743a",
    (4, 2025, 96, "right", 144): "4339b6aba502cd70940192437365c58c3172735ca16c1c87781cab3ef1e9f5f3",
}
EASY_GRADES_SEED_0 = [1, 1, 0, 0, 0, 0, 0, 0, 2, 2, 4, 4, 0, 0, 0, 0, 0, 0, 2, 2, 3, 3, 0, 0]


@pytest.mark.parametrize("key", sorted(EASY_PIXELS, key=str))
def test_easy_pictures_are_unchanged(key):
    grade, seed, size, eye, width = key
    pixels = render_fundus(grade, np.random.default_rng(seed), size, eye, width=width)
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == EASY_PIXELS[key]


def test_easy_dataset_is_unchanged(tmp_path):
    items = generate(tmp_path, n=24, size=32, layout="kaggle", seed=0)
    assert [g for _, g in items] == EASY_GRADES_SEED_0
    for i in (0, 10, 21):  # the files are those pictures, encoded as before
        image_id, grade = items[i]
        pixels = render_fundus(grade, np.random.default_rng([0, 1, i]), 32, image_id.split("_")[1])
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=92)
        assert (tmp_path / "train" / f"{image_id}.jpeg").read_bytes() == buf.getvalue()


def test_realistic_differs_from_easy(tmp_path):
    easy = generate(tmp_path / "easy", n=6, size=64, layout="kaggle", seed=4)
    real = generate(
        tmp_path / "real", n=6, size=64, layout="kaggle", seed=4, difficulty="realistic"
    )
    assert [i for i, _ in easy] == [i for i, _ in real]
    for image_id, _ in easy:
        a = (tmp_path / "easy/train" / f"{image_id}.jpeg").read_bytes()
        assert a != (tmp_path / "real/train" / f"{image_id}.jpeg").read_bytes()
    # and realistic is seeded like easy
    again = generate(
        tmp_path / "again", n=6, size=64, layout="kaggle", seed=4, difficulty="realistic"
    )
    assert again == real
    assert all(
        (tmp_path / "again/train" / f"{i}.jpeg").read_bytes()
        == (tmp_path / "real/train" / f"{i}.jpeg").read_bytes()
        for i, _ in real
    )


def test_realistic_label_noise_and_class_mix():
    drawn, written = map(
        np.array, draw_labels(40000, EYEPACS_CLASS_MIX, np.random.default_rng(5), "realistic")
    )
    assert np.abs(drawn - written).max() == 1
    assert 0.09 < np.mean(drawn != written) < 0.11
    share = np.bincount(written, minlength=NUM_CLASSES) / len(written)
    assert np.abs(share - EYEPACS_CLASS_MIX).max() < 0.01, share.round(3)
    drawn, written = draw_labels(100, EYEPACS_CLASS_MIX, np.random.default_rng(5), "easy")
    assert drawn == written


def test_realistic_generate_writes_the_noisy_labels(tmp_path):
    items = generate(tmp_path, n=60, size=32, layout="kaggle", seed=6, difficulty="realistic")
    drawn, written = draw_labels(60, EYEPACS_CLASS_MIX, np.random.default_rng([6, 0]), "realistic")
    assert [g for _, g in items] == written and drawn != written


def test_realistic_eyes_agree():
    drawn, written = draw_labels(40000, EYEPACS_CLASS_MIX, np.random.default_rng(7), "realistic")
    for grades, least in ((drawn, 0.85), (written, 0.8)):
        left, right = np.reshape(grades, (-1, 2)).T
        assert np.mean(left == right) > least
        assert np.corrcoef(left, right)[0, 1] > 0.8
    left, right = np.reshape(drawn, (-1, 2)).T
    assert np.abs(left - right).max() == 1


def test_realistic_frames_vary_and_pack(tmp_path):
    items = generate(tmp_path, n=16, size=96, layout="kaggle", seed=8, difficulty="realistic")
    sizes = set()
    for image_id, _ in items:
        with Image.open(tmp_path / "train" / f"{image_id}.jpeg") as im:
            w, h = im.size
            sizes.add((w, h))
            assert 72 <= h <= 96 and any(abs(w - a * h) <= 1 for a in (1, 4 / 3, 3 / 2))
            square = preprocess(im.convert("RGB"), 64)  # what the shard builder makes of it
        assert square.size == (64, 64) and max(square.getpixel((32, 32))) > 40
    assert len(sizes) >= 8 and len({round(w / h, 1) for w, h in sizes}) == 3, sizes


def test_realistic_is_much_harder_to_grade():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    grades = np.tile(np.arange(NUM_CLASSES), 20)
    half = len(grades) // 2
    accuracy = {}
    for difficulty in DIFFICULTIES:
        rng = np.random.default_rng(0)
        x = np.stack(
            [
                features(render_fundus(int(g), rng, 64, EYES[i % 2], difficulty=difficulty))
                for i, g in enumerate(grades)
            ]
        )
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        accuracy[difficulty] = model.fit(x[:half], grades[:half]).score(x[half:], grades[half:])
    # the same simple features: easy is nearly solved, realistic far from it but not noise
    assert 0.3 < accuracy["realistic"] < accuracy["easy"] - 0.3, accuracy


def test_lesion_scale_draws_bigger_lesions_and_nothing_else():
    def draw(grade: int, scale: float) -> np.ndarray:  # the same random draws every time
        return render_fundus(
            grade,
            np.random.default_rng([7, 1, 3]),
            256,
            "left",
            difficulty="realistic",
            lesion_scale=scale,
        ).astype(int)

    # no lesions, nothing to scale: the very same picture
    assert np.array_equal(draw(0, 1.0), draw(0, 3.0))
    # with lesions, only where they lie: the frame, camera and lesion positions are the same,
    # so the pictures differ in a ring around each lesion, wider the larger the scale
    apart = [(np.abs(draw(3, k) - draw(3, 1.0)).max(axis=2) > 20).sum() for k in (1.5, 3.0)]
    assert 0 < apart[0] < apart[1]
