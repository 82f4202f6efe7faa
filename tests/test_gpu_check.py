"""tools/gpu_check.sh on a machine without a GPU (this one), with DALI and webdataset hidden
and a driver of the CUDA 12 era faked; the step runner with fake steps (a time limit, a
failure, the JSON after every step); the GPU branch's commands checked against their
tools' parsers; the evaluation tolerance; fetch_wheels.sh --minimal, offline."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tools import gpu_check
from tools.gpu_check import NOT_CHECKED, Report, Step

ROOT = Path(__file__).resolve().parents[1]
DRIVER_12 = "550.54.15"  # a CUDA 12.4 driver: too old for a cu130 torch


def fake_wheel(folder: Path, name: str, version: str, module: str) -> Path:
    """A minimal pure-Python wheel of ``name`` (one module that imports), as pip builds one."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": module,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as whl:
        for member, text in files.items():
            whl.writestr(member, text)
    return path


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the branch without a GPU")
def test_without_a_gpu_it_stops_after_the_doctor_with_the_fix(tmp_path):
    """No GPU, DALI and webdataset hidden (a PYTHONPATH that shadows them), the webdataset and
    braceexpand wheels carried in WHEELS, an nvidia-smi answering for a CUDA 12 driver."""
    hide = tmp_path / "hide"
    (hide / "nvidia").mkdir(parents=True)
    (hide / "nvidia" / "__init__.py").write_text("")  # a namespace with no dali in it
    (hide / "webdataset").mkdir()
    (hide / "webdataset" / "__init__.py").write_text('raise ImportError("hidden")\n')
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "webdataset", "9.9.9", "__version__ = '9.9.9'\n")
    fake_wheel(wheels, "braceexpand", "0.1.7", "")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    executable(
        bin_ / "nvidia-smi",
        "#!/bin/sh\n"
        'case "$*" in *-L*) echo "GPU 0: NVIDIA H200 (UUID: GPU-0)";; '
        f"*driver_version*) echo {DRIVER_12};; *) echo smi;; esac\n",
    )
    out = tmp_path / "out"
    env = dict(
        os.environ,
        PYTHONPATH=str(hide),
        WHEELS=str(wheels),
        PATH=f"{bin_}:{os.environ['PATH']}",
        PYTHON=sys.executable,
        HF_HOME=str(tmp_path / "hf"),
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["status"] == "stopped" and report["stopped"] == "torch sees no CUDA GPU"
    facts = report["environment"]
    assert facts["gpu"] is False and facts["driver"] == DRIVER_12
    assert report["dali"] == facts["dali"] == NOT_CHECKED
    assert facts["webdataset"] == "9.9.9"  # installed from the carried wheels
    assert list(report["steps"]) == ["environment", "doctor"]  # the doctor ran anyway
    assert report["steps"]["doctor"]["status"] == "failed"  # it saw a GPU torch cannot use
    assert "torch sees none" in (out / "doctor.log").read_text()
    assert f"torch.version.cuda = {torch.version.cuda}" in proc.stdout
    assert f"NVIDIA driver: {DRIVER_12}" in proc.stdout
    if torch.version.cuda and int(torch.version.cuda.split(".")[0]) >= 13:
        fix = report["advice"][-1]
        assert fix.startswith("fix: torch is built for CUDA 13") and fix.endswith("/whl/cu126")
        assert fix in proc.stdout
    assert "dr-doctor" in (out / "doctor.log").read_text()


# ---------------------------------------------------------------- the step runner, faked


def say(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def fake_first(facts: dict):
    def first():
        return (
            Step("environment", say(f"print({json.dumps(json.dumps(facts))})"), 30),
            Step("doctor", say("print('dr-doctor: fine')"), 30),
        )

    return first


def test_each_step_has_its_limit_and_the_json_follows_every_step(tmp_path):
    out = tmp_path / "out"
    pid_file = tmp_path / "grandchild.pid"
    sleeper = (
        "import subprocess, time; "
        "p = subprocess.Popen(['sleep', '300']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(300)"
    )
    copy_json = f"import shutil; shutil.copy({str(out / 'gpu_check.json')!r}, {str(tmp_path / 'seen.json')!r})"

    def after_gpu(facts, work, out_dir):
        assert facts["dali"] == NOT_CHECKED and work.is_dir() and out_dir == out
        return [
            (Step("first", say("print('one')"), 30), lambda: {"figure": 1}),
            (Step("peek", say(copy_json), 30), None),
            (Step("slow", say(sleeper), 2), None),
            (Step("broken", say("raise SystemExit(3)"), 30), None),
        ]

    facts = {"gpu": True, "dali": NOT_CHECKED, "gpu_name": "fake"}
    code = gpu_check.check(out, 300, first=fake_first(facts), after_gpu=after_gpu)
    assert code == 1
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["environment", "doctor", "first", "peek", "slow", "broken"]
    assert report["environment"] == facts and report["dali"] == NOT_CHECKED
    assert steps["slow"]["status"] == "timed out" and steps["slow"]["exit"] is None
    assert steps["broken"]["status"] == "failed" and steps["broken"]["exit"] == 3
    assert report["figure"] == 1 and report["failed"] == ["slow", "broken"]
    assert report["status"] == "failed"
    seen = json.loads((tmp_path / "seen.json").read_text())  # as it was when "peek" started
    assert list(seen["steps"]) == ["environment", "doctor", "first"] and seen["figure"] == 1
    assert (out / "first.log").read_text() == "one\n"
    # the whole process group went: the step's own child too
    grandchild = int(pid_file.read_text())
    status = Path(f"/proc/{grandchild}/status")
    deadline = time.monotonic() + 60  # the kernel reaps asynchronously; not a speed limit
    while status.exists() and "\nState:\tZ" not in status.read_text():
        assert time.monotonic() < deadline, "the step's child outlived its time limit"
        time.sleep(0.1)


def test_a_step_past_the_runs_budget_is_skipped_not_started(tmp_path):
    report = Report(tmp_path)
    marker = tmp_path / "ran"
    result = gpu_check.run_step(
        Step("late", say(f"open({str(marker)!r}, 'w')"), 30), tmp_path, time.monotonic(), report
    )
    assert result["status"] == "skipped" and not marker.exists()
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["late"] == result


def test_without_a_gpu_the_doctor_still_runs_and_nothing_after(tmp_path):
    def after_gpu(facts, work, out):
        raise AssertionError("no GPU step may run")

    facts = {"gpu": False, "dali": "2.4.0", "torch": "2.11.0+cu130", "torch_cuda": "13.0"}
    facts |= {"driver": None}
    code = gpu_check.check(tmp_path, 300, first=fake_first(facts), after_gpu=after_gpu)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (
        code == 1
        and report["status"] == "stopped"
        and list(report["steps"])
        == [
            "environment",
            "doctor",
        ]
    )
    assert report["advice"][-1] == (
        "no NVIDIA driver answers on this machine: there is no GPU to check here"
    )


# ---------------------------------------------------------------- the GPU branch's commands


def parsed(cmd: list[str]):
    """The command's options through its own tool's parser (what it would run with)."""
    from tools.bench import bench_loader, gpu_train_bench
    from trainer import evaluate
    from trainer.fitting.config import parse_args

    if "trainer/train.py" in cmd:
        return parse_args(cmd[cmd.index("trainer/train.py") + 1 :])[0]
    from pipeline.cli import parse_config

    tools = {
        "tools/bench/bench_loader.py": bench_loader.BenchConfig,
        "tools/bench/gpu_train_bench.py": gpu_train_bench.GpuBenchConfig,
        "trainer/evaluate.py": evaluate.EvalConfig,
    }
    for script, config in tools.items():
        if script in cmd:
            return parse_config(config, cmd[cmd.index(script) + 1 :], prog=script, description="")
    return None


@pytest.mark.parametrize("dali", ["2.4.0", NOT_CHECKED])
def test_the_gpu_steps_use_dali_only_where_it_imports(dali, tmp_path):
    facts = {"gpu": True, "dali": dali, "cores": 16, "shm_free_gib": 60.0}
    steps = dict((step.name, step) for step, _ in gpu_check.gpu_steps(facts, tmp_path, tmp_path))
    # the acceptance steps first, the long benchmarks last
    assert list(steps) == [
        "data",
        "gpu_tests",
        "nvjpeg_parity",
        "train",
        "resume",
        "evaluate",
        "loader",
        "train_bench",
    ]
    backend = "dali" if dali != NOT_CHECKED else "torch-nvjpeg"  # what auto picks there
    loader = parsed(steps["loader"].cmd)
    expected = ["torch-gpu", "torch-nvjpeg", "decode-torch"]  # nvJPEG beside CPU decoding
    assert loader.paths == (
        ["dali-gpu", "decode-gpu"] + expected if dali != NOT_CHECKED else expected
    )
    assert loader.batch_size == 128 and loader.workers is None  # the product's own default
    # both windows inside one epoch of the 4,096-image train split (first and last batch out)
    epoch = gpu_check.TRAIN_IMAGES // gpu_check.LOADER_BATCH
    assert 1 + loader.warmup + loader.batches + 1 <= epoch
    bench = parsed(steps["train_bench"].cmd)
    assert bench.backend == backend and bench.batch_size == [64, 128] and bench.workers is None
    assert bench.arch == ["resnet18", "resnet50"] and bench.image_size == 512
    assert bench.warmup + bench.steps + 1 <= gpu_check.TRAIN_IMAGES // max(bench.batch_size)
    train = parsed(steps["train"].cmd)
    assert train.backend == backend and train.epochs == 1 and train.batch_size == 64
    assert train.workers is None
    assert "--mixed_precision" in steps["train"].cmd and "bf16" in steps["train"].cmd
    resume = parsed(steps["resume"].cmd)
    assert resume.resume and resume.epochs == 2 and resume.out == train.out
    evaluation = parsed(steps["evaluate"].cmd)
    assert str(evaluation.checkpoint) == f"{train.out}/best.pt"
    assert "--nvjpeg-parity" in steps["nvjpeg_parity"].cmd
    tests = steps["gpu_tests"].cmd
    assert "tests/test_loader.py" in tests and "tests/test_export.py" not in tests
    assert "tests/test_nvjpeg.py" in tests
    assert sum(s.limit_s for s in steps.values()) > gpu_check.BUDGET_S  # the budget is the cap
    assert all(s.limit_s <= 600 for s in steps.values())  # under a 10-minute command cap


def test_the_shared_data_folder(tmp_path):
    from pipeline.manifest import read_manifest
    from tools.bench.gpu_train_bench import make_shards

    root = make_shards(tmp_path / "data", 12, 64, distinct=6, eval_images=7)
    manifest = read_manifest(root)
    assert {s: manifest.split(s).samples for s in manifest.splits} == {
        "train": 12,
        "val": 7,
        "test": 7,
    }
    assert list(manifest.split("test").class_counts) == [2, 2, 1, 1, 1]  # image i: grade i % 5
    # every evaluation photograph is its own (no copies), train cycles its 6
    from pipeline.loading.samples import chunked, read_chunk
    from pipeline.shardformat import read_index

    def photographs(split):
        refs = [r for s in manifest.split(split).shards for r in read_index(root / s.index, s.file)]
        return [bytes(d) for c in chunked(refs) for _, d, _ in read_chunk(root, c)]

    test, val, train = photographs("test"), photographs("val"), photographs("train")
    assert len(set(test)) == 7 and len(set(val)) == 7 and not set(test) & set(val)
    assert len(set(train)) == 6 and not set(train) & (set(test) | set(val))


# ---------------------------------------------------------------- small pieces


def predictions(probs: np.ndarray):
    import pandas as pd

    table = pd.DataFrame({"key": [f"test{i}" for i in range(len(probs))]})
    table["pred"] = probs.argmax(axis=1)
    for grade in range(probs.shape[1]):
        table[f"p{grade}"] = probs[:, grade]
    return table


def test_evaluation_agrees_within_the_tolerance_a_planted_near_tie_included():
    """1,000 images whose probabilities move by bf16-like noise (< 0.005) agree. A planted
    near-tie (0.501/0.499 one way, 0.499/0.501 the other) changes grade and still agrees;
    a real flip (0.9/0.1 against 0.1/0.9), one image moved by 0.2, or other images do not."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, (1000, 5))
    logits[np.arange(1000), np.arange(1000) % 5] += 6  # every top grade clear of the noise
    trained = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    noisy = trained + rng.uniform(-0.004, 0.004, trained.shape)
    trained[7], noisy[7] = [0.501, 0.499, 0, 0, 0], [0.499, 0.501, 0, 0, 0]
    same = gpu_check.compare_predictions(predictions(trained), predictions(noisy))
    assert same["agree"] and same["images"] == 1000, same
    assert same["near_ties"] == 1 and same["grades_flipped"] == 0
    assert same["max_prob_diff"] < gpu_check.PROB_TOLERANCE
    flip_a, flip_b = trained.copy(), noisy.copy()
    flip_a[3], flip_b[3] = [0.1, 0.9, 0, 0, 0], [0.9, 0.1, 0, 0, 0]
    real = gpu_check.compare_predictions(predictions(flip_a), predictions(flip_b))
    assert not real["agree"] and real["grades_flipped"] == 1
    moved = noisy.copy()
    moved[5] = trained[5] + np.array([0.2, -0.2, 0, 0, 0])  # same grade, 0.2 apart
    moved_result = gpu_check.compare_predictions(predictions(trained), predictions(moved))
    assert not moved_result["agree"] and moved_result["images_beyond_tolerance"] == 1
    other = predictions(noisy).assign(key=lambda t: t["key"] + "x")
    assert not gpu_check.compare_predictions(predictions(trained), other)["agree"]


def test_trainer_and_evaluate_share_the_cudnn_settings():
    """One helper sets cuDNN for both: autotuned on a GPU unless the run was deterministic;
    evaluate.py applies the checkpoint's own choice."""
    from trainer import evaluate, train
    from trainer.base.distributed import cudnn_settings

    cases = [(True, False, True), (True, True, False), (False, False, False)]
    for gpu, deterministic, expected in cases:
        cudnn_settings(gpu, deterministic)
        assert torch.backends.cudnn.benchmark is expected
    torch.backends.cudnn.benchmark = False
    # both entry points call that one helper (imported where used, after parsing)
    assert "cudnn_settings(gpu, cfg.deterministic)" in Path(train.__file__).read_text()
    source = Path(evaluate.__file__).read_text()
    assert 'cudnn_settings(gpu, info.get("config", {}).get("deterministic", False))' in source
    assert source.count("from trainer.base.distributed import cudnn_settings") == 1


@pytest.mark.parametrize(
    ("torch_cuda", "driver", "end"),
    [
        (
            "13.0",
            DRIVER_12,
            "torch==2.11.0 torchvision==0.26.0 --index-url https://download.pytorch.org/whl/cu126",
        ),
        ("13.0", "470.57.02", "(CUDA 12: 525.60.13): update the NVIDIA driver"),
        (
            None,
            "580.82.07",
            "torch==2.11.0 torchvision==0.26.0 --index-url https://download.pytorch.org/whl/cu130",
        ),
        (
            "13.0",
            "580.82.07",
            "torch's CUDA suits this driver: see dr-doctor's GPUs line above for why",
        ),
    ],
)
def test_the_advice_without_a_gpu(torch_cuda, driver, end):
    facts = {"torch": "2.11.0+cu130", "torchvision": "0.26.0+cu130", "torch_cuda": torch_cuda}
    advice = gpu_check.no_gpu_advice(facts | {"driver": driver})
    assert advice[0] == f"torch 2.11.0+cu130: torch.version.cuda = {torch_cuda}"
    assert advice[1] == f"NVIDIA driver: {driver}"
    assert advice[-1].endswith(end)


def test_pytest_counts(tmp_path):
    log = tmp_path / "gpu_tests.log"
    log.write_text("..s\n2 passed, 1 skipped, 300 deselected, 1 warning in 9.1s\n")
    assert gpu_check.pytest_counts(log) == {"passed": 2, "skipped": 1, "deselected": 300}
    log.write_text("F.\n1 failed, 1 passed, 2 errors in 3.0s\n")
    assert gpu_check.pytest_counts(log) == {"failed": 1, "passed": 1, "error": 2}
    assert gpu_check.pytest_counts(tmp_path / "missing.log") == {}


def test_fetch_wheels_minimal_asks_pip_for_exactly_two_wheels(tmp_path):
    """Offline: a stand-in python3 records what pip would have been asked."""
    calls = tmp_path / "calls"
    fake = executable(
        tmp_path / "python3",
        f'#!/bin/sh\nfor a in "$@"; do printf \'%s\\n\' "$a"; done > {shlex.quote(str(calls))}\n',
    )
    dest = tmp_path / "wheels"
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "fetch_wheels.sh"), "--minimal", str(dest)],
        env=dict(os.environ, PYTHON=str(fake)),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    args = calls.read_text().splitlines()
    assert args[:3] == ["-m", "pip", "download"]
    assert "--no-deps" in args and args[args.index("--dest") + 1] == str(dest)
    packages = [a for a in args[3:] if not a.startswith("-") and a != str(dest)]
    assert packages == ["webdataset>=0.2.86", "braceexpand"]


