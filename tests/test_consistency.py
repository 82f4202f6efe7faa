"""What a run shows is true: every number of summary.json, the best line of metrics.jsonl,
report.html (its data-values and the text beside each figure, gallery scores included) and
evaluate's metrics.json and figures.md, recomputed here independently (scikit-learn, scipy,
numpy) from the predictions CSVs' raw outputs, must agree: to 1e-6, or to the printed
precision for text.

Two finished runs: a classify head with its temperature (test_report's run, both eyes of
each patient), and a regress head with tuned cut-points on paired shards (test_recipes'),
evaluated again with --pair-eyes.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, softmax
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    log_loss,
    roc_auc_score,
    roc_curve,
)

from tests.conftest import python, shared
from tests.test_recipes import build_paired_shards, build_regress_run
from tests.test_report import _report_run

SOFTNESS = 0.25  # the regress head's documented P(grade >= k) = sigmoid((s - c_k) / 0.25)
NUMBER = r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)"


# ---------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory) -> Path:
    return shared(tmp_path_factory, "report_run", _report_run)


@pytest.fixture(scope="module")
def regress_run(tmp_path_factory) -> tuple[Path, Path]:
    shards = shared(tmp_path_factory, "paired_shards", build_paired_shards)
    run = shared(tmp_path_factory, "regress_run", lambda tmp: build_regress_run(shards, tmp))
    return run, shards


def evaluated(tmp_path_factory, run: Path, shards: Path, *options: str) -> Path:
    """evaluate.py on best.pt's test split into a folder of its own (built once)."""

    def build(tmp: Path) -> Path:
        python(
            "trainer/evaluate.py",
            *("--checkpoint", run / "best.pt", "--shards", shards, "--out", tmp / "eval"),
            *options,
            tmp=tmp,
        )
        return tmp / "eval"

    return shared(tmp_path_factory, f"consistency-eval-{run.parent.name}", build)


# ---------------------------------------------------------------- recomputed independently


def files(run: Path) -> tuple[dict, list[dict], dict]:
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, json.loads((run / "config.json").read_text())["config"]


def predictions(run: Path, split: str, epoch: int) -> pd.DataFrame:
    return pd.read_csv(run / "predictions" / f"{split}_epoch_{epoch:03d}.csv")


def partner_of(keys: list[str]) -> np.ndarray:
    where = {k: i for i, k in enumerate(keys)}
    other = {"left": "right", "right": "left"}
    return np.array([where.get(re.sub(r"_(left|right)$", lambda m: "_" + other[m[1]], k), -1)
                     for k in keys])  # fmt: skip


def probabilities(head: str, outputs: np.ndarray, best: dict, cuts=None) -> np.ndarray:
    """(N, 5) as the docs define them: softmax(z / T) or the regress head's cut-points."""
    if head == "classify":
        return softmax(outputs / (best["temperature"] or 1.0), axis=1)
    above = expit((outputs[:, :1] - np.asarray(cuts or best["cut_points"])) / SOFTNESS)
    ones, zeros = np.ones((len(above), 1)), np.zeros((len(above), 1))
    return np.hstack([ones, above]) - np.hstack([above, zeros])


def grades(head: str, outputs: np.ndarray, cuts) -> np.ndarray:
    if head == "classify":
        return outputs.argmax(axis=1)
    return (outputs[:, :1] > np.asarray(cuts)).sum(axis=1)


def blended(keys: list[str], outputs: np.ndarray, weight: float) -> np.ndarray:
    partner = partner_of(keys)
    mixed = outputs.copy()
    has = partner >= 0
    mixed[has] = (1 - weight) * outputs[has] + weight * outputs[partner[has]]
    return mixed


def kappa(true, pred) -> float:
    value = cohen_kappa_score(true, pred, weights="quadratic", labels=list(range(5)))
    return 0.0 if np.isnan(value) else float(value)


def auc(positive, score) -> float | None:
    return None if positive.all() or not positive.any() else float(roc_auc_score(positive, score))


