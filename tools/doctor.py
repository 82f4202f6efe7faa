"""Can this machine train the grader, and how? One screen of checks, then a smoke test per backend.

    dr-doctor                           # the checks, then `dr-train --smoke` per loader backend
    dr-doctor --no-smoke                # the checks only (seconds)
    dr-doctor --out DIR                 # keep the smoke runs' folders and logs in DIR
    dr-doctor --shards DIR --runs DIR   # where shards and runs will go (default: shards/, runs/ here)

Python; the torch build and the GPUs it sees (and, when it sees none, whether the kernel
has NVIDIA GPUs it cannot use); bf16; DALI: which wheel, whether it imports, and on a GPU
whether its mixed (GPU) decoder works and the GPU has a hardware JPEG decoder; on a GPU,
whether torchvision's nvJPEG decodes (the torch-nvjpeg backend); webdataset;
the config ``accelerate launch`` would use and how many processes it would start; gloo and
NCCL; free space and write access where shards and runs go; the packaged fixture. Then
the smoke test (``trainer/smoke.py``) through ``accelerate launch``, as a user would start
it, once with the torch loader, once with torch-nvjpeg on a GPU and once with DALI when DALI
imports: about 20-30 s each on 2 CPU cores.

Each line is ``ok``, ``warn`` (works, not at its best), ``skip`` (does not apply here, and
why) or ``FAIL`` with the fix below it. Exit status 0 when the product works here, 1 when
a check failed, 2 for a bad option.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.cli import arg, parse_config, run_cli
from pipeline.errors import UserError
from pipeline.manifest import read_manifest, verify_split

OK, WARN, SKIP, FAIL = "ok", "warn", "skip", "FAIL"
MIN_PYTHON = (3, 10)
# Oldest Linux driver for each CUDA major version (CUDA's minor-version compatibility).
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
TORCH_INDEX = "https://download.pytorch.org/whl"
# A resnet50 run folder holds its 89.7 MiB of weights three times (best.pt; weights and SGD
# momentum in checkpoints/last/): the resnet18 smoke run measured 129 MB for 42.6 MiB.
RUN_FOLDER_BYTES = 300 << 20
SMOKE_RUN_BYTES = 130 << 20  # one resnet18 smoke run folder, measured
SMOKE_TIMEOUT_S = 600
GIB = 1 << 30


@dataclass
class Result:
    status: str
    found: str
    fix: str = ""


@dataclass
class LaunchPlan:
    """What ``accelerate launch`` would start here, and the flags the smoke runs add to it."""

    processes: int
    on_gpus: bool
    args: list[str] = field(default_factory=list)


ONE_ON_CPU = LaunchPlan(1, False)  # what is left to go on when the launcher cannot be read

# ---------------------------------------------------------------- facts, looked up once


@cache
def torch_module():
    import torch

    return torch


@cache
def torch_gpus() -> int:
    torch = torch_module()
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@cache
def kernel_gpus() -> int:
    """NVIDIA GPUs the kernel driver knows, whatever torch makes of them."""
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir():
        return len(list(gpus.iterdir()))
    out = _run(["nvidia-smi", "-L"])
    return sum(line.startswith("GPU ") for line in out.splitlines()) if out else 0


@cache
def driver_version() -> str | None:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        match = re.search(r"Kernel Module.*?\s(\d{3,}\.\d+(?:\.\d+)?)\s", text)
        if match:
            return match[1]
    except OSError:
        pass
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def _run(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def driver_suffices(cuda_major: int, driver: str | None) -> bool | None:
    if driver is None or cuda_major not in MIN_DRIVER:
        return None
    return version_tuple(driver) >= version_tuple(MIN_DRIVER[cuda_major])


def torch_wheel_for(driver: str | None) -> str:
    """The pip command for a torch whose CUDA this driver runs."""
    tag = "cu130" if driver_suffices(13, driver) else "cu126"
    return f"pip install --force-reinstall torch torchvision --index-url {TORCH_INDEX}/{tag}"


@cache
def dali_wheels() -> list[tuple[str, str]]:
    """(name, version) of every DALI wheel installed (there should be one)."""
    found = set()
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if re.fullmatch(r"nvidia-dali(-nightly|-weekly)?-cuda\d+", name):
            found.add((name, dist.version))
    return sorted(found)


def dali_cuda_major(wheel: str) -> int:
    """nvidia-dali-cuda120 -> 12."""
    return int(re.search(r"cuda(\d+)\d$", wheel)[1])


@cache
def dali_import_error() -> str | None:
    try:
        import nvidia.dali  # noqa: F401
    except Exception as err:  # a CUDA or ABI mismatch is not always an ImportError
        return f"{type(err).__name__}: {err}"
    return None


def dali_usable() -> bool:
    return len(dali_wheels()) == 1 and dali_import_error() is None


def sample_jpeg(size: int = 256) -> bytes:
    """A baseline 4:2:0 JPEG with structure in every channel (what the decoders get)."""
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = np.stack([xx, yy, (xx + yy) // 2], axis=-1) % 256
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ---------------------------------------------------------------- the checks


def check_python() -> Result:
    found = f"{platform.python_version()} ({sys.executable})"
    if sys.version_info[:2] < MIN_PYTHON:
        return Result(FAIL, found, "install Python 3.10 or newer and reinstall dr-grader in it")
    return Result(OK, found)


def check_torch() -> Result:
    try:
        torch = torch_module()
    except Exception as err:
        return Result(FAIL, f"does not import: {err}", "pip install torch torchvision")
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    return Result(OK, f"{torch.__version__}, {build}")


def check_gpus() -> Result:
    torch = torch_module()
    driver = driver_version()
    if torch_gpus():
        names = Counter(torch.cuda.get_device_name(i) for i in range(torch_gpus()))
        listed = ", ".join(f"{n} x {name}" for name, n in names.items())
        return Result(OK, f"{listed} (driver {driver or 'unknown'})")
    if not kernel_gpus():
        return Result(OK, f"none: training runs on the CPU ({os.cpu_count()} cores)")
    found = f"{kernel_gpus()} NVIDIA GPU(s) with driver {driver or 'unknown'}, but torch sees none"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1", "none", "NoDevFiles"):
        return Result(FAIL, found, f"CUDA_VISIBLE_DEVICES={hidden!r} hides them: unset it")
    if not torch.version.cuda:
        return Result(FAIL, found, f"this torch is a CPU-only build: {torch_wheel_for(driver)}")
    major = int(torch.version.cuda.split(".")[0])
    if driver_suffices(major, driver) is False:
        return Result(
            FAIL,
            found,
            f"torch is built for CUDA {torch.version.cuda}, which needs driver >= "
            f"{MIN_DRIVER[major]}: update the NVIDIA driver, or {torch_wheel_for(driver)}",
        )
    try:
        torch.cuda.init()
        reason = "no reason given"
    except Exception as err:
        reason = str(err).splitlines()[0]
    return Result(FAIL, found, f"torch cannot initialise CUDA ({reason}); check `nvidia-smi`")


def check_gpu_run() -> Result:
    """The batch and learning rate a GPU run should start from (trainer.fitting.scaling)."""
    from trainer.fitting.scaling import gpu_advice

    if not torch_gpus():
        return Result(SKIP, "no GPU: the defaults (--batch-size 8 --lr 0.01) suit the CPU")
    return Result(OK, gpu_advice(torch_gpus()))


def check_precision() -> Result:
    # the trainer's own check (emulated bf16 counts as none), so the two never disagree
    from trainer.base.distributed import native_bf16

    if not torch_gpus():
        return Result(OK, "the CPU trains in fp32 (fp16 autocast does nothing there)")
    if native_bf16():
        return Result(OK, "bf16 autocast (native on this GPU)")
    return Result(OK, "fp16 autocast with loss scaling: this GPU has no native bf16")


def check_dali() -> Result:
    wheels = dali_wheels()
    if not wheels:
        if sys.platform != "linux":
            return Result(
                SKIP, f"no DALI wheels exist for {sys.platform}: the torch loader is used"
            )
        return Result(
            WARN,
            "not installed: --backend auto uses the torch loader (no GPU decoding)",
            "pip install nvidia-dali-cuda120",
        )
    names = ", ".join(f"{n} {v}" for n, v in wheels)
    if len(wheels) > 1:
        return Result(
            FAIL,
            f"{names} are all installed and overwrite each other's files",
            f"pip uninstall -y {' '.join(n for n, _ in wheels)} && pip install "
            f"{_dali_wheel_for(driver_version())}",
        )
    (name, version), error = wheels[0], dali_import_error()
    major = dali_cuda_major(name)
    if error:
        return Result(
            FAIL,
            f"{name} {version} is installed but does not import ({error})",
            f"pip install --force-reinstall {_dali_wheel_for(driver_version())}, or "
            f"pip uninstall {name} and train with --backend torch",
        )
    found = f"{name} {version}: built for CUDA {major}, carries its own CUDA runtime"
    driver = driver_version()
    if torch_gpus() and driver_suffices(major, driver) is False:
        return Result(
            FAIL,
            f"{found}; needs driver >= {MIN_DRIVER[major]}, this one is {driver}",
            f"pip uninstall -y {name} && pip install {_dali_wheel_for(driver)}",
        )
    return Result(OK, found)


def _dali_wheel_for(driver: str | None) -> str:
    """The DALI wheel to install: CUDA 12's serves every driver from 525.60 on."""
    if driver_suffices(12, driver) is False:
        return f"nvidia-dali-cuda120 after updating the NVIDIA driver to {MIN_DRIVER[12]} or newer"
    return "nvidia-dali-cuda120"