def test_a_probe_that_fails_stops_the_run_saying_so(tmp_path):
    def first():
        return (
            Step("environment", say("raise SystemExit('torch: undefined symbol')"), 30),
            Step("doctor", say("print('dr-doctor')"), 30),
        )

    assert gpu_check.check(tmp_path, 300, first=first) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["stopped"] == "the environment probe failed"
    assert report["steps"]["doctor"]["status"] == "ok"  # the doctor ran all the same
    assert "undefined symbol" in (tmp_path / "environment.log").read_text()


def test_figures_are_read_defensively_and_the_json_never_stays_running(tmp_path):
    """A step's half-written file (its figures cannot be read) is recorded under
    figure_errors and the run goes on; one GPU is said to leave DDP unchecked; an error
    in the runner itself ends the JSON as "error", not "running"."""
    half = tmp_path / "half.json"

    def after_gpu(facts, work, out):
        return [
            (
                Step("writes_half", say(f"open({str(half)!r}, 'w').write('{{\"a\": 1')"), 30),
                lambda: json.loads(half.read_text()),
            ),
            (Step("after", say("print('fine')"), 30), lambda: {"after": True}),
        ]

    facts = {"gpu": True, "dali": NOT_CHECKED, "gpu_count": 1}
    assert gpu_check.check(tmp_path / "a", 300, first=fake_first(facts), after_gpu=after_gpu) == 0
    report = json.loads((tmp_path / "a" / "gpu_check.json").read_text())
    assert report["status"] == "passed" and report["after"] is True
    assert "JSONDecodeError" in report["figure_errors"]["writes_half"]
    assert report["ddp"] == "not checked (one GPU)"

    def broken(facts, work, out):
        raise KeyError("a bug in the runner")

    with pytest.raises(KeyError):
        gpu_check.check(tmp_path / "b", 300, first=fake_first(facts), after_gpu=broken)
    report = json.loads((tmp_path / "b" / "gpu_check.json").read_text())
    assert report["status"] == "error" and "a bug in the runner" in report["error"]


def test_a_probe_that_prints_half_a_line_counts_as_failed(tmp_path):
    def first():
        return (
            Step("environment", say("print('{\"gpu\": tr')"), 30),
            Step("doctor", say("print('dr-doctor')"), 30),
        )

    assert gpu_check.check(tmp_path, 300, first=first) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["status"] == "stopped" and report["stopped"] == "the environment probe failed"


def test_the_nvjpeg_parity_step_on_the_cpu_seam(tiny_shards, monkeypatch):
    """The parity step's code, with the decode on the CPU (both sides libjpeg-turbo): 0."""
    from pipeline.loading.nvjpeg import CPU_SEAM

    monkeypatch.setenv(CPU_SEAM, "1")
    found = gpu_check.nvjpeg_parity(tiny_shards, device="cpu", batch_size=4, image_size=64)
    assert found["images"] == 13 and found["max_abs_levels"] == 0 == found["mean_abs_levels"]
    assert found["torch_nvjpeg_images_per_s"] > 0 and found["torch_images_per_s"] > 0
