"""``--smoke`` for real: the project built as a wheel, installed outside the checkout, run
through ``accelerate launch`` on two CPU ranks from a folder that is not the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.loading.loader import dali_available
from pipeline.manifest import read_manifest, verify_split
from trainer.config import TrainConfig, parse_args
from trainer.smoke import EVAL_FOLDER, check_run, smoke_config

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "pipeline", "trainer", "tools")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A regular (not editable) install of the project's wheel in a folder of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
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
    env = dict(
        os.environ,
        PYTHONPATH=str(site),
        HF_HOME=str(tmp / "hf"),
        TMPDIR=str(tmp / "tmp"),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


def test_the_installed_package_carries_the_fixture(installed, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "from trainer.smoke import fixture_dir; print(fixture_dir())"],
        cwd=tmp_path,
        env=env_for(installed, tmp_path),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    found = Path(proc.stdout.strip())
    assert found == installed / "trainer" / "fixture"
    manifest = read_manifest(found)
    for split in manifest.splits:
        verify_split(manifest, split, full=True)


@pytest.fixture(scope="module")
def smoke_run(installed, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``accelerate launch --multi_gpu --num_processes 2 trainer/train.py --smoke``."""
    tmp = tmp_path_factory.mktemp("smoke")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        str(installed / "trainer" / "train.py"),
        "--arch",
        "resnet18",
        "--smoke",
        "--quiet",
    ]
    (tmp / "cwd").mkdir()
    proc = subprocess.run(
        cmd, cwd=tmp / "cwd", env=env_for(installed, tmp), capture_output=True, text=True
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
    assert (run / EVAL_FOLDER / "confusion_test.csv").is_file()
    assert check_run(run, TrainConfig(**config)) == []


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