def decode_with_dali(jpeg: bytes, device_id: int | None) -> np.ndarray:
    """``jpeg`` decoded by DALI: "mixed" (nvJPEG) on GPU ``device_id``, the CPU when None."""
    from nvidia.dali import fn, pipeline_def, types

    data = np.frombuffer(jpeg, np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1)
    def decode():
        encoded = fn.external_source(source=lambda: data, batch=False, dtype=types.UINT8)
        device = "cpu" if device_id is None else "mixed"
        return fn.decoders.image(encoded, device=device, output_type=types.RGB)

    pipe = decode()
    pipe.build()
    (images,) = pipe.run()
    if device_id is not None:
        images = images.as_cpu()
    return np.array(images.at(0))


def check_dali_gpu_decoder() -> Result:
    if not dali_usable():
        return Result(SKIP, "DALI is not usable here (see above)")
    if not torch_gpus():
        return Result(SKIP, "no GPU: not tried; DALI decodes on the CPU here")
    jpeg = sample_jpeg()
    reference = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.int16)
    try:
        decoded = decode_with_dali(jpeg, device_id=0)
    except Exception as err:
        wheel = dali_wheels()[0][0]
        return Result(
            FAIL,
            f"{wheel} could not decode on cuda:0: {str(err).splitlines()[0]}",
            f"pip install --force-reinstall {_dali_wheel_for(driver_version())} "
            f"(driver {driver_version() or 'unknown'}); meanwhile train with --backend torch",
        )
    if decoded.shape != reference.shape:
        return Result(FAIL, f"decoded shape {decoded.shape}, expected {reference.shape}", "")
    diff = float(np.abs(decoded.astype(np.int16) - reference).mean())
    if diff > 4:  # IDCTs differ by a level or two; more means wrong pixels
        return Result(FAIL, f"decoded pixels differ from Pillow's by {diff:.1f}/255 on average")
    return Result(OK, f"nvJPEG on cuda:0 decoded a test JPEG ({diff:.2f}/255 from Pillow)")


