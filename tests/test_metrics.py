"""trainer/base/metrics.py against sklearn on random labels, and the CSV/PNG writers."""

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import cohen_kappa_score
from sklearn.metrics import confusion_matrix as sk_confusion

from pipeline.constants import CLASS_NAMES
from trainer.base.metrics import (
    accuracy,
    confusion_of,
    kappa_of,
    plot_confusion,
    quadratic_kappa,
    read_confusion_csv,
    recall_per_class,
    write_confusion_csv,
)


@pytest.fixture
def pairs():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 5, 300)
    pred = np.where(rng.random(300) < 0.6, true, rng.integers(0, 5, 300))
    return true, pred


def test_confusion_matches_sklearn_rows_true_columns_predicted(pairs):
    true, pred = pairs
    cm = confusion_of(true, pred)
    np.testing.assert_array_equal(cm, sk_confusion(true, pred, labels=range(5)))
    one = confusion_of(np.array([3]), np.array([1]))
    assert one[3, 1] == 1 and one.sum() == 1
    assert kappa_of(true, pred) == pytest.approx(quadratic_kappa(cm), abs=1e-12)


def test_metrics_from_the_matrix_equal_those_from_the_labels(pairs):
    true, pred = pairs
    cm = sk_confusion(true, pred, labels=range(5))
    assert accuracy(cm) == pytest.approx(np.mean(true == pred))
    assert quadratic_kappa(cm) == pytest.approx(cohen_kappa_score(true, pred, weights="quadratic"))
    for grade, recall in enumerate(recall_per_class(cm)):
        assert recall == pytest.approx(np.mean(pred[true == grade] == grade))


def test_kappa_edge_cases():
    perfect = np.diag([5, 4, 3, 2, 1])
    assert quadratic_kappa(perfect) == pytest.approx(1.0)
    all_zero = np.zeros((5, 5), dtype=int)
    all_zero[:, 0] = [50, 5, 10, 2, 1]  # predicts grade 0 for everything: high accuracy, kappa 0
    assert accuracy(all_zero) == pytest.approx(50 / 68)
    assert quadratic_kappa(all_zero) == pytest.approx(0.0)
    assert quadratic_kappa(np.zeros((5, 5), dtype=int)) == 0.0
    single = np.zeros((5, 5), dtype=int)
    single[2, 2] = 7  # one grade only: kappa undefined, reported as 0
    assert quadratic_kappa(single) == 0.0
    assert recall_per_class(single) == [0.0, 0.0, 1.0, 0.0, 0.0]
    # a one-grade miss costs far less than a four-grade miss
    near, far = np.diag([10] * 5), np.diag([10] * 5)
    near[4, 4], near[4, 3] = 5, 5
    far[4, 4], far[4, 0] = 5, 5
    assert quadratic_kappa(near) > quadratic_kappa(far)


def test_csv_round_trip_and_png(tmp_path, pairs):
    true, pred = pairs
    cm = sk_confusion(true, pred, labels=range(5))
    write_confusion_csv(cm, tmp_path / "epoch_001.csv")
    np.testing.assert_array_equal(read_confusion_csv(tmp_path / "epoch_001.csv"), cm)
    lines = (tmp_path / "epoch_001.csv").read_text().splitlines()
    assert lines[0].split(",")[1:] == list(CLASS_NAMES)
    assert [line.split(",")[0] for line in lines[1:]] == list(CLASS_NAMES)
    plot_confusion(cm, tmp_path / "epoch_001.png", title="epoch 1")
    with Image.open(tmp_path / "epoch_001.png") as img:
        width, height = img.size
        assert width > 2 * height * 0.9  # two panels side by side
        assert len(np.unique(np.asarray(img.convert("L")))) > 20  # not blank
    empty_row = cm.copy()
    empty_row[4] = 0  # a grade absent from the split must not break the row-normalised panel
    plot_confusion(empty_row, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0
