"""What a training run prints: the set-up block, the epoch table, the progress bar, the verdict.

Rank 0 prints (``accelerator.print``); the full record of a run is config.json and
metrics.jsonl, this is for the person watching or reading the log.
"""

from __future__ import annotations

from pathlib import Path

from trainer.fitting.checkpoint import last_dir

HEADER = (
    f"{'epoch':>7} {'train loss':>10} {'train acc':>9} {'val kappa':>9} {'test loss':>9} "
    f"{'test acc':>8} {'kappa':>6} {'ref AUC':>7} {'img/s':>8} {'time':>7} {'lr':>9}  test recall 0-4"
)
# the set-up block: (label, config keys) per line; config.json keeps every field
SETUP_LINES = (
    ("model", ("arch", "head", "pretrained", "weights", "ema")),
    ("data", ("shards", "image_size", "augment", "workers")),
    ("optimiser", ("recipe", "optimizer", "lr", "momentum", "weight_decay", "schedule")),
    ("length", ("epochs", "batch_size", "grad_accumulation", "seed")),
)
ENVIRONMENT_KEYS = ("backend", "device", "device_name", "world_size", "mixed_precision")
VERSION_KEYS = ("git_commit", "python", "torch", "torchvision", "accelerate", "dali")


def setup_block(config: dict, env: dict, out: Path) -> str:
    """The run's config and environment in a few readable lines (all of it is in config.json)."""
    lines = [f"run folder {out} (config.json holds the whole config and environment)"]
    for label, keys in SETUP_LINES:
        lines.append(f"  {label:<10}" + ", ".join(_pair(k, config.get(k)) for k in keys))
    lines.append(f"  {'running':<10}" + ", ".join(_pair(k, env.get(k)) for k in ENVIRONMENT_KEYS))
    lines.append(f"  {'versions':<10}" + ", ".join(_pair(k, env.get(k)) for k in VERSION_KEYS))
    return "\n".join(lines)


def _pair(key: str, value) -> str:
    if isinstance(value, bool):
        value = "yes" if value else "no"
    elif isinstance(value, float):
        value = f"{value:g}"
    return f"{key.replace('_', ' ')} {'-' if value is None else value}"


def format_row(row: dict, epochs: int) -> str:
    """The epoch's line under HEADER: test's figures, or dashes when the shards have no test."""
    val = f"{row['val_qwk']:>9.3f}" if "val_qwk" in row else f"{'-':>9}"
    if "test_qwk" in row:
        recall = "/".join(f"{r:.2f}" for r in row["test_recall"])
        auc = row["test_referable_auc"]
        test = (
            f"{row['test_loss']:>9.4f} {100 * row['test_acc']:>7.1f}% {row['test_qwk']:>6.3f} "
            + (f"{auc:>7.3f}" if auc is not None else f"{'-':>7}")
        )
    else:
        recall, test = "(no test split)", f"{'-':>9} {'-':>8} {'-':>6} {'-':>7}"
    return (
        f"{row['epoch']:>3}/{epochs:<3} {row['train_loss']:>10.4f} {100 * row['train_acc']:>8.1f}% {val} "
        f"{test} {row['images_per_s']:>8.1f} {row['epoch_s']:>6.1f}s {row['lr']:>9.2e}  {recall}"
    )


def final_line(best: dict, chooser: str, out: Path) -> str:
    """The run's verdict: the test figures at the epoch chosen on ``chooser``."""
    screening_part = ""
    if best.get("test_referable_auc") is not None:
        screening_part = f", referable DR AUC {best['test_referable_auc']:.3f}"
        if best.get("test_sensitivity") is not None and best.get("test_specificity") is not None:
            screening_part += (
                f" (sensitivity {best['test_sensitivity']:.2f}, "
                f"specificity {best['test_specificity']:.2f})"
            )
    chosen = f"best {chooser} kappa {best[f'{chooser}_qwk']:.4f}"
    if best.get("selected_by", "").endswith("_mse"):
        chosen = f"lowest {chooser} MSE {best[f'{chooser}_mse']:.4f} ({chooser} kappa {best[f'{chooser}_qwk']:.4f})"
    chosen = f"{chosen} at epoch {best['epoch']}"
    if "test_qwk" not in best:
        return f"{chosen}; no test split to report; run folder {out}"
    return (
        f"{chosen}; test at that epoch: kappa {best['test_qwk']:.4f}, accuracy "
        f"{100 * best['test_acc']:.1f} %{screening_part}; run folder {out}"
    )


def stopped_message(err: Exception, epoch: int, out: Path) -> str:
    last = last_dir(out)
    kept = (
        f"the last good checkpoint, {last}, is kept" if last.exists() else "no epoch had finished"
    )
    return (
        f"{err} of epoch {epoch}; training stopped and {kept}. Lower --lr (or add "
        "--warmup-epochs) and start again, or continue with --resume --lr SMALLER"
    )


class EpochProgress:
    """A rich bar with the running loss on a terminal (rank 0, not --quiet); nothing otherwise."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            import rich.progress as rp

            self.bar = rp.Progress(
                rp.TextColumn("{task.description}"),
                rp.BarColumn(),
                rp.MofNCompleteColumn(),
                rp.TextColumn("loss {task.fields[loss]}"),
                rp.TimeRemainingColumn(),
                transient=True,
            )

    def start(self, description: str, total: int) -> None:
        if self.bar:
            self.task = self.bar.add_task(description, total=total, loss="-")
            self.bar.start()

    def advance(self, loss: float | None) -> None:
        if self.bar:
            fields = {"loss": f"{loss:.4f}"} if loss is not None else {}
            self.bar.update(self.task, advance=1, **fields)

    def stop(self) -> None:
        if self.bar:
            self.bar.stop()
            self.bar.remove_task(self.task)
