"""dr-compare --seeds on run folders written by hand in the trainer's format
(trainer/base/runfiles.py: config.json, metrics.jsonl, summary.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import UserError
from tools.compare_runs import main
from tools.compare_seeds import paired_bootstrap

BASE = {"arch": "resnet18", "head": "classify", "lr": 0.01, "epochs": 2, "batch_size": 8}


def fake_run(root: Path, name: str, seed: int, kappa: float, auc: float, **config) -> Path:
    """Two epochs; epoch 2 has the best val kappa (the one counted), epoch 1 a higher test
    kappa that must not be counted."""
    path = root / name
    path.mkdir(parents=True)
    cfg = {**BASE, **config, "seed": seed, "out": str(path), "quiet": True}
    (path / "config.json").write_text(json.dumps({"config": cfg, "environment": {}}))
    rows = [
        {"epoch": 1, "val_qwk": 0.1, "test_qwk": 0.99, "test_referable_auc": 0.99},
        {"epoch": 2, "val_qwk": 0.4, "test_qwk": kappa, "test_referable_auc": auc},
    ]
    for row in rows:
        row.update(train_loss=1.0, test_acc=0.5, test_recall=[0.5] * 5, selected_by="val_qwk")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text("{}")
    return path


def test_the_bootstrap_interval_by_hand():
    # equal differences: every resampled mean is that difference
    assert paired_bootstrap([0.1, 0.1, 0.1]) == pytest.approx((0.1, 0.1))
    # two seeds, differences 0 and 0.3: resampled means 0, 0.15, 0.3 with p 1/4, 1/2, 1/4
    assert paired_bootstrap([0.0, 0.3]) == pytest.approx((0.0, 0.3))
    assert paired_bootstrap([0.2]) is None


def test_seeds_table(tmp_path, capsys):
    runs = [
        fake_run(tmp_path, "cls0", 0, 0.5, 0.80),
        fake_run(tmp_path, "cls1", 1, 0.6, 0.80),
        fake_run(tmp_path, "cls2", 2, 0.7, 0.80),
        fake_run(tmp_path, "reg2", 2, 0.8, 0.80, head="regress"),
        fake_run(tmp_path, "reg0", 0, 0.6, 0.80, head="regress"),
        fake_run(tmp_path, "reg1", 1, 0.7, 0.90, head="regress"),
        fake_run(tmp_path, "slow0", 0, 0.5, 0.70, head="regress", lr=0.001),
        fake_run(tmp_path, "slow5", 5, 0.9, 0.70, head="regress", lr=0.001),
    ]
    args = [*map(str, runs), "--seeds", "--out", str(tmp_path / "cmp")]
    assert main([*args, "--baseline", str(tmp_path / "cls1")]) == 0
    table = (tmp_path / "cmp" / "seeds.md").read_text()
    assert table.strip() in capsys.readouterr().out
    lines = table.splitlines()
    # mean ± sd of 0.5, 0.6, 0.7 is 0.600 ± 0.100; of 0.6, 0.7, 0.8 0.700 ± 0.100
    assert "| head=classify, lr=0.01 | 3 (0, 1, 2) | 0.600 ± 0.100 | 0.800 ± 0.000 |" in lines
    assert "| head=regress, lr=0.01 | 3 (0, 1, 2) | 0.700 ± 0.100 | 0.833 ± 0.058 |" in lines
    assert "| head=regress, lr=0.001 | 2 (0, 5) | 0.700 ± 0.283 | 0.700 ± 0.000 |" in lines
    # kappa: +0.1 on every seed; AUC: 0, +0.1, 0 (resampled means 0 to 0.1)
    assert "| head=regress, lr=0.01 | test kappa | 3 | +0.100 | [+0.100, +0.100] |" in lines
    assert "| head=regress, lr=0.01 | test referable AUC | 3 | +0.033 | [+0.000, +0.100] |" in lines
    # only seed 0 ran both: a difference, no interval
    assert "| head=regress, lr=0.001 | test kappa | 1 | +0.000 | - |" in lines
    # the baseline by its label gives the same table
    assert main([*args, "--baseline", "head=classify, lr=0.01"]) == 0
    assert (tmp_path / "cmp" / "seeds.md").read_text() == table


def test_bad_groupings_are_one_sentence(tmp_path):
    a = fake_run(tmp_path, "a", 0, 0.5, 0.8)
    b = fake_run(tmp_path, "b", 0, 0.6, 0.8)
    with pytest.raises(UserError, match="same configuration with the same seed 0"):
        main([str(a), str(b), "--seeds", "--out", str(tmp_path / "o")])
    c = fake_run(tmp_path, "c", 1, 0.6, 0.8)
    with pytest.raises(UserError, match="--baseline nothing is neither"):
        main([str(a), str(c), "--seeds", "--baseline", "nothing", "--out", str(tmp_path / "o")])


def fusion_report(run: Path, blend: float, fused: float) -> None:
    """What ``dr-fuse --out RUN`` writes (tools/fuse.py), val and test."""
    kappa = {"eye_alone": 0.0, "blend": blend, "fused": fused}
    report = {"epoch": 3, "kappa": {"val": dict(kappa, blend=0.99), "test": kappa}}
    (run / "fusion.json").write_text(json.dumps(report))


def test_both_eyes_rows_from_the_fusion_reports(tmp_path):
    cls = [fake_run(tmp_path, f"cls{s}", s, 0.5 + 0.1 * s, 0.8) for s in range(3)]
    reg = [fake_run(tmp_path, f"reg{s}", s, 0.6, 0.8, head="regress") for s in range(3)]
    for seed, run in enumerate(reg):
        fusion_report(run, blend=0.7 + 0.1 * seed, fused=0.9)
    fusion_report(cls[0], blend=0.4, fused=0.45)  # one classify run only: one seed
    args = [*map(str, cls + reg), "--seeds", "--out", str(tmp_path / "cmp")]
    assert main(args) == 0
    lines = (tmp_path / "cmp" / "seeds.md").read_text().splitlines()
    # the rows sit under their configuration; test kappa only (the report has no AUC)
    at = lines.index("| head=regress | 3 (0, 1, 2) | 0.600 ± 0.000 | 0.800 ± 0.000 |")
    assert lines[at + 1] == "| head=regress + both eyes blended | 3 (0, 1, 2) | 0.800 ± 0.100 | - |"
    assert lines[at + 2] == "| head=regress + both eyes fused | 3 (0, 1, 2) | 0.900 ± 0.000 | - |"
    assert "| head=classify + both eyes fused | 1 (0) | 0.450 | - |" in lines
    # paired by seed against the baseline (classify: 0.5, 0.6, 0.7): fused 0.9 -> +0.4, +0.3, +0.2
    assert (
        "| head=regress + both eyes fused | test kappa | 3 | +0.300 | [+0.200, +0.400] |" in lines
    )
    assert not any(
        line.startswith("| head=regress + both eyes fused | test referable AUC") for line in lines
    )
    (reg[1] / "fusion.json").write_text('{"kappa": {"val": {}}}')
    with pytest.raises(UserError, match=r"reg1/fusion.json holds no test kappa 'blend'"):
        main(args)
