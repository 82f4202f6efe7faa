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
checks torch-nvjpeg (what ``--backend auto`` picks there) beside the torch backend and
records ``"dali": "not installed: not checked"``.
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
# The synthetic shard folder: 512 px photographs of the size of EyePACS ones (~140 KB), the
# train split cycling 256 of them (decoding costs the same whether bytes repeat); val and
# test 1,024 photographs each, every one distinct, so one near-tie moves one image.
IMAGE_SIZE, TRAIN_IMAGES, EVAL_IMAGES = 512, 4096, 1024
LOADER_BATCH = 128
BENCH_BATCHES, BENCH_ARCHS = (64, 128), ("resnet18", "resnet50")
# inside one epoch of 4,096 / 128 = 32 steps: first batch + warm-up + timed + last batch
BENCH_STEPS, BENCH_WARMUP = 24, 6
LOADER_BATCHES, LOADER_WARMUP = 24, 5
TRAIN_BATCH = 64
# Two grades of one image differ "by more than noise" past this probability: bf16 with other
# cuDNN kernels moves a probability by a few thousandths.
PROB_TOLERANCE = 0.05
# Time limits per step, seconds: each several times what the step takes on an H100/H200
# (docs/gpu.md has the estimate of each); the acceptance steps come before the benchmarks.
LIMITS = {
    "environment": 60,
    "doctor": 90,
    "data": 90,
    "gpu_tests": 120,
    "nvjpeg_parity": 60,
    "train": 150,
    "resume": 120,
    "evaluate": 90,
    "loader": 120,
    "train_bench": 200,
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


def compare_predictions(trained, evaluated, tolerance: float = PROB_TOLERANCE) -> dict:
    """The trainer's per-image test probabilities against ``evaluate.py``'s (two tables with
    ``key``, ``pred``, ``p0``..``p4``), image by image.

    A fresh process may pick other cuDNN kernels (bf16 sums in another order), so the two
    agree when every image's probabilities are within ``tolerance`` of each other. An image
    graded differently is a near-tie when, in both tables, its two grades' probabilities lie
    within ``tolerance`` of each other: it is reported, not counted against agreement."""
    import numpy as np

    a = trained.set_index("key").sort_index()
    b = evaluated.set_index("key").sort_index()
    if list(a.index) != list(b.index):
        return {"agree": False, "why": "the two tables hold different images", "images": len(b)}
    columns = [c for c in a.columns if c.startswith("p") and c[1:].isdigit()]
    pa, pb = a[columns].to_numpy(float), b[columns].to_numpy(float)
    apart = np.abs(pa - pb).max(axis=1)
    rows = np.arange(len(a))
    ga, gb = a["pred"].to_numpy(int), b["pred"].to_numpy(int)
    flipped = ga != gb
    margin = np.maximum(pa[rows, ga] - pa[rows, gb], pb[rows, gb] - pb[rows, ga])
    flips = int((flipped & (margin > tolerance)).sum())
    beyond = int((apart > tolerance).sum())
    return {
        "agree": flips == 0 and beyond == 0,
        "images": len(a),
        "max_prob_diff": float(apart.max()) if len(a) else 0.0,
        "images_beyond_tolerance": beyond,
        "grades_flipped": flips,
        "near_ties": int((flipped & (margin <= tolerance)).sum()),
        "tolerance": f"every image's probabilities within {tolerance}; a grade flip counts "
        "only when one table's margin between the two grades exceeds it",
    }


def trainer_figures(run: Path, evaluation: Path) -> dict:
    """The trainer's epochs as logged, evaluate.py's test figures, and whether they agree."""
    from trainer.base.bestfile import load_best

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
    import pandas as pd

    best_epoch = load_best(run / "best.pt")[1]["epoch"]
    figures["evaluate"] = {
        "epoch": best_epoch,
        "accuracy": evaluated["accuracy"],
        "qwk": evaluated["qwk"],
    }
    figures["comparison"] = compare_predictions(
        pd.read_csv(run / "predictions" / f"test_epoch_{best_epoch:03d}.csv"),
        pd.read_csv(evaluation / "predictions.csv"),
    )
    return figures


def nvjpeg_parity(
    shards: Path, device: str = "cuda", batch_size: int = 64, image_size: int = IMAGE_SIZE
) -> dict:
    """The test split's eval batches from torch-nvjpeg (nvJPEG on ``device``) against the
    torch backend's (libjpeg-turbo in the workers), decoded, resized and normalised: the
    max and mean absolute difference on the 0-255 scale, and the decode's throughput."""
    import time as clock

    import torch

    from pipeline.constants import IMAGENET_STD
    from pipeline.loading.loader import EvalSpec, build_loader

    def batches(backend: str) -> tuple[dict, float]:
        spec = EvalSpec(
            split="test",
            batch_size=batch_size,
            image_size=image_size,
            backend=backend,
            device=device,
            with_keys=True,
        )
        loader = build_loader(shards, spec)
        start = clock.perf_counter()
        found = {k: x for images, _, keys in loader for k, x in zip(keys, images, strict=True)}
        loader.close()
        return found, len(found) / (clock.perf_counter() - start)

    ours, ours_rate = batches("torch-nvjpeg")
    theirs, theirs_rate = batches("torch")
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    most, total = 0.0, 0.0
    for key, image in ours.items():
        diff = ((image - theirs[key]) * std).abs()  # back on the 0-255 scale
        most, total = max(most, float(diff.max())), total + float(diff.mean())
    return {
        "images": len(ours),
        "max_abs_levels": round(most, 3),
        "mean_abs_levels": round(total / max(1, len(ours)), 4),
        "torch_nvjpeg_images_per_s": round(ours_rate, 1),
        "torch_images_per_s": round(theirs_rate, 1),
    }


# ---------------------------------------------------------------- the run


def gpu_test_files() -> list[str]:
    """The test files with GPU tests: only those are collected, so that a test file needing a
    package this machine lacks (onnx, scikit-image) cannot stop the GPU tests."""
    tests = sorted((REPO / "tests").glob("test_*.py"))
    return [str(p.relative_to(REPO)) for p in tests if "pytest.mark.gpu" in p.read_text()]


def backend_for(facts: dict) -> str:
    """What ``--backend auto`` gives a user of this GPU machine: DALI, else torch-nvjpeg."""
    return "dali" if facts.get("dali", NOT_CHECKED) != NOT_CHECKED else "torch-nvjpeg"


def gpu_steps(facts: dict, work: Path, out: Path) -> list[tuple[Step, Callable[[], dict] | None]]:
    """The steps after the environment checks, each with what it adds to the report: the
    acceptance steps (data, GPU tests, nvJPEG parity, train, resume, evaluate) first, the
    benchmarks (loader, train_bench) last, so that a run cut short loses figures, not
    verdicts. Workers are the loader's own defaults: what a user gets."""
    backend = backend_for(facts)
    shards, run, evaluation = work / "shards", work / "run", work / "eval"
    paths = (["dali-gpu", "decode-gpu"] if backend == "dali" else []) + [
        "torch-gpu",
        "torch-nvjpeg",
        "decode-torch",
    ]
    common = ["--backend", backend]
    data = Step("data", python("-m", "tools.gpu_check", "--make-data", str(shards)), LIMITS["data"])
    tests = Step(
        "gpu_tests",
        python("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *gpu_test_files()),
        LIMITS["gpu_tests"],
    )
    parity = Step(
        "nvjpeg_parity",
        python("-m", "tools.gpu_check", "--nvjpeg-parity", str(shards)),
        LIMITS["nvjpeg_parity"],
    )
    train = launch(
        *("--arch", "resnet18", "--shards", str(shards), "--out", str(run), "--epochs", "1"),
        *("--batch-size", str(TRAIN_BATCH), *common, "--quiet"),
    )
    resume = launch("--out", str(run), "--resume", "--epochs", "2", "--quiet")
    evaluate = python(
        "trainer/evaluate.py",
        "--checkpoint",
        str(run / "best.pt"),
        "--shards",
        str(shards),
        "--out",
        str(evaluation),
    )
    loader = python(
        "tools/bench/bench_loader.py",
        *("--shards", str(shards), "--batch-size", str(LOADER_BATCH)),
        *("--batches", str(LOADER_BATCHES), "--warmup", str(LOADER_WARMUP)),
        *("--paths", *paths, "--out", str(work / "loader")),
    )
    bench = python(
        "tools/bench/gpu_train_bench.py",
        *("--shards", str(shards), "--arch", *BENCH_ARCHS),
        *("--batch-size", *map(str, BENCH_BATCHES)),
        *("--steps", str(BENCH_STEPS), "--warmup", str(BENCH_WARMUP)),
        *common,
        *("--out", str(work / "train_bench")),
    )
    trained = lambda: {"trainer": trainer_figures(run, evaluation)}  # noqa: E731
    return [
        (data, None),
        (tests, lambda: {"gpu_tests": pytest_counts(out / "gpu_tests.log")}),
        (parity, lambda: {"nvjpeg_parity": last_json_line(out / "nvjpeg_parity.log")}),
        (Step("train", train, LIMITS["train"]), trained),
        (Step("resume", resume, LIMITS["resume"]), trained),
        (Step("evaluate", evaluate, LIMITS["evaluate"]), trained),
        (
            Step("loader", loader, LIMITS["loader"]),
            lambda: {"loader": loader_figures(read_json(work / "loader" / "bench_loader.json"))},
        ),
        (
            Step("train_bench", bench, LIMITS["train_bench"]),
            lambda: {"training": read_json(work / "train_bench" / "gpu_train_bench.json")},
        ),
    ]


def last_json_line(log: Path) -> dict | None:
    """The last line of ``log`` as JSON (how the probe and the parity step answer), or None
    when the step wrote none (it failed, or was cut off mid-line)."""
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
        found = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


@dataclass
class GpuCheckConfig:
    out: Path = arg(Path("gpu_check"), "folder for gpu_check.json and the step logs", metavar="DIR")
    budget_s: float = arg(float(BUDGET_S), "seconds all the steps may take together")
    probe: bool = arg(False, "print this machine's facts as one JSON line and stop")
    make_data: Path | None = arg(
        None, "make the synthetic shard folder DIR and stop", metavar="DIR"
    )
    nvjpeg_parity: Path | None = arg(
        None,
        "compare torch-nvjpeg's eval batches of DIR with the torch backend's (one JSON "
        "line) and stop",
        metavar="DIR",
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
    if cfg.nvjpeg_parity:
        print(json.dumps(nvjpeg_parity(cfg.nvjpeg_parity)))
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

    ``first`` and ``after_gpu`` make the steps (``first_steps``, ``gpu_steps``). Whatever
    happens, the JSON does not stay "running": an unexpected error is recorded as such."""
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": budget_s})
    report.add(status="running")
    try:
        return run_checks(out, budget_s, report, first, after_gpu)
    except BaseException as err:
        if report.data.get("status") == "running":
            report.add(status="error", error=f"{type(err).__name__}: {err}")
        raise


def run_checks(out: Path, budget_s: float, report: Report, first, after_gpu) -> int:
    deadline = time.monotonic() + budget_s
    probe_step, doctor_step = first()
    env = run_step(probe_step, out, deadline, report)
    facts = last_json_line(out / "environment.log") if env["status"] == "ok" else None
    if env["status"] == "ok" and facts is None:
        env["status"] = "failed"  # it ran but printed no facts: as good as failed
    facts = facts or {"gpu": False, "dali": NOT_CHECKED}
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
    report.add(ddp=ddp_note(facts))
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        for step, figures in after_gpu(facts, work, out):
            run_step(step, out, deadline, report)
            if figures:
                report.add(**read_figures(step.name, figures, report))
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


def read_figures(step: str, figures: Callable[[], dict], report: Report) -> dict:
    """What ``step`` wrote, read; a file it left half written or odd is recorded under
    ``figure_errors`` instead of ending the run."""
    try:
        return figures()
    except Exception as err:
        errors = {**report.data.get("figure_errors", {}), step: f"{type(err).__name__}: {err}"}
        return {"figure_errors": errors}


def ddp_note(facts: dict) -> str:
    count = facts.get("gpu_count") or 1
    if count == 1:
        return "not checked (one GPU)"
    return f"not checked (gpu_check trains in one process; {count} GPUs here)"


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
