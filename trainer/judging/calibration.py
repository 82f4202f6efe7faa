"""How sure the model is: temperature scaling and the expected calibration error.

A network trained with cross-entropy is usually over-confident: of the photographs it
grades with 90 % confidence, fewer than 90 % are right. Temperature scaling (Guo et al.,
2017) divides the raw outputs by one scalar T > 0, fitted on val to minimise the negative
log-likelihood of the true grades:

- ``classify``: logits / T, then the softmax. The argmax, and so every grade, the
  confusion matrix and kappa, is unchanged.
- ``ordinal``: each "grade > k" logit / T. The sign of every logit is unchanged, so the
  median grade is too.
- ``regress``: no temperature (its probabilities come from the cut-points and their fixed
  softness); ``fit_temperature`` returns None and nothing is scaled.

The referable score P(grade >= 2) does change with T (for ``classify`` even its ranking
can), so the screening threshold is chosen on the calibrated scores.

ECE (equal-width bins of confidence: 15, fewer on a split under 150 images, ``bins_for``,
so that a bin holds about ten images): confidence is the probability the model gives its
own grade, correct whether that grade is the true one; ECE is the bin-weighted mean of
|accuracy - mean confidence|. 0 is perfectly calibrated.
"""

from __future__ import annotations

import numpy as np

from trainer.base.heads import Head

ECE_BINS = 15
MIN_BINS, IMAGES_PER_BIN = 5, 10  # a small split: fewer bins, so the curve is not noise
SCALED_HEADS = ("classify", "ordinal")
LOG_T_RANGE = (np.log(0.05), np.log(20.0))  # T from 0.05 (sharpen) to 20 (soften)


def bins_for(samples: int) -> int:
    """Confidence bins for a split of ``samples`` images: 15, or about ten images a bin."""
    return int(min(ECE_BINS, max(MIN_BINS, samples // IMAGES_PER_BIN)))


def scaled(outputs: np.ndarray, temperature: float | None) -> np.ndarray:
    """Raw outputs divided by the temperature (unchanged without one)."""
    return outputs if not temperature else outputs / np.float32(temperature)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true grades."""
    picked = probs[np.arange(len(labels)), labels].astype(np.float64)
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def fit_temperature(head: Head, outputs: np.ndarray, labels: np.ndarray) -> float | None:
    """The T minimising the NLL of ``labels`` under ``head.probs(outputs / T)``; None for a
    head without one, or a split too small to fit it on (fewer than two images)."""
    if head.name not in SCALED_HEADS or len(labels) < 2:
        return None

    def loss(log_t: float) -> float:
        return nll(head.probs(scaled(outputs, float(np.exp(log_t)))), labels)

    from scipy.optimize import minimize_scalar  # on first use: a second of start-up

    found = minimize_scalar(loss, bounds=LOG_T_RANGE, method="bounded", options={"xatol": 1e-4})
    # the bounded search never tries T = 1 exactly; keep it when it is as good
    return 1.0 if loss(0.0) <= found.fun else float(np.exp(found.x))


def confidence(probs: np.ndarray, grades: np.ndarray) -> np.ndarray:
    """The probability each image's own grade gets."""
    return probs[np.arange(len(grades)), grades]


def reliability(
    probs: np.ndarray, grades: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin: (mean confidence, accuracy, count); empty bins hold nan."""
    conf = confidence(probs, grades)
    correct = (grades == labels).astype(np.float64)
    which = np.clip((conf * bins).astype(int), 0, bins - 1)  # 1.0 goes into the last bin
    count = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, conf, minlength=bins) / count
        accuracy = np.bincount(which, correct, minlength=bins) / count
    return mean_conf, accuracy, count


def ece(probs: np.ndarray, grades: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over ``bins`` equal-width confidence bins."""
    mean_conf, accuracy, count = reliability(probs, grades, labels, bins)
    filled = count > 0
    if not filled.any():
        return 0.0
    gap = np.abs(accuracy[filled] - mean_conf[filled])
    return float((gap * count[filled]).sum() / count.sum())


def plot_reliability(
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path, title: str = ""
) -> None:
    """A reliability diagram: accuracy against confidence per bin, one line per curve
    (name -> (probs, grades, labels)), its ECE in the legend and each bin's image count
    beside its point, the diagonal for reference; bins by the split's size (``bins_for``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.2))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    for name, (probs, grades, labels) in curves.items():
        bins = bins_for(len(labels))
        mean_conf, accuracy, count = reliability(probs, grades, labels, bins)
        filled = count > 0
        (line,) = ax.plot(
            mean_conf[filled],
            accuracy[filled],
            "o-",
            label=f"{name} (ECE {ece(probs, grades, labels, bins):.3f}, {bins} bins)",
        )
        for x, y, n in zip(mean_conf[filled], accuracy[filled], count[filled], strict=True):
            ax.annotate(f"{int(n)}", (x, y), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=line.get_color())  # fmt: skip
    ax.set(
        xlabel="confidence in the predicted grade",
        ylabel="share of those grades that are right",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title=title,
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the trainer's use


def ece_figures(result, prefix: str = "") -> dict[str, float]:
    """An ``EvalResult``'s ECE before (``ece_raw``) and after (``ece``) its temperature,
    keys prefixed (``val_``); equal for a head without one."""
    raw, bins = result.with_temperature(None), bins_for(result.samples)
    return {
        f"{prefix}ece_raw": ece(raw.probs, raw.grades, raw.labels, bins),
        f"{prefix}ece": ece(result.probs, result.grades, result.labels, bins),
    }


def reliability_curves(result) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """An ``EvalResult``'s reliability curves before and after its temperature."""
    curves = {}
    if result.temperature:
        raw = result.with_temperature(None)
        curves["before temperature"] = (raw.probs, raw.grades, raw.labels)
        curves[f"after (T = {result.temperature:.3f})"] = (
            result.probs,
            result.grades,
            result.labels,
        )
    else:
        curves["no temperature"] = (result.probs, result.grades, result.labels)
    return curves
