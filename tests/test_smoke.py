"""``--smoke`` for real: the project built as a wheel, installed outside the checkout, run
through ``accelerate launch`` on two CPU ranks from a folder that is not the repository."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.loading.loader import dali_available
from pipeline.manifest import read_manifest, verify_split
from tests.conftest import launch, metrics_rows, run, run_env, shared
from trainer.base.metrics import read_confusion_csv
from trainer.fitting.config import TrainConfig, parse_args
from trainer.smoke import EVAL_FOLDER, check_run, smoke_config

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "pipeline", "trainer", "tools")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A regular (not editable) install of the project's wheel in a folder of its own."""
    return shared(tmp_path_factory, "installed_wheel", _installed)


def _installed(tmp: Path) -> Path:
    src = tmp / "src"  # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist")]
    subprocess.run([*build, str(tmp / "src")], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("*.whl")
    install = [*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)]
    subprocess.run(install, check=True, capture_output=True)
    return tmp / "site"


def env_for(site: Path, tmp: Path) -> dict:
    """The installed copy first on the path; no user accelerate config; temp folders in tmp."""
    (tmp / "tmp").mkdir(exist_ok=True)
    return run_env(tmp, PYTHONPATH=str(site), TMPDIR=str(tmp / "tmp"))


@pytest.mark.slow
def test_the_installed_package_carries_the_fixture(installed, tmp_path):
    proc = run(
        [sys.executable, "-c", "from trainer.smoke import fixture_dir; print(fixture_dir())"],
        tmp_path,
        cwd=tmp_path,
        env=env_for(installed, tmp_path),
    )
    found = Path(proc.stdout.strip())
    assert found == installed / "trainer" / "fixture"
    manifest = read_manifest(found)
    for split in manifest.splits:
        verify_split(manifest, split, full=True)


@pytest.fixture(scope="module")
def smoke_run(installed, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``accelerate launch --multi_gpu --num_processes 2 trainer/train.py --smoke``."""
    return shared(tmp_path_factory, "smoke_run", lambda tmp: _smoke_run(installed, tmp))


def _smoke_run(installed: Path, tmp: Path) -> tuple[subprocess.CompletedProcess, Path]:
    (tmp / "cwd").mkdir()
    proc = launch(
        installed / "trainer" / "train.py",
        *("--arch", "resnet18", "--smoke", "--quiet"),
        tmp=tmp,
        processes=2,
        check=False,
        cwd=tmp / "cwd",
        env=env_for(installed, tmp),
    )
    return proc, tmp


@pytest.mark.slow
def test_smoke_on_two_ranks_from_any_folder(smoke_run, installed):
    proc, tmp = smoke_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    backend = "dali-cpu" if dali_available() else "torch"
    match = re.fullmatch(
        rf"smoke test passed: backend {backend}, device cpu, world size 2, precision no; "
        r"trained 2 epochs, best.pt re-evaluated as logged; run folder (\S+)",
        last,
    )
    assert match, last
    run = Path(match[1])
    assert run.parent == tmp / "tmp" and run.name.startswith("dr-smoke-")
    assert list((tmp / "cwd").iterdir()) == []  # nothing written where it was started
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["shards"] == str(installed / "trainer" / "fixture")
    assert (config["image_size"], config["epochs"], config["batch_size"]) == (64, 2, 4)
    # what "best.pt re-evaluated as logged" claims, read from the run folder here
    rows = metrics_rows(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    best = max(rows, key=lambda r: r["val_qwk"])  # the fixture has a val split
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] == best["epoch"] and summary["chosen_on"] == "val"
    (first, second) = summary["weights_sha256_per_rank"]
    assert first == second
    again = json.loads((run / EVAL_FOLDER / "metrics.json").read_text())
    assert again["checkpoint_epoch"] == best["epoch"] and again["world_size"] == 2
    assert (
        again["samples"] == read_manifest(installed / "trainer" / "fixture").split("test").samples
    )
    assert (again["accuracy"], again["qwk"]) == (best["test_acc"], best["test_qwk"])
    logged = read_confusion_csv(run / "confusion" / f"test_epoch_{best['epoch']:03d}.csv")
    assert (read_confusion_csv(run / EVAL_FOLDER / "confusion_test.csv") == logged).all()


@pytest.mark.slow
def test_a_run_whose_evaluation_disagrees_fails_the_check(smoke_run, tmp_path):
    proc, tmp = smoke_run
    run = tmp_path / "run"
    shutil.copytree(Path(proc.stdout.strip().splitlines()[-1].rsplit(" ", 1)[1]), run)
    again = run / EVAL_FOLDER / "metrics.json"
    metrics = json.loads(again.read_text())
    again.write_text(json.dumps(metrics | {"qwk": metrics["qwk"] + 0.5}))
    (run / "summary.json").unlink()
    config = json.loads((run / "config.json").read_text())["config"]
    problems = check_run(run, TrainConfig(**config))
    assert problems[0] == "summary.json was not written"
    assert problems[1].startswith("evaluate.py on best.pt gave accuracy")


def test_smoke_refuses_the_options_it_sets():
    cfg, given = parse_args(["--smoke", "--epochs", "3", "--image-size", "128"])
    with pytest.raises(UserError, match=r"^--smoke sets .*; drop --epochs, --image-size$"):
        smoke_config(cfg, given)
