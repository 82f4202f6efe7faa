"""The GPU acceptance run: does the product's GPU path work on this machine, with whatever
is importable here, and how fast is it? ``bash tools/gpu_check.sh OUT`` starts it (and
first makes carried webdataset/braceexpand wheels importable); docs/gpu.md explains the
steps and the JSON.

    python -m tools.gpu_check --out OUT            # the run (about 5 minutes on one H100/H200)
    python -m tools.gpu_check --probe              # this machine's facts as one JSON line
    python -m tools.gpu_check --make-data DIR      # the synthetic shard folder the steps share

Every step is a child process with its own time limit (its whole process group is killed
when it runs over) and its own log ``OUT/<step>.log``; ``OUT/gpu_check.json`` is rewritten
after each step, so a run stopped at any point keeps every figure measured so far. The
steps never take more than ``--budget-s`` together: a step that would start after it is
recorded as skipped. Without a GPU the run stops after ``dr-doctor --no-smoke`` with
torch's CUDA version, the driver's and the torch wheel that fits them. Without DALI it
checks the torch backend on the GPU and records ``"dali": "not installed: not checked"``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cli import arg, parse_config, run_cli
from pipeline.fileio import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
JSON_FILE = "gpu_check.json"
NOT_CHECKED = "not installed: not checked"
BUDGET_S = 360  # the whole run, data included, on one H100/H200
MIN_STEP_S = 10  # a step with less time left than this is skipped, not started
# The synthetic shard folder: 512 px like the EyePACS shards, cycling 256 distinct JPEGs
# (decoding costs the same whether bytes repeat); a 1,024-image test split so that one image
# graded differently moves accuracy by less than 1e-3.
IMAGE_SIZE, TRAIN_IMAGES, EVAL_IMAGES = 512, 4096, 1024
LOADER_BATCH = 128
BENCH_BATCHES, BENCH_ARCHS = (64, 128), ("resnet18", "resnet50")
BENCH_STEPS, BENCH_WARMUP = 40, 10
TRAIN_BATCH = 64
# Time limits per step, seconds: each several times what the step takes on an H100/H200.
LIMITS = {
    "environment": 60,
    "doctor": 90,
    "data": 90,
    "gpu_tests": 120,
    "loader": 120,
    "train_bench": 200,
    "train": 150,
    "resume": 120,
    "evaluate": 90,
}


# ---------------------------------------------------------------- facts about this machine


def probe() -> dict:
    """Python, torch and its CUDA, the GPU, the driver, DALI, webdataset: what the run needs."""
    import platform

    from tools import doctor

    facts: dict = {"python": platform.python_version(), "cores": os.cpu_count()}
    facts["driver"] = doctor.driver_version()
    facts["kernel_gpus"] = doctor.kernel_gpus()
    facts["shm_free_gib"] = _free_gib("/dev/shm")
    try:
        import torch
    except Exception as err:
        return facts | {"torch": None, "torch_error": str(err), "gpu": False}
    facts |= {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    facts["gpu"] = torch.cuda.is_available()
    if facts["gpu"]:
        from trainer.base.distributed import native_bf16

        props = torch.cuda.get_device_properties(0)
        facts |= {
            "gpu_name": props.name,
            "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "capability": list(torch.cuda.get_device_capability(0)),
            "bf16_native": native_bf16(),
            "cudnn": torch.backends.cudnn.version(),
        }
    for name, module in (("torchvision", "torchvision"), ("accelerate", "accelerate")):
        facts[name] = _version(module)
    facts["webdataset"] = _version("webdataset") or "not installed"
    facts["dali"] = _version("nvidia.dali") or NOT_CHECKED
    return facts


def _version(module: str) -> str | None:
    try:
        imported = __import__(module, fromlist=["__version__"])
    except Exception:  # a DALI built for another CUDA can fail with more than ImportError
        return None
    return getattr(imported, "__version__", "unknown")


def _free_gib(path: str) -> float | None:
    try:
        return round(shutil.disk_usage(path).free / 2**30, 1)
    except OSError:
        return None


def no_gpu_advice(facts: dict) -> list[str]:
    """What to print when torch sees no GPU: the versions, the driver, and the fix."""
    from tools import doctor

    driver, cuda = facts.get("driver"), facts.get("torch_cuda")
    lines = [
        f"torch {facts.get('torch')}: torch.version.cuda = {cuda}",
        f"NVIDIA driver: {driver or 'none found (no /proc/driver/nvidia, no nvidia-smi)'}",
    ]
    if facts.get("torch") is None:
        return [*lines, "fix: torch does not import here; install torch and torchvision first"]
    if driver is None:
        return [*lines, "no NVIDIA driver answers on this machine: there is no GPU to check here"]
    if not cuda:
        return [*lines, f"fix: this torch is a CPU-only build; {torch_fix(facts)}"]
    major = int(cuda.split(".")[0])
    if doctor.driver_suffices(12, driver) is False:
        return [
            *lines,
            f"fix: driver {driver} is older than any current torch wheel needs "
            f"(CUDA 12: {doctor.MIN_DRIVER[12]}): update the NVIDIA driver",
        ]
    if doctor.driver_suffices(major, driver) is False:
        return [
            *lines,
            f"fix: torch is built for CUDA {cuda}, which needs driver >= "
            f"{doctor.MIN_DRIVER[major]}: update the driver, or {torch_fix(facts)}",
        ]
    return [*lines, "torch's CUDA suits this driver: see dr-doctor's GPUs line above for why"]


def torch_fix(facts: dict) -> str:
    """The pip command for the same torch/torchvision built for a CUDA this driver runs."""
    from tools import doctor

    driver = facts.get("driver")
    tag = "cu130" if doctor.driver_suffices(13, driver) else "cu126"
    pins = [
        f"{name}=={facts[name].split('+')[0]}"
        for name in ("torch", "torchvision")
        if facts.get(name)
    ]
    return (
        f"pip install --force-reinstall {' '.join(pins) or 'torch torchvision'} "
        f"--index-url {doctor.TORCH_INDEX}/{tag}"
    )


# ---------------------------------------------------------------- steps and the report


@dataclass
class Step:
    name: str
    cmd: list[str]
    limit_s: float


@dataclass
class Report:
    """``OUT/gpu_check.json``, rewritten whole (atomically) whenever something is added."""

    out: Path
    data: dict = field(default_factory=dict)

    def add(self, **items) -> None:
        self.data.update(items)
        atomic_write_json(self.out / JSON_FILE, self.data)


def run_step(step: Step, out: Path, deadline: float, report: Report) -> dict:
    """Run ``step`` within its limit and the run's deadline; record and print its outcome."""
    left = deadline - time.monotonic()
    if left < MIN_STEP_S:
        result = {"status": "skipped", "why": "the run's time budget was spent"}
    else:
        result = _run_logged(step.cmd, out / f"{step.name}.log", min(step.limit_s, left))
    report.data.setdefault("steps", {})[step.name] = result
    report.add()
    print(f"== {step.name}: {result['status']}" + _took(result), flush=True)
    if result["status"] != "skipped":
        log = (out / f"{step.name}.log").read_text(errors="replace").splitlines()
        print("\n".join(f"   {line}" for line in log[-8:]), flush=True)
    return result


