"""``--smoke``: a one-minute check that training works on this machine, on a fixture shipped
with the package.

    accelerate launch trainer/train.py --arch resnet18 --smoke   # whatever is here
    dr-train --smoke --backend torch --out /tmp/smoke            # one process, one backend

It trains on ``trainer/fixture/`` (40 synthetic photographs at 64 px, built by
``tools/make_fixture.py``) for 2 epochs at batch 4 per process, with every other option as
given (--arch, --backend, --precision, ...), on the CPU, one GPU or all of them. The run
folder is --out, or a new ``dr-smoke-*`` folder in the temp folder (kept; not runs/, so
a check leaves nothing in the current folder, which may not be writable). After training,
``best.pt`` is evaluated again through ``trainer/evaluate.py`` and the run folder is
checked; the last line says what ran:

    smoke test passed: backend dali-cpu, device cpu, world size 1, precision no; ...

or, exit status 1, ``error: smoke test failed: <what>``.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import replace
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import RunError, UserError
from pipeline.manifest import read_manifest
from trainer.base.metrics import read_confusion_csv
from trainer.base.runfiles import CONFIG_FILE, CONFUSION_DIR, SUMMARY_FILE, read_metrics
from trainer.fitting.config import TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator
# best.pt's and last/'s modules import torch: loaded where used, so that the commands that
# import this module (dr-train, dr-make-fixture) answer --help before torch is loaded

FIXTURE_PACKAGE, FIXTURE_FOLDER = "trainer", "fixture"
FIXTURE_IMAGES, FIXTURE_SIZE = 40, 64
EPOCHS, BATCH_SIZE = 2, 4  # 32 train images: 8 steps an epoch on one process, 1 on eight
# what --smoke decides; giving one of these as well is a mistake worth one line
FIXED = ("shards", "image_size", "epochs", "batch_size", "resume")
EVAL_FOLDER = "eval"


def fixture_dir(must_exist: bool = True) -> Path:
    """The fixture folder inside the installed package (a wheel or a checkout alike)."""
    path = Path(str(files(FIXTURE_PACKAGE) / FIXTURE_FOLDER))
    if must_exist and not (path / "manifest.json").is_file():
        raise UserError(
            f"the smoke-test fixture is missing from the installed package ({path}); "
            "reinstall dr-grader, or rebuild it with tools/make_fixture.py"
        )
    return path


def smoke_config(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """``cfg`` with the fixture, 64 px, 2 epochs and batch 4."""
    clash = sorted(name for name in FIXED if name in given)
    if clash:
        flags = ", ".join("--" + name.replace("_", "-") for name in clash)
        raise UserError(f"--smoke sets its own data, size and length; drop {flags}")
    return replace(
        cfg,
        shards=str(fixture_dir()),
        image_size=FIXTURE_SIZE,
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
    )


def run_folder() -> str:
    """A new folder for a smoke run without --out (called on the main process only)."""
    return tempfile.mkdtemp(prefix="dr-smoke-")


def finish(accelerator: Accelerator, cfg: TrainConfig, out: Path, env: dict) -> None:
    """Evaluate best.pt on every rank, check the run folder, print the verdict (main process).

    Called after training, before ``end_training``: evaluate.py joins the ranks' results.
    """
    from trainer.base.bestfile import BEST_FILE
    from trainer.evaluate import main as evaluate  # its own Accelerator shares this one's state

    args = ["--checkpoint", str(out / BEST_FILE), "--shards", cfg.shards]
    evaluate([*args, "--split", reported_split(cfg.shards), "--out", str(out / EVAL_FOLDER)])
    if not accelerator.is_main_process:
        return
    problems = check_run(out, cfg)
    if problems:
        raise RunError(f"smoke test failed: {'; '.join(problems)} (run folder {out})")
    print(verdict(env, out), flush=True)


def reported_split(shards: str | Path) -> str:
    """The split a run reports: test, or val when the shards have no test split."""
    return "test" if read_manifest(shards).has("test") else "val"


def check_run(out: Path, cfg: TrainConfig) -> list[str]:
    """What is wrong with a finished smoke run folder (nothing, if it passed)."""
    from trainer.base.bestfile import BEST_FILE
    from trainer.fitting.checkpoint import last_dir

    problems = []
    for path in (out / CONFIG_FILE, out / SUMMARY_FILE, out / BEST_FILE, last_dir(out)):
        if not path.exists():
            problems.append(f"{path.name} was not written")
    rows = read_metrics(out)
    if [r["epoch"] for r in rows] != list(range(1, cfg.epochs + 1)):
        return [*problems, f"metrics.jsonl has epochs {[r['epoch'] for r in rows]}"]
    manifest = read_manifest(cfg.shards)
    split = reported_split(cfg.shards)
    for row in rows:
        if not all(math.isfinite(row[k]) for k in ("train_loss", f"{split}_loss", f"{split}_qwk")):
            problems.append(f"epoch {row['epoch']} logged a non-finite loss or kappa")
    count = manifest.split(split).samples
    chooser = "val" if manifest.has("val") else "test"
    key = rows[-1].get("selected_by", f"{chooser}_qwk")  # trainer/judging/selection.py's statistic
    sign = -1 if key.endswith("_mse") else 1
    best = max(rows, key=lambda r: sign * r[key])  # the first of equals, as the trainer keeps
    logged = read_confusion_csv(out / CONFUSION_DIR / f"{split}_epoch_{best['epoch']:03d}.csv")
    if logged.sum() != count:
        problems.append(f"epoch {best['epoch']} counted {logged.sum()} of {count} {split} images")
    again = json.loads((out / EVAL_FOLDER / "metrics.json").read_text())
    same = (
        again["checkpoint_epoch"] == best["epoch"]
        and again["accuracy"] == best[f"{split}_acc"]
        and again["qwk"] == best[f"{split}_qwk"]
        and again["recall"] == best[f"{split}_recall"]
        and again["confusion"] == logged.tolist()
    )
    if not same:
        problems.append(
            f"evaluate.py on best.pt gave accuracy {again['accuracy']:.4f}, kappa "
            f"{again['qwk']:.4f}, not the logged {best[f'{split}_acc']:.4f}, "
            f"{best[f'{split}_qwk']:.4f} of epoch {best['epoch']}"
        )
    return problems


def verdict(env: dict, out: Path) -> str:
    """The one line that says what the smoke run exercised."""
    device = env["device"].split(":")[0]
    if device == "cuda":  # which GPU model matters; the CPU's name adds nothing
        device += f" ({env['device_name']})"
    return (
        f"smoke test passed: backend {env['backend']}, device {device}, "
        f"world size {env['world_size']}, precision "
        f"{env['mixed_precision']}; trained {EPOCHS} epochs, best.pt re-evaluated as logged; "
        f"run folder {out}"
    )
