"""tools/compare_runs.py on run folders of different lengths, one still in progress."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tools.compare_runs import load_run

ROOT = Path(__file__).resolve().parents[1]


def fake_run(
    path: Path,
    arch: str,
    pretrained: bool,
    epochs: int,
    planned: int,
    partial_line=False,
    val=False,
):
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps({"arch": arch, "pretrained": pretrained, "epochs": planned})
    )
    lines = []
    for e in range(1, epochs + 1):
        lines.append(
            json.dumps(
                {
                    "epoch": e,
                    "train_loss": 1.5 / e,
                    "train_acc": 0.5 + 0.04 * e,
                    "test_loss": 1.6 / e,
                    "test_acc": 0.45 + 0.05 * e - (0.2 if e == 2 else 0),
                    "test_qwk": 0.1 * e,
                    "test_recall": [0.9, 0.1, 0.2 * e / epochs, 0.0, 0.05],
                    "images_per_s": 100.0,
                    "epoch_s": 3.0,
                    "lr": 0.01,
                    **(
                        {
                            "val_qwk": [0.2, 0.5, 0.4][e - 1],
                            "val_acc": 0.5,
                            "val_loss": 1.0,
                            "test_referable_auc": 0.7 + 0.05 * e,
                        }
                        if val
                        else {}
                    ),
                }
            )
        )
    text = "\n".join(lines) + "\n"
    if partial_line:
        text += '{"epoch": ' + str(epochs + 1) + ', "train_lo'
    (path / "metrics.jsonl").write_text(text)
    if epochs == planned:
        (path / "summary.json").write_text("{}")
    return path


def test_compare_two_runs(tmp_path):
    a = fake_run(tmp_path / "r18", "resnet18", True, 3, 3)
    b = fake_run(tmp_path / "r50", "resnet50", False, 2, 5, partial_line=True)
    out = tmp_path / "fig"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/compare_runs.py"), str(a), str(b), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert Image.open(out / "compare.png").size[0] > 1000
    table = (out / "compare.md").read_text()
    assert table.strip() in proc.stdout
    rows = [line for line in table.splitlines() if line.startswith("| resnet")]
    # no val in these runs: chosen on test, and the table says it is optimistic
    assert rows[0].startswith(
        "| resnet18, classify, ImageNet-pretrained | 3/3 | test (optimistic) | 3 | 60.0 % | 0.300 | - |"
    )
    # the in-progress run: its last line is cut short and ignored
    assert rows[1].startswith(
        "| resnet50, classify, from scratch | 2/5 (in progress) | test (optimistic) | 2 | 35.0 % | 0.200 |"
    )


def test_test_figures_are_reported_at_the_best_val_epoch(tmp_path):
    run = fake_run(tmp_path / "r", "resnet50", True, 3, 3, val=True)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/compare_runs.py"),
            str(run),
            "--out",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    # val kappa peaks at epoch 2 (test kappa at 3): epoch 2's test figures are the ones reported
    assert (
        "| resnet50, classify, ImageNet-pretrained | 3/3 | val | 2 | 35.0 % | 0.200 | - | 0.800 |"
        in proc.stdout
    )


def test_same_label_gets_folder_names(tmp_path):
    a = fake_run(tmp_path / "cosine", "resnet18", False, 2, 2)
    b = fake_run(tmp_path / "constant", "resnet18", False, 2, 2)
    out = tmp_path / "c"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/compare_runs.py"), str(a), str(b), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "resnet18, classify, from scratch (cosine)" in proc.stdout
    assert "resnet18, classify, from scratch (constant)" in proc.stdout


def test_bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/compare_runs.py"),
            str(empty),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"error: {empty} has no metrics.jsonl; is it a run folder written by trainer/train.py?"
    )
    bad = fake_run(tmp_path / "bad", "resnet18", False, 3, 3)
    lines = (bad / "metrics.jsonl").read_text().splitlines()
    lines[0] = "garbage"
    (bad / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/compare_runs.py"), str(bad)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "line 1 is not JSON" in proc.stderr


def test_run_without_epochs_is_listed(tmp_path):
    run = fake_run(tmp_path / "new", "resnet50", True, 0, 4)
    assert load_run(run).metrics.empty