def decode_with_torchvision(jpeg: bytes, device: str) -> np.ndarray:
    """``jpeg`` decoded as the torch-nvjpeg loader decodes a batch (HWC uint8)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
    (image,) = decode_jpeg([data], mode=ImageReadMode.RGB, device=device)
    if device != "cpu":
        torch.cuda.synchronize(device)  # the decode runs on a stream of its own
    return image.permute(1, 2, 0).cpu().numpy()


def check_nvjpeg_decoder() -> Result:
    if not torch_gpus():
        return Result(SKIP, "no GPU: --backend torch-nvjpeg needs one; auto uses torch here")
    jpeg = sample_jpeg()
    reference = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.int16)
    try:
        decoded = decode_with_torchvision(jpeg, "cuda:0")
    except Exception as err:
        return Result(
            FAIL,
            f"torchvision could not decode on cuda:0: {str(err).splitlines()[0]}",
            "train with --backend torch (CPU decoding); a torchvision built without nvJPEG "
            "needs the CUDA wheel of torchvision",
        )
    diff = float(np.abs(decoded.astype(np.int16) - reference).mean())
    if decoded.shape != reference.shape or diff > 4:  # IDCTs differ by a level or two
        return Result(FAIL, f"nvJPEG's pixels differ from Pillow's ({diff:.1f}/255 on average)")
    return Result(OK, f"torchvision's nvJPEG decoded a test JPEG ({diff:.2f}/255 from Pillow)")


def check_hw_decoder() -> Result:
    if not dali_usable():
        return Result(SKIP, "DALI is not usable here")
    if not torch_gpus():
        return Result(SKIP, "no GPU: not tried")
    try:
        from nvidia import nvimgcodec

        from pipeline.loading.dali import HW_DECODER_LOAD

        decoder = nvimgcodec.Decoder(
            device_id=0, backends=[nvimgcodec.Backend(nvimgcodec.HW_GPU_ONLY)]
        )
        image = decoder.decode(nvimgcodec.CodeStream(sample_jpeg()))
    except Exception as err:
        return Result(WARN, f"could not tell ({type(err).__name__}: {err})")
    if image is None:
        return Result(OK, "none on this GPU: nvJPEG decodes on the CUDA cores")
    share = round(100 * HW_DECODER_LOAD)
    if not share:
        return Result(OK, "available; unused by the DALI loader (hw_decoder_load 0, docs/gpu.md)")
    return Result(OK, f"available: the DALI loader sends {share} % of each batch to it")


def check_webdataset() -> Result:
    try:
        import webdataset  # noqa: F401
    except Exception as err:
        return Result(FAIL, f"does not import: {err}", "pip install webdataset")
    return Result(OK, importlib.metadata.version("webdataset"))


def check_accelerate() -> tuple[Result, LaunchPlan]:
    """What ``accelerate launch trainer/train.py`` would start here."""
    try:
        import accelerate
        from accelerate.commands.config.config_args import (
            default_config_file,
            load_config_from_file,
        )
    except Exception as err:
        return Result(FAIL, f"does not import: {err}", "pip install accelerate"), ONE_ON_CPU
    gpus = torch_gpus()
    head = f"{accelerate.__version__}; "
    if not os.path.isfile(default_config_file):
        plan = LaunchPlan(max(gpus, 1), gpus > 0)
        return Result(
            OK,
            head + f"no config ({default_config_file}): `accelerate launch` starts "
            f"{_processes(plan)}",
        ), plan
    try:
        config = load_config_from_file(None)
    except Exception as err:
        return Result(
            FAIL,
            head + f"{default_config_file} does not load ({err})",
            f"run `accelerate config` again, or delete {default_config_file}",
        ), ONE_ON_CPU
    kind = str(getattr(config.distributed_type, "value", config.distributed_type))
    total, machines = config.num_processes, max(config.num_machines or 1, 1)
    found = (
        head + f"{default_config_file}: {kind}, {total} process(es) on {machines} machine(s), "
        f"mixed precision {config.mixed_precision}"
    )
    if total is None or total < 1:
        return Result(
            FAIL, found, f"set num_processes in {default_config_file} (`accelerate config`)"
        ), ONE_ON_CPU
    local = max(total // machines, 1)
    on_gpus = gpus > 0 and not config.use_cpu
    plan = LaunchPlan(local, on_gpus)
    if machines > 1:  # the smoke test runs this machine's share alone
        plan.args = ["--num_machines", "1", "--num_processes", str(local)]
        plan.args += ["--multi_gpu"] if local > 1 else []
    found += f" -> {_processes(plan)} here"
    if on_gpus and local > gpus:
        return Result(
            FAIL,
            found + f", but there are {gpus} GPU(s)",
            f"run `accelerate config` again (or delete {default_config_file}), or pass "
            f"--num_processes {gpus} to accelerate launch",
        ), plan
    if on_gpus and local < gpus and machines == 1:
        return Result(
            WARN,
            found + f", leaving {gpus - local} of {gpus} GPUs idle",
            f"accelerate launch --multi_gpu --num_processes {gpus} trainer/train.py ..., "
            f"or `accelerate config` again",
        ), plan
    if kind not in ("NO", "MULTI_GPU", "MULTI_CPU"):
        return Result(
            WARN,
            found,
            f"the trainer is plain DDP and was not tried with {kind}: "
            "accelerate launch --config_file accelerate_config.yaml (DDP + bf16)",
        ), plan
    return Result(OK, found), plan


def _processes(plan: LaunchPlan) -> str:
    where = "one GPU each" if plan.on_gpus else "on the CPU"
    return f"{plan.processes} process{'es' if plan.processes > 1 else ''} ({where})"


def check_distributed(plan: LaunchPlan) -> Result:
    import torch.distributed as dist

    if not dist.is_available():
        found, gloo, nccl = "torch.distributed is not in this torch build", False, False
    else:
        gloo, nccl = dist.is_gloo_available(), dist.is_nccl_available()
        nccl_version = ""
        if nccl:
            version = torch_module().cuda.nccl.version()
            nccl_version = " " + ".".join(map(str, version)) if isinstance(version, tuple) else ""
        found = f"gloo {'yes' if gloo else 'no'}, NCCL {'yes' + nccl_version if nccl else 'no'}"
    several = plan.processes > 1 or torch_gpus() > 1
    needed = ("NCCL", nccl) if plan.on_gpus else ("gloo", gloo)
    if several and not needed[1]:
        return Result(
            FAIL,
            found + f"; {plan.processes} processes need {needed[0]}",
            f"install the official torch wheel for Linux ({torch_wheel_for(driver_version())})",
        )
    if not several:
        found += " (one process: none needed)"
    return Result(OK, found)


def check_folder(path: Path, flag: str, least: int, why: str) -> Result:
    """Whether ``path`` exists or can be created, can be written, and has room."""
    target = Path(os.path.abspath(path))
    existing = target
    while not existing.exists():
        existing = existing.parent
    fix = f"or use another folder with {flag} DIR" if flag else "or another folder"
    if not existing.is_dir():
        return Result(
            FAIL, f"{target}: {existing} is a file, not a folder", f"move {existing} away, {fix}"
        )
    try:
        if existing == target:
            with tempfile.TemporaryFile(dir=target):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing))
    except OSError as err:
        return Result(
            FAIL,
            f"{target}: cannot write in {existing} ({err.strerror or err})",
            f"make it writable (owner, permissions, a mount that is not read-only), {fix}",
        )
    free = shutil.disk_usage(existing).free
    state = "writable" if existing == target else "can be created"
    found = f"{target}: {state}, {free / GIB:.1f} GiB free"
    if free < least:
        return Result(FAIL, found, f"free at least {least / GIB:.2f} GiB ({why}), {fix}")
    return Result(OK, found)


def check_fixture() -> Result:
    from trainer.smoke import fixture_dir

    try:
        folder = fixture_dir()
        manifest = read_manifest(folder)
        for split in manifest.splits:
            verify_split(manifest, split, full=True)
    except UserError as err:
        return Result(
            FAIL, str(err), "reinstall: pip install --force-reinstall --no-deps dr-grader"
        )
    counts = ", ".join(f"{s.samples} {name}" for name, s in manifest.splits.items())
    return Result(OK, f"{counts} at {manifest.image_size} px, checksums match ({folder})")


def smoke(backend: str, folder: Path, plan: LaunchPlan) -> Result:
    """``accelerate launch trainer/train.py --smoke --backend BACKEND`` into ``folder``."""
    train = importlib.util.find_spec("trainer.train").origin
    run = Path(tempfile.mkdtemp(prefix=f"smoke-{backend}-", dir=folder))  # fresh every time
    launch = [sys.executable, "-m", "accelerate.commands.launch", *plan.args]
    cmd = [*launch, train, "--smoke", "--backend", backend, "--out", str(run), "--quiet"]
    begin = time.perf_counter()
    code, output = _run_group(cmd, SMOKE_TIMEOUT_S)
    seconds = time.perf_counter() - begin
    log = run / "doctor.log"
    log.write_text(output)
    passed = [line for line in output.splitlines() if line.startswith("smoke test passed:")]
    if code == 0 and passed:
        verdict = passed[-1].split("; run folder")[0].removeprefix("smoke test passed: ")
        return Result(OK, f"passed in {seconds:.0f} s: {verdict}")
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    what = errors[0] if errors else f"exit status {code}" + (" (timed out)" if code is None else "")
    fix = f"the output is in {log}; to run it again: {shlex.join(cmd)}"
    if backend != "torch":
        fix += "; until it works, train with --backend torch"
    return Result(FAIL, what, fix)


def _run_group(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group (the launcher's ranks too); kill all on timeout."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, output
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # Ctrl-C: leave no rank behind
        proc.wait()
        raise


# ---------------------------------------------------------------- the command


@dataclass
class DoctorConfig:
    shards: Path = arg(Path("shards"), "where shard folders will go", metavar="DIR")
    runs: Path = arg(Path("runs"), "where run folders will go", metavar="DIR")
    out: Path | None = arg(
        None,
        "keep the smoke runs and their logs in this folder "
        "(default: a temp folder, removed when they pass)",
        metavar="DIR",
    )
    no_smoke: bool = arg(False, "only the checks; no smoke-test runs")


class Report:
    """Prints each check as it finishes; remembers which failed."""

    def __init__(self):
        self.failed: list[str] = []

    def __call__(self, name: str, check: Callable[[], Result] | Result) -> Result:
        try:
            result = check() if callable(check) else check
        except Exception as err:  # a check that crashes is a finding, not the end of the report
            result = Result(FAIL, f"the check itself failed: {type(err).__name__}: {err}")
        print(f"  {result.status:<5} {name:<18} {result.found}", flush=True)
        if result.status == FAIL:
            self.failed.append(name)
        if result.fix and result.status in (FAIL, WARN):
            print(f"  {'':<5} {'':<18} fix: {result.fix}", flush=True)
        return result


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(DoctorConfig, argv, prog="dr-doctor", description=__doc__.splitlines()[0])
    print("dr-doctor: can this machine train the grader, and how?", flush=True)
    report = Report()
    report("python", check_python)
    if report("torch", check_torch).status == FAIL:
        print("dr-doctor: torch does not import; nothing else can run. Fix that first.")
        return 1
    report("GPUs", check_gpus)
    report("precision", check_precision)
    report("GPU run", check_gpu_run)
    report("DALI", check_dali)
    report("DALI GPU decoder", check_dali_gpu_decoder)
    report("HW JPEG decoder", check_hw_decoder)
    report("torch nvJPEG", check_nvjpeg_decoder)
    report("webdataset", check_webdataset)
    result, plan = check_accelerate()
    report("accelerate", result)
    report("distributed", lambda: check_distributed(plan))
    run_why = "a resnet50 run folder needs about 300 MB"
    report(f"{cfg.shards}/", lambda: check_folder(cfg.shards, "--shards", 0, ""))
    report(f"{cfg.runs}/", lambda: check_folder(cfg.runs, "--runs", RUN_FOLDER_BYTES, run_why))
    report("fixture", check_fixture)

    tested = []
    if not cfg.no_smoke:
        backends = [
            "torch",
            *(["torch-nvjpeg"] if torch_gpus() else []),
            *(["dali"] if dali_usable() else []),
        ]
        keep = cfg.out is not None
        folder = Path(cfg.out) if keep else Path(tempfile.mkdtemp(prefix="dr-doctor-"))
        where = report(
            "smoke folder",
            lambda: check_folder(
                folder, "--out", len(backends) * SMOKE_RUN_BYTES, "a smoke run folder is 130 MB"
            ),
        )
        if where.status != FAIL:
            folder.mkdir(parents=True, exist_ok=True)
            for backend in backends:
                result = report(f"smoke: {backend}", lambda b=backend: smoke(b, folder, plan))
                if result.status == OK:  # the backend it resolved to: dali-cpu, dali-gpu, torch
                    tested.append(re.search(r"backend ([\w-]+)", result.found)[1])
        if not keep and not report.failed:
            shutil.rmtree(folder, ignore_errors=True)

    if report.failed:
        print(
            f"dr-doctor: {len(report.failed)} problem(s): {', '.join(report.failed)}; "
            "the fix is under each FAIL line"
        )
        return 1
    smoked = f"; smoke-tested backends: {', '.join(tested)}" if tested else " (no smoke test)"
    print(f"dr-doctor: this machine can train the grader with {_processes(plan)}{smoked}")
    return 0


def cli() -> None:
    """The ``dr-doctor`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
