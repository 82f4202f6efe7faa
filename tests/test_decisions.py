"""What val decides (trainer/base/decisions.py, trainer/judging/deciding.py), the regress
head's cut-points, the run warnings, and the small rules of what figures print."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.errors import UserError
from tests.conftest import python
from tools import doctor
from trainer.base.bestfile import add_to_best, open_best
from trainer.base.decisions import Decisions
from trainer.base.heads import DEFAULT_CUTS, MIN_BAND, build_head, tune_cuts
from trainer.base.metrics import kappa_of
from trainer.base.model import build_model
from trainer.fitting.checkpoint import save_best
from trainer.judging.calibration import bins_for
from trainer.judging.captions import score_text
from trainer.judging.deciding import decide, tunes_cuts
from trainer.judging.evaluation import EvalResult
from trainer.judging.run_page import chosen_row, selection_sentence
from trainer.judging.sanity import collapsed, guess_loss, run_warnings


def test_decisions_round_trip_and_refuse_bad_values_in_one_line():
    decisions = Decisions(
        cut_points=(0.4, 1.5, 2.5, 3.6), temperature=0.63, pair_blend=0.3, referable_threshold=0.2
    )
    stored = decisions.to_dict()
    assert stored["cut_points"] == [0.4, 1.5, 2.5, 3.6] and stored["pair_cut_points"] is None
    assert Decisions.from_dict(stored, "x") == decisions
    assert decisions.blend_cuts == (0.4, 1.5, 2.5, 3.6)
    for key, bad in (
        ("temperature", -1.0),
        ("temperature", float("nan")),
        ("cut_points", [0.5, 2.5, 1.5, 3.5]),
        ("cut_points", [0.5, 1.5]),
        ("pair_blend", "0.3"),
        ("pair_blend", 1.5),
        ("referable_threshold", float("inf")),
    ):
        with pytest.raises(UserError, match=f"^best.pt: {key} must") as err:
            Decisions.from_dict(stored | {key: bad}, "best.pt")
        assert "\n" not in str(err.value)
    with pytest.raises(TypeError):
        Decisions(None, 0.5)  # keyword only: no value lands in the wrong field


def test_open_best_reads_the_decisions_and_refuses_a_damaged_one(tmp_path):
    path = tmp_path / "best.pt"
    row = {"temperature": 0.7, "referable_threshold": 0.25, "pair_blend": 0.1}
    save_best(path, build_model("resnet18", 5).state_dict(), arch="resnet18", image_size=64,
              epoch=3, metrics=row, config={})  # fmt: skip
    best = open_best(path)
    assert best.decisions == Decisions(temperature=0.7, referable_threshold=0.25, pair_blend=0.1)
    assert best.head.name == "classify" and not best.model.training
    add_to_best(path, "temperature", -0.7)
    with pytest.raises(UserError, match="temperature.*positive"):  # checked where best.pt is read
        open_best(path)


def test_keyword_only_results_keep_the_temperature_where_it_belongs():
    logits = np.array([[2.0, 0, 0, 0, 0], [0, 0, 3.0, 0, 0]], np.float32)
    result = EvalResult(keys=["1_left", "1_right"], labels=np.array([0, 2]), outputs=logits)
    calibrated = result.decided(Decisions(temperature=2.0))
    expected = torch.softmax(torch.from_numpy(logits) / 2, dim=1).numpy()
    np.testing.assert_allclose(calibrated.probs, expected, atol=1e-6)
    assert calibrated.features is None and calibrated.grades.tolist() == [0, 2]


def noisy_scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Grades squeezed into a third of the score range, plus noise: unconstrained tuning on a
    few labels places cut-points closer than half a grade."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(5, size=n, p=[0.5, 0.1, 0.2, 0.1, 0.1])
    return 0.3 * labels + 0.2 + rng.normal(0, 0.1, n), labels


def test_tuned_cut_points_leave_every_grade_a_band_of_half_a_grade():
    scores, labels = noisy_scores(300)
    cuts = tune_cuts(scores, labels)
    assert min(np.diff(cuts)) >= MIN_BAND - 1e-9, cuts
    start = kappa_of(labels, (scores[:, None] > DEFAULT_CUTS).sum(axis=1))
    assert kappa_of(labels, (scores[:, None] > cuts).sum(axis=1)) >= start


def test_small_val_keeps_the_fixed_cut_points_unless_asked():
    assert not tunes_cuts("regress", 499, asked=False)
    assert tunes_cuts("regress", 499, asked=True) and tunes_cuts("regress", 500, asked=False)
    assert not tunes_cuts("classify", 10_000, asked=True)
    scores, labels = noisy_scores(48, seed=1)
    keys = [f"{i // 2}_{'left' if i % 2 else 'right'}" for i in range(48)]
    val = EvalResult(keys=keys, labels=labels, outputs=scores[:, None].astype(np.float32),
                     head=build_head("regress"))  # fmt: skip
    fixed = decide(val, tune=False)
    assert fixed.cut_points == DEFAULT_CUTS and fixed.pair_cut_points is None
    assert fixed.temperature is None and fixed.referable_threshold is not None
    tuned = decide(val, tune=True)
    assert tuned.cut_points != DEFAULT_CUTS and min(np.diff(tuned.cut_points)) >= MIN_BAND - 1e-9


def test_a_useless_run_says_so():
    counts = np.zeros((5, 5), int)
    counts[:, 0] = [30, 5, 8, 3, 2]  # every val photograph graded 0
    assert collapsed(counts) == 0
    healthy = [{"epoch": 1, "train_loss": 1.5}, {"epoch": 2, "train_loss": 1.1}]
    assert run_warnings(healthy, "val", np.eye(5, dtype=int), guess_loss("classify", None)) == []
    found = run_warnings(healthy, "val", counts, guess_loss("classify", None))
    assert len(found) == 1 and "collapsed onto grade 0 (all 48 images of 5 grades)" in found[0]
    diverged = [{"epoch": 1, "train_loss": 2790.0}]
    found = run_warnings(diverged, "val", None, guess_loss("classify", None))
    assert len(found) == 1 and "training loss ended at 2790, far above" in found[0]
    assert guess_loss("regress", [1, 0, 0, 0, 1]) == pytest.approx(4.0)


def test_figures_print_what_a_reader_compares():
    # a regress run's gallery printed "0.01" against a threshold of 0.0102
    assert (score_text(0.0100, 0.0102), score_text(0.0102, 0.0102)) == ("0.01000", "0.01020")
    assert score_text(0.66500001, 0.66492426) == "0.6650"
    assert score_text(0.66492430, 0.66492426) == "0.66492430"  # digits until they differ
    assert (bins_for(48), bins_for(120), bins_for(5000)) == (5, 12, 15)


def test_the_selection_sentence_follows_selected_by():
    rows = [
        {"epoch": 1, "val_qwk": 0.5, "val_mse": 0.9, "selected_by": "val_mse"},
        {"epoch": 2, "val_qwk": 0.3, "val_mse": 0.7, "selected_by": "val_mse"},
    ]
    best = chosen_row(rows, "val")
    assert best["epoch"] == 2  # not the highest kappa
    assert selection_sentence(best, "val").startswith("Epoch 2, the lowest val MSE")
    assert selection_sentence({"epoch": 1}, "val").startswith("Epoch 1, the highest val kappa.")


def test_doctor_judges_bf16_as_the_trainer_does(monkeypatch):
    """Emulated bf16 (torch's default check says yes) is no bf16 for the trainer."""
    monkeypatch.setattr(doctor, "torch_gpus", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: not k)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert "fp16" in doctor.check_precision().found


def test_splits_evaluated_together_keep_the_checkpoint_decisions():
    from trainer.judging.external import combined

    logits = np.array([[2.0, 0, 0, 0, 0], [0, 0, 3.0, 0, 0]], np.float32)
    decided = Decisions(temperature=2.0)
    parts = [
        EvalResult(keys=[key], labels=np.array([g]), outputs=logits[i : i + 1]).decided(decided)
        for i, (key, g) in enumerate((("1_left", 0), ("1_right", 2)))
    ]
    together = combined(parts)
    assert together.temperature == 2.0
    np.testing.assert_allclose(together.probs, np.vstack([p.probs for p in parts]), atol=1e-7)


def test_every_panel_has_a_legend_and_a_y_label(monkeypatch, tmp_path):
    import io

    import matplotlib.pyplot as plt

    from tools.compare_runs import Run, plot_runs
    from trainer.judging.run_page import plot_curves

    closed = []
    monkeypatch.setattr(plt, "close", closed.append)
    rows = [
        {"epoch": e, "train_loss": 1.0 / e, "val_qwk": 0.1 * e, "test_acc": 0.5} for e in (1, 2)
    ]
    plot_curves(rows, 2, io.BytesIO())
    metrics = pd.DataFrame(rows).assign(val_acc=0.4, test_loss=1.0, test_qwk=0.2)
    plot_runs([Run(path=tmp_path, name="r", epochs_planned=2, finished=True, metrics=metrics)],
              tmp_path / "compare.png")  # fmt: skip
    for fig in closed:
        for ax in fig.axes:
            assert ax.get_legend() is not None and ax.get_ylabel(), ax.get_title()


def test_a_diverged_run_says_so_in_the_log_the_summary_and_the_report(tmp_path):
    """One epoch at --lr 0.5 on the shipped fixture: the loss ends far above ln 5."""
    fixture = Path(__file__).resolve().parents[1] / "trainer" / "fixture"
    proc = python(
        "trainer/train.py",
        *("--shards", fixture, "--out", tmp_path / "run", "--epochs", "1", "--lr", "0.5"),
        *("--image-size", "64", "--batch-size", "4", "--backend", "torch", "--workers", "0"),
        "--quiet",
        tmp=tmp_path,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    diverged = [w for w in summary["warnings"] if "training diverged" in w]
    assert len(diverged) == 1 and f"warning: {diverged[0]}" in proc.stdout
    page = (tmp_path / "run" / "report.html").read_text()
    assert page.index('<section id="warnings"') < page.index('<section id="run">')
    assert html.escape(diverged[0]) in page