def _took(result: dict) -> str:
    return f" ({result['seconds']} s, limit {result['limit_s']} s)" if "seconds" in result else ""


def _run_logged(cmd: list[str], log: Path, limit: float) -> dict:
    """``cmd`` in its own process group, output to ``log``; killed whole past ``limit`` s."""
    begin = time.monotonic()
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        except BaseException:  # Ctrl-C: leave no child behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    status = "timed out" if code is None else "ok" if code == 0 else "failed"
    return {
        "status": status,
        "exit": code,
        "seconds": round(time.monotonic() - begin, 1),
        "limit_s": round(limit),
        "log": log.name,
    }


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def launch(*args: str) -> list[str]:
    """``accelerate launch`` of the trainer on this one GPU, bf16, as a user would start it."""
    return python(
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "bf16",
        "--dynamo_backend",
        "no",
        "trainer/train.py",
        *args,
    )


# ---------------------------------------------------------------- reading what steps wrote


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pytest_counts(log: Path) -> dict:
    """{"passed": 3, "skipped": 1, ...} from pytest's summary line."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    found = re.findall(
        r"(\d+) (passed|failed|skipped|errors?|deselected)", lines[-1] if lines else ""
    )
    return {word.rstrip("s") if word.startswith("error") else word: int(n) for n, word in found}


def loader_figures(bench: dict | None) -> list[dict] | None:
    if not bench:
        return None
    keep = ("path", "what", "images_per_s", "first_batch_s", "vs_decode_limit")
    return [{k: r.get(k) for k in keep} for r in bench["results"]]


def compare_evaluation(logged: dict, logged_cm, evaluated: dict, evaluated_cm) -> dict:
    """The trainer's logged test figures against ``evaluate.py``'s in a fresh process.

    A fresh process may pick other cuDNN kernels (bf16 sums in another order), so the two
    agree when their confusion matrices are within one image (same true grades, at most one
    image graded differently) and accuracy and kappa are within 1e-3 of each other beyond
    what that one image changes.
    """
    import numpy as np

    from trainer.base.metrics import quadratic_kappa

    logged_cm, evaluated_cm = np.asarray(logged_cm), np.asarray(evaluated_cm)
    same_images = (
        logged_cm.shape == evaluated_cm.shape
        and (logged_cm.sum(axis=1) == evaluated_cm.sum(axis=1)).all()
    )
    moved = int(np.abs(logged_cm - evaluated_cm).sum() // 2) if same_images else None
    total = max(int(logged_cm.sum()), 1)
    accuracy_diff = abs(logged["test_acc"] - evaluated["accuracy"])
    kappa_diff = abs(logged["test_qwk"] - evaluated["qwk"])
    kappa_moved = (
        abs(quadratic_kappa(logged_cm) - quadratic_kappa(evaluated_cm)) if same_images else 0.0
    )
    agree = (
        moved is not None
        and moved <= 1
        and accuracy_diff <= 1e-3 + moved / total
        and kappa_diff <= 1e-3 + kappa_moved
    )
    return {
        "agree": bool(agree),
        "images_graded_differently": moved,
        "accuracy_diff": accuracy_diff,
        "kappa_diff": kappa_diff,
        "tolerance": "confusion within one image; accuracy and kappa within 1e-3 beyond it",
    }


def trainer_figures(run: Path, evaluation: Path) -> dict:
    """The trainer's epochs as logged, evaluate.py's test figures, and whether they agree."""
    from trainer.base.bestfile import load_best
    from trainer.base.metrics import read_confusion_csv

    rows_path = run / "metrics.jsonl"
    rows = (
        [json.loads(ln) for ln in rows_path.read_text().splitlines()] if rows_path.is_file() else []
    )
    keep = (
        "epoch",
        "train_loss",
        "test_acc",
        "test_qwk",
        "images_per_s",
        "epoch_s",
        "first_batch_s",
    )
    figures: dict = {"epochs": [{k: r.get(k) for k in keep} for r in rows]}
    evaluated = read_json(evaluation / "metrics.json")
    if not (rows and evaluated and (run / "best.pt").is_file()):
        return figures
    best_epoch = load_best(run / "best.pt")[1]["epoch"]
    logged = next(r for r in rows if r["epoch"] == best_epoch)
    figures["evaluate"] = {
        "epoch": best_epoch,
        "accuracy": evaluated["accuracy"],
        "qwk": evaluated["qwk"],
    }
    figures["comparison"] = compare_evaluation(
        logged,
        read_confusion_csv(run / "confusion" / f"test_epoch_{best_epoch:03d}.csv"),
        evaluated,
        read_confusion_csv(evaluation / "confusion_test.csv"),
    )
    return figures


# ---------------------------------------------------------------- the run


def gpu_test_files() -> list[str]:
    """The test files with GPU tests: only those are collected, so that a test file needing a
    package this machine lacks (onnx, scikit-image) cannot stop the GPU tests."""
    tests = sorted((REPO / "tests").glob("test_*.py"))
    return [str(p.relative_to(REPO)) for p in tests if "pytest.mark.gpu" in p.read_text()]


def loader_workers(facts: dict) -> int:
    """Workers for the torch backend: the cores less two (the main process, DALI's or the
    trainer's thread), fewer when /dev/shm cannot hold their prefetched uint8 batches."""
    cores = max(1, (facts.get("cores") or 1) - 2)
    batch_gib = LOADER_BATCH * 3 * IMAGE_SIZE**2 / 2**30
    shm = facts.get("shm_free_gib")
    by_shm = int(shm / 2 / (4 * batch_gib)) if shm is not None else cores
    return max(1, min(cores, by_shm))


def gpu_steps(facts: dict, work: Path, out: Path) -> list[tuple[Step, Callable[[], dict] | None]]:
    """The steps after the environment checks, each with what it adds to the report."""
    backend = "dali" if facts["dali"] != NOT_CHECKED else "torch"
    workers = str(loader_workers(facts))
    shards, run, evaluation = work / "shards", work / "run", work / "eval"
    paths = (["dali-gpu", "decode-gpu"] if backend == "dali" else []) + [
        "torch-gpu",
        "decode-torch",
    ]
    common = ["--backend", backend, "--workers", workers]
    return [
        (
            Step(
                "data", python("-m", "tools.gpu_check", "--make-data", str(shards)), LIMITS["data"]
            ),
            None,
        ),
        (
            Step(
                "gpu_tests",
                python(
                    "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *gpu_test_files()
                ),
                LIMITS["gpu_tests"],
            ),
            lambda: {"gpu_tests": pytest_counts(out / "gpu_tests.log")},
        ),
        (
            Step(
                "loader",
                python(
                    "tools/bench/bench_loader.py",
                    "--shards",
                    str(shards),
                    "--batch-size",
                    str(LOADER_BATCH),
                    "--batches",
                    "30",
                    "--warmup",
                    "5",
                    "--workers",
                    workers,
                    "--paths",
                    *paths,
                    "--out",
                    str(work / "loader"),
                ),
                LIMITS["loader"],
            ),
            lambda: {"loader": loader_figures(read_json(work / "loader" / "bench_loader.json"))},
        ),
        (
            Step(
                "train_bench",
                python(
                    "tools/bench/gpu_train_bench.py",
                    "--shards",
                    str(shards),
                    "--arch",
                    *BENCH_ARCHS,
                    "--batch-size",
                    *map(str, BENCH_BATCHES),
                    "--steps",
                    str(BENCH_STEPS),
                    "--warmup",
                    str(BENCH_WARMUP),
                    *common,
                    "--out",
                    str(work / "train_bench"),
                ),
                LIMITS["train_bench"],
            ),
            lambda: {"training": read_json(work / "train_bench" / "gpu_train_bench.json")},
        ),
        (
            Step(
                "train",
                launch(
                    "--arch",
                    "resnet18",
                    "--shards",
                    str(shards),
                    "--out",
                    str(run),
                    "--epochs",
                    "1",
                    "--batch-size",
                    str(TRAIN_BATCH),
                    *common,
                    "--quiet",
                ),
                LIMITS["train"],
            ),
            lambda: {"trainer": trainer_figures(run, evaluation)},
        ),
        (
            Step(
                "resume",
                launch("--out", str(run), "--resume", "--epochs", "2", "--quiet"),
                LIMITS["resume"],
            ),
            lambda: {"trainer": trainer_figures(run, evaluation)},
        ),
        (
            Step(
                "evaluate",
                python(
                    "trainer/evaluate.py",
                    "--checkpoint",
                    str(run / "best.pt"),
                    "--shards",
                    str(shards),
                    "--out",
                    str(evaluation),
                ),
                LIMITS["evaluate"],
            ),
            lambda: {"trainer": trainer_figures(run, evaluation)},
        ),
    ]


@dataclass
class GpuCheckConfig:
    out: Path = arg(Path("gpu_check"), "folder for gpu_check.json and the step logs", metavar="DIR")
    budget_s: float = arg(float(BUDGET_S), "seconds all the steps may take together")
    probe: bool = arg(False, "print this machine's facts as one JSON line and stop")
    make_data: Path | None = arg(
        None, "make the synthetic shard folder DIR and stop", metavar="DIR"
    )


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(GpuCheckConfig, argv, prog="gpu_check", description=__doc__.splitlines()[0])
    if cfg.probe:
        print(json.dumps(probe()))
        return 0
    if cfg.make_data:
        from tools.bench.gpu_train_bench import make_shards

        make_shards(cfg.make_data, TRAIN_IMAGES, IMAGE_SIZE, eval_images=EVAL_IMAGES)
        print(
            f"made {cfg.make_data}: {TRAIN_IMAGES} train, {EVAL_IMAGES} val, {EVAL_IMAGES} test at {IMAGE_SIZE} px"
        )
        return 0
    return check(cfg.out.resolve(), cfg.budget_s)


def first_steps() -> tuple[Step, Step]:
    """What every machine runs: the probe of its facts, then ``dr-doctor --no-smoke``."""
    return (
        Step("environment", python("-m", "tools.gpu_check", "--probe"), LIMITS["environment"]),
        Step("doctor", python("-m", "tools.doctor", "--no-smoke"), LIMITS["doctor"]),
    )


def check(out: Path, budget_s: float, first=first_steps, after_gpu=gpu_steps) -> int:
    """The acceptance run into ``out``; 0 when every step passed, 1 otherwise (or no GPU).

    ``first`` and ``after_gpu`` make the steps (``first_steps``, ``gpu_steps``)."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    report = Report(out, {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": budget_s})
    report.add(status="running")
    probe_step, doctor_step = first()
    env = run_step(probe_step, out, deadline, report)
    lines = (out / "environment.log").read_text().splitlines() if env["status"] == "ok" else []
    facts = json.loads(lines[-1]) if lines else {"gpu": False, "dali": NOT_CHECKED}
    report.add(environment=facts, dali=facts.get("dali", NOT_CHECKED))
    run_step(doctor_step, out, deadline, report)
    if env["status"] != "ok":
        print(f"\ngpu_check: the environment probe {env['status']}: {out / 'environment.log'}")
        report.add(status="stopped", stopped=f"the environment probe {env['status']}")
        return 1
    if not facts.get("gpu"):
        advice = no_gpu_advice(facts)
        print("\ngpu_check: torch sees no CUDA GPU here, so nothing on a GPU was checked.")
        print("\n".join(f"  {line}" for line in advice))
        print("  docs/gpu.md says how to carry the right wheels to an offline machine.")
        report.add(status="stopped", stopped="torch sees no CUDA GPU", advice=advice)
        return 1
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        for step, figures in after_gpu(facts, work, out):
            run_step(step, out, deadline, report)
            if figures:
                report.add(**figures())
        keep_run_files(work / "run", work / "eval", out / "run")
    failed = [name for name, r in report.data["steps"].items() if r["status"] != "ok"]
    agree = (report.data.get("trainer") or {}).get("comparison", {}).get("agree")
    if agree is False:
        failed.append("evaluate (disagrees with the trainer)")
    report.add(status="passed" if not failed else "failed", failed=failed)
    print(
        f"\ngpu_check: {'every step passed' if not failed else 'problems: ' + ', '.join(failed)}; {out / JSON_FILE}"
    )
    return 0 if not failed else 1


def keep_run_files(run: Path, evaluation: Path, dest: Path) -> None:
    """The trainer's metrics, config and confusion matrices and evaluate.py's output, kept."""
    for source in (run / "metrics.jsonl", run / "config.json", run / "confusion", evaluation):
        if source.is_dir():
            shutil.copytree(source, dest / source.name, dirs_exist_ok=True)
        elif source.is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / source.name)


if __name__ == "__main__":
    run_cli(main)
