"""One tiny real run (64 px, 2 epochs, synthetic photos with lesion masks) and what is built
on it: report.html, dr-report on a killed run, the temperature through evaluate, predict and
best.pt, --explain, lesion_heat, compare_runs' links, and (where Chromium is installed) the
report rendered with every picture loaded."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.conftest import shared
from tools import compare_runs, lesion_heat, predict
from tools import report as report_tool
from tools.make_synthetic import generate
from trainer import evaluate as evaluate_tool
from trainer.base.bestfile import head_of, load_best
from trainer.judging.calibration import scaled
from trainer.judging.run_page import GALLERY, PREDICTIONS_DIR, REPORT_FILE

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("run", "figures", "curves", "confusion", "roc", "reliability", "recall", "gallery")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Photos (with --masks), shards and a 2-epoch classify run at 64 px."""
    return shared(tmp_path_factory, "report_run", _report_run)


def _report_run(tmp: Path) -> Path:
    generate(tmp / "data", n=60, size=64, layout="kaggle", seed=0, masks=True,
             class_mix=(2, 1, 1, 1, 1))  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(tmp / "hf"))
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    shards = ["tools/make_shards.py", str(tmp / "data"), str(tmp / "shards"), "--size", "64"]
    train = ["trainer/train.py", "--shards", str(tmp / "shards"), "--out", str(tmp / "run")]
    train += ["--epochs", "2", "--image-size", "64", "--batch-size", "8", "--backend", "torch"]
    for cmd in (shards, train + ["--workers", "0"]):
        proc = subprocess.run(
            [sys.executable, *cmd, "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "run"


def images_of(page: str) -> list[tuple[str, bytes]]:
    return [
        (alt, base64.b64decode(data))
        for alt, data in re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)"', page)
    ]


def test_report_after_training(run):
    page = (run / REPORT_FILE).read_text()
    for ident in SECTIONS:
        assert f'<section id="{ident}">' in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert page.count("<img") == len(images_of(page))  # every picture is embedded
    for alt, data in images_of(page):
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "PNG", alt
            img.load()
    summary = json.loads((run / "summary.json").read_text())
    shown = dict(re.findall(r'data-key="(\w+)" data-value="([^"]+)"', page))
    for key in ("val_qwk", "test_qwk", "test_acc", "test_referable_auc", "test_ece", "test_ece_raw",
                "val_ece", "temperature", "referable_threshold"):  # fmt: skip
        if summary["best"].get(key) is not None:
            assert float(shown[key]) == summary["best"][key], key
    assert f"Epoch {summary['best_epoch']}," in page
    table = pd.read_csv(run / PREDICTIONS_DIR / f"test_epoch_{summary['best_epoch']:03d}.csv")
    wrong = int((table["true"] != table["pred"]).sum())
    gallery = page.split('<section id="gallery">')[1]
    assert gallery.count("<figcaption>") == min(GALLERY, wrong)


def test_temperature_is_fitted_and_kept(run):
    summary = json.loads((run / "summary.json").read_text())
    best = summary["best"]
    _, info = load_best(run / "best.pt")
    assert info["temperature"] == best["temperature"] and best["temperature"] > 0
    for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        for split in ("val", "test"):
            assert 0 <= row[f"{split}_ece"] <= 1 and 0 <= row[f"{split}_ece_raw"] <= 1
    assert {"ece", "ece_raw"} <= set(summary["test_at_best_epoch"])


def test_evaluate_applies_the_temperature_and_explains(run, tmp_path, capsys):
    out = tmp_path / "eval"
    shards = run.parent / "shards"
    argv = ["--checkpoint", str(run / "best.pt"), "--shards", str(shards), "--out", str(out)]
    assert evaluate_tool.main([*argv, "--explain", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    best = json.loads((run / "summary.json").read_text())["best"]
    assert metrics["temperature"] == best["temperature"]
    assert metrics["qwk"] == pytest.approx(best["test_qwk"])  # grades as the trainer's
    assert metrics["ece"] == pytest.approx(best["test_ece"])
    assert metrics["ece_raw"] == pytest.approx(best["test_ece_raw"])
    assert len(list((out / "cam").glob("*.png"))) == 2
    assert (out / "reliability.png").stat().st_size > 0


def test_predict_applies_the_temperature_and_explains(run, tmp_path):
    photos = sorted((run.parent / "data/train").glob("*.jpeg"))[:3]
    assert predict.main(["--checkpoint", str(run / "best.pt"), "--out", str(tmp_path),
                         "--explain", *map(str, photos)]) == 0  # fmt: skip
    rows = pd.read_csv(tmp_path / "predictions.csv")
    model, info = load_best(run / "best.pt")
    head, cuts = head_of(info)
    prep = info["preprocess"]
    images = torch.stack([predict.load_for_model(p, prep["size"], 64, False) for p in photos])
    from pipeline.loading.contract import normalization

    shift, scale = normalization("cpu", info["mean"], info["std"])
    raw = predict.predict_batch(model, images, shift, scale, False).numpy()
    calibrated = head.probs(scaled(raw, info["temperature"]), cuts)
    np.testing.assert_allclose(rows[[f"p{g}" for g in range(5)]].to_numpy(), calibrated, atol=1e-6)
    np.testing.assert_array_equal(rows["grade"], head.grades(raw, cuts))
    assert sorted(p.name for p in (tmp_path / "cam").iterdir()) == sorted(
        f"{p.stem}.png" for p in photos
    )


def test_report_of_a_killed_run(run, tmp_path, capsys):
    """A run stopped after epoch 1: no summary, one metrics line, predictions of epoch 1 only
    if epoch 1 was the best so far; the page shows what there is."""
    killed = tmp_path / "killed"
    shutil.copytree(run, killed, ignore=shutil.ignore_patterns(REPORT_FILE, "checkpoints"))
    (killed / "summary.json").unlink()
    first = (killed / "metrics.jsonl").read_text().splitlines()[0]
    (killed / "metrics.jsonl").write_text(first + "\n")
    assert report_tool.main([str(killed), "--gallery", "2"]) == 0
    page = (killed / REPORT_FILE).read_text()
    assert "not finished: 1 epoch(s) logged" in page
    assert "Epoch 1," in page
    shown = dict(re.findall(r'data-key="(\w+)" data-value="([^"]+)"', page))
    assert float(shown["test_qwk"]) == json.loads(first)["test_qwk"]
    for ident in SECTIONS:
        assert f'<section id="{ident}">' in page


def test_report_of_a_folder_without_epochs(tmp_path):
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="no finished epoch"):
        report_tool.main([str(tmp_path)])


def test_lesion_heat_on_the_run(run, capsys):
    data, shards = run.parent / "data", run.parent / "shards"
    assert lesion_heat.main(["--checkpoint", str(run / "best.pt"), "--data", str(data),
                             "--shards", str(shards), "--split", "test"]) == 0  # fmt: skip
    line = capsys.readouterr().out
    heat, area = (float(x) for x in re.findall(r"([\d.]+) %", line)[:2])  # then: outside
    assert 0 <= heat <= 100 and 0 < area < 100
    model, info = load_best(run / "best.pt")
    pictures = lesion_heat.referable_pictures(data, lesion_heat.split_keys(shards, "test"))
    assert int(line.split()[0]) == len(pictures) > 0


def test_compare_links_the_reports(run, tmp_path):
    assert compare_runs.main([str(run), "--out", str(tmp_path)]) == 0
    table = (tmp_path / "compare.md").read_text()
    assert f"]({os.path.relpath(run / REPORT_FILE, tmp_path)})" in table


def test_report_renders_in_chromium(run, tmp_path):
    """Headless Chromium opens a copy of the page with a script added that counts the images
    that did not load; the report itself holds no script."""
    browser = next(
        (
            shutil.which(b)
            for b in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(b)
        ),
        None,
    )
    if browser is None:
        pytest.skip("no headless Chromium here (apt-get install chromium to run this check)")
    page = (run / REPORT_FILE).read_text()
    probe = (
        "<script>window.addEventListener('load', () => { const bad = [...document.images]"
        ".filter(i => !i.complete || i.naturalWidth === 0).length; document.body"
        ".setAttribute('data-images', document.images.length + '/' + bad); });</script>"
    )
    copy = tmp_path / "page.html"
    copy.write_text(page.replace("</body>", probe + "</body>"))
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start; a fresh
    # profile and no background traffic keep it to the one page
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
         "--dump-dom", copy.as_uri()],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    total, bad = re.search(r'data-images="(\d+)/(\d+)"', proc.stdout).groups()
    assert int(total) == page.count("<img") and int(bad) == 0