def ece(probs: np.ndarray, pred: np.ndarray, true: np.ndarray) -> tuple[float, int, list[int]]:
    """ECE over equal-width confidence bins (15, or one per ten images, at least 5), the
    bin count and the images per bin."""
    bins = int(min(15, max(5, len(true) // 10)))
    conf = probs[np.arange(len(pred)), pred]
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total, counts = 0.0, []
    for b in range(bins):
        inside = which == b
        counts.append(int(inside.sum()))
        if inside.any():
            total += abs((pred[inside] == true[inside]).mean() - conf[inside].mean()) * inside.sum()
    return total / len(true), bins, counts


def split_figures(head: str, table: pd.DataFrame, best: dict) -> dict:
    """A split's figures of metrics.jsonl, from its predictions table's raw outputs."""
    outputs = table[[c for c in table.columns if c.startswith("out")]].to_numpy(np.float64)
    true, keys = table["true"].to_numpy(), list(table["key"])
    cuts = best["cut_points"]
    probs, pred = probabilities(head, outputs, best), grades(head, outputs, cuts)
    # the CSV's own columns are what these outputs give
    np.testing.assert_allclose(table[[f"p{g}" for g in range(5)]], probs, atol=1e-6)
    np.testing.assert_array_equal(table["pred"], pred)
    np.testing.assert_allclose(table["referable_score"], probs[:, 2:].sum(axis=1), atol=1e-6)
    referable, score = true >= 2, probs[:, 2:].sum(axis=1)
    flagged = refers(table["referable_score"], best["referable_threshold"])
    raw = softmax(outputs, axis=1) if head == "classify" else probs
    mixed = blended(keys, outputs, best["pair_blend"])
    cm = confusion_matrix(true, pred, labels=list(range(5)))
    figures = {
        "acc": accuracy_score(true, pred),
        "qwk": kappa(true, pred),
        "qwk_paired": kappa(true, grades(head, mixed, best["pair_cut_points"] or cuts)),
        "recall": [float(cm[g, g] / cm[g].sum()) if cm[g].sum() else 0.0 for g in range(5)],
        "referable_auc": auc(referable, score),
        "any_dr_auc": auc(true >= 1, probs[:, 1:].sum(axis=1)),
        "sensitivity": float(flagged[referable].mean()) if referable.any() else None,
        "specificity": float((~flagged[~referable]).mean()) if (~referable).any() else None,
        "ece": ece(probs, pred, true)[0],
        "ece_raw": ece(raw, grades(head, outputs, cuts), true)[0],
    }
    if head == "classify":  # no class weights in this run: the plain mean cross-entropy
        figures["loss"] = log_loss(true, softmax(outputs, axis=1), labels=list(range(5)))
    else:
        figures["loss"] = figures["mse"] = float(np.mean((outputs[:, 0] - true) ** 2))
    return figures


def refers(scores, threshold: float) -> np.ndarray:
    """Score >= threshold as computed: in float32, which the CSV's 9 digits give back exactly
    (a threshold is one of val's scores, so a float64 recomputation can fall either side)."""
    return np.asarray(scores, np.float32) >= np.float32(threshold)


def assert_close(shown, expected, what: str, tol: float = 1e-6) -> None:
    if expected is None or shown is None:
        assert shown is None and expected is None, what
    elif isinstance(expected, list):
        np.testing.assert_allclose(shown, expected, atol=tol, err_msg=what)
    else:
        assert shown == pytest.approx(expected, abs=tol), what


def assert_printed(text: str, expected: float, what: str) -> None:
    """A number printed with its decimals agrees with ``expected`` to that precision."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    assert abs(float(text) - expected) <= 0.5 * 10**-decimals + 1e-9, (
        f"{what}: {text} vs {expected}"
    )


def check_run(run: Path) -> tuple[dict, dict, dict[str, pd.DataFrame]]:
    """summary.json and the best line of metrics.jsonl against the predictions CSVs."""
    summary, rows, config = files(run)
    best, head = summary["best"], config["head"]
    assert best == next(r for r in rows if r["epoch"] == summary["best_epoch"])
    assert summary["selected_by"] == best["selected_by"]
    key = best["selected_by"]
    values = [r[key] for r in rows]
    chosen = values.index(min(values) if key.endswith("_mse") else max(values))
    assert rows[chosen]["epoch"] == summary["best_epoch"], "the best epoch is the selected one"
    tables = {s: predictions(run, s, best["epoch"]) for s in ("val", "test")}
    for split, table in tables.items():
        for name, value in split_figures(head, table, best).items():
            tol = 1e-5 if name == "loss" else 1e-6  # float32 sums over batches
            assert_close(best[f"{split}_{name}"], value, f"{split}_{name}", tol)
    assert summary["test_at_best_epoch"] == {k[5:]: v for k, v in best.items() if k[:5] == "test_"}
    # the operating point: the highest threshold reaching 90 % sensitivity on val (calibrated)
    val = tables["val"]
    _, tpr, thresholds = roc_curve(
        val["true"] >= 2, val["referable_score"], drop_intermediate=False
    )
    assert best["referable_threshold"] == pytest.approx(thresholds[np.argmax(tpr >= 0.9)], abs=1e-6)
    # "useless" is said exactly when val's predictions fall on one grade of several
    val_collapsed = val["pred"].nunique() == 1 and val["true"].nunique() > 1
    assert any("collapsed" in w for w in summary["warnings"]) == val_collapsed
    losses = [r["train_loss"] for r in rows]
    assert any("diverged" in w for w in summary["warnings"]) == (losses[-1] > 3 * losses[0])
    return summary, config, tables


# ---------------------------------------------------------------- the report's text


def report_text(run: Path) -> tuple[str, dict, list[str]]:
    page = (run / "report.html").read_text()
    shown = dict(re.findall(r'data-key="(\w+)" data-value="([^"]+)"', page))
    captions = [html.unescape(c) for c in re.findall(r"<figcaption>(.*?)</figcaption>", page)]
    return page, shown, captions


def check_roc_caption(caption: str, table: pd.DataFrame, threshold: float, outputs: str) -> None:
    true, score = table["true"].to_numpy(), table["referable_score"].to_numpy()
    probs = table[[f"p{g}" for g in range(5)]].to_numpy()
    match = re.search(
        rf"ROC of {re.escape(outputs)}, (\d+) images: AUC {NUMBER}; operating point: threshold "
        rf"{NUMBER}, sensitivity {NUMBER}, specificity {NUMBER}; any DR \(grade >= 1\) AUC {NUMBER}",
        caption,
    )
    assert match, caption
    assert int(match[1]) == len(true)
    flagged = refers(score, threshold)
    assert_printed(match[2], roc_auc_score(true >= 2, score), "ROC AUC")
    assert_printed(match[3], threshold, "threshold")
    assert_printed(match[4], flagged[true >= 2].mean(), "sensitivity")
    assert_printed(match[5], (~flagged[true < 2]).mean(), "specificity")
    assert_printed(match[6], roc_auc_score(true >= 1, probs[:, 1:].sum(axis=1)), "any DR AUC")


def check_reliability_caption(caption: str, split: str, table, head: str, best: dict) -> None:
    outputs = table[[c for c in table.columns if c.startswith("out")]].to_numpy(np.float64)
    true = table["true"].to_numpy()
    probs = table[[f"p{g}" for g in range(5)]].to_numpy()
    after, bins, counts = ece(probs, table["pred"].to_numpy(), true)
    raw = softmax(outputs, axis=1) if head == "classify" else probs
    before = ece(raw, grades(head, outputs, best["cut_points"]), true)[0]
    match = re.search(
        rf"{split} \((\d+) images, (\d+) bins\): ECE {NUMBER} before the temperature, {NUMBER} "
        r"after \((?:T = ([0-9.e-]+)|no temperature)\); images per bin after: ([0-9/]+)\.",
        caption,
    )
    assert match, caption
    assert (int(match[1]), int(match[2])) == (len(true), bins)
    assert_printed(match[3], before, f"{split} ECE before")
    assert_printed(match[4], after, f"{split} ECE after")
    if best["temperature"]:
        assert float(match[5]) == pytest.approx(best["temperature"], rel=1e-3)
    assert [int(c) for c in match[6].split("/")] == counts


def check_report(run: Path, summary: dict, config: dict, tables: dict) -> None:
    page, shown, captions = report_text(run)
    best = summary["best"]
    body = page.split("<body>")[1]
    if summary["warnings"]:  # first on the page, each as summary.json says it
        top = body.split('<section id="warnings" class="warning">')[1].split("</section>")[0]
        assert body.index("warnings") < body.index('<section id="run">')
        assert re.findall(r"<li>(.*?)</li>", top) == [html.escape(w) for w in summary["warnings"]]
    else:
        assert 'id="warnings"' not in body
    for key, value in shown.items():  # every data-value is the summary's figure
        assert float(value) == pytest.approx(best[key], abs=1e-12), key
    figures = {f"{s}_{k}" for s in ("val", "test") for k in ("qwk", "qwk_paired", "acc", "loss")}
    figures |= {"referable_threshold", "pair_blend"}
    assert figures <= set(shown), figures - set(shown)
    how = "lowest val MSE" if best["selected_by"] == "val_mse" else "highest val kappa"
    assert f"Epoch {best['epoch']}, the {how}" in page
    roc = next(c for c in captions if c.startswith("Referable DR"))
    check_roc_caption(roc, tables["test"], best["referable_threshold"], "each eye alone")
    reliability = next(c for c in captions if "bins)" in c)
    for split in ("val", "test"):
        check_reliability_caption(reliability, split, tables[split], config["head"], best)
    # recall: each cell as printed, a grade of the split never predicted marked
    recall = page.split('<section id="recall">')[1].split("</section>")[0]
    for split in ("val", "test"):
        cells = re.search(rf"<th>{split}</th>(.*?)</tr>", recall)[1]
        printed = re.findall(r"<td[^>]*>([0-9.]+)( \(none found\))?</td>", cells)
        true = tables[split]["true"].to_numpy()
        for grade, (text, marked) in enumerate(printed):
            assert_printed(text, best[f"{split}_recall"][grade], f"{split} recall {grade}")
            assert bool(marked) == (float(text) == 0 and (true == grade).any()), (split, grade)
    # the gallery: each score as the CSV has it, on the same side of the threshold as printed
    test = tables["test"].set_index("key")
    gallery = [c for c in captions if re.match(r"\S+: true \d", c)]
    assert gallery, "no gallery captions"
    for caption in gallery:
        key, true, pred, score, limit = re.match(
            rf"(\S+): true (\d), predicted (\d), referable score {NUMBER} \(threshold {NUMBER}\)",
            caption,
        ).groups()
        row = test.loc[key]
        assert (int(true), int(pred)) == (row["true"], row["pred"]), caption
        assert_printed(score, row["referable_score"], f"{key} score")
        assert_printed(limit, best["referable_threshold"], "gallery threshold")
        refer = refers([row["referable_score"]], best["referable_threshold"])[0]
        assert (float(score) >= float(limit)) == refer, f"{caption}: printed on the wrong side"


def check_evaluate(folder: Path, summary: dict, config: dict, tables: dict, paired: bool) -> None:
    """evaluate's metrics.json and figures.md against its own predictions.csv, and its
    single-eye and both-eyes kappas against the run's."""
    metrics = json.loads((folder / "metrics.json").read_text())
    table = pd.read_csv(folder / "predictions.csv")
    best = summary["best"]
    true, pred = table["true"].to_numpy(), table["pred"].to_numpy()
    probs = table[[f"p{g}" for g in range(5)]].to_numpy()
    score = table["referable_score"].to_numpy()
    threshold = metrics["referable_threshold"]
    assert threshold == best["referable_threshold"]
    flagged = refers(score, threshold)
    assert_close(metrics["qwk"], kappa(true, pred), "qwk")
    assert_close(metrics["accuracy"], accuracy_score(true, pred), "accuracy")
    cm = confusion_matrix(true, pred, labels=list(range(5)))
    assert metrics["confusion"] == cm.tolist()
    assert_close(metrics["referable_auc"], auc(true >= 2, score), "referable_auc")
    assert_close(metrics["any_dr_auc"], auc(true >= 1, probs[:, 1:].sum(axis=1)), "any_dr_auc")
    assert_close(metrics["sensitivity"], flagged[true >= 2].mean(), "sensitivity")
    assert_close(metrics["specificity"], (~flagged[true < 2]).mean(), "specificity")
    assert_close(metrics["ece"], ece(probs, pred, true)[0], "ece")
    # each eye alone is the run's test figure; both eyes blended its paired one
    assert_close(metrics["qwk_eye_alone"], best["test_qwk"], "qwk each eye alone")
    assert_close(metrics["qwk_both_eyes"], best["test_qwk_paired"], "qwk both eyes")
    train_table = tables["test"].set_index("key").loc[table["key"]]
    outputs = train_table[[c for c in train_table.columns if c.startswith("out")]].to_numpy()
    head = config["head"]
    if paired:
        outputs = blended(list(table["key"]), outputs, best["pair_blend"])
        cuts = best["pair_cut_points"] or best["cut_points"]
        assert metrics["outputs"] == f"both eyes blended w={best['pair_blend']:.2f}"
    else:
        cuts = best["cut_points"]
        assert metrics["outputs"] == "each eye alone"
        assert_close(metrics["ece_raw"], best["test_ece_raw"], "ece_raw")
    np.testing.assert_allclose(probs, probabilities(head, outputs, best, cuts), atol=1e-6)
    np.testing.assert_array_equal(pred, grades(head, outputs, cuts))
    text = (folder / "figures.md").read_text()
    roc = next(line for line in text.splitlines() if line.startswith("Referable DR"))
    check_roc_caption(roc, table, threshold, metrics["outputs"])


# ---------------------------------------------------------------- the tests


def test_classify_run_with_its_temperature_shows_what_its_predictions_say(
    classify_run, tmp_path_factory
):
    summary, config, tables = check_run(classify_run)
    assert config["head"] == "classify" and summary["best"]["temperature"] not in (None, 1.0)
    check_report(classify_run, summary, config, tables)
    shards = Path(config["shards"])
    check_evaluate(
        evaluated(tmp_path_factory, classify_run, shards), summary, config, tables, paired=False
    )


def test_regress_run_with_cut_points_and_both_eyes_shows_what_its_predictions_say(
    regress_run, tmp_path_factory
):
    run, shards = regress_run
    summary, config, tables = check_run(run)
    best = summary["best"]
    assert config["head"] == "regress" and best["selected_by"] == "val_mse"
    assert best["cut_points"] != [0.5, 1.5, 2.5, 3.5], "--tune-cuts tunes them"
    assert min(np.diff(best["cut_points"])) >= 0.5 - 1e-9, "every grade keeps a band >= 0.5"
    check_report(run, summary, config, tables)
    folder = evaluated(tmp_path_factory, run, shards, "--pair-eyes")
    check_evaluate(folder, summary, config, tables, paired=True)
