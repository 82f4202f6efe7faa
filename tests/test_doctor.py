"""dr-doctor: the whole report on this machine, a failing folder, and the checks' verdicts on
situations this machine is not in (GPUs, accelerate configs, DALI wheels), faked."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.loading.loader import dali_available
from tests.conftest import run, run_env, tmpfs
from tools import doctor

DOCTOR = [sys.executable, "-m", "tools.doctor"]


def run_doctor(args: list[str], cwd: Path, tmp: Path) -> subprocess.CompletedProcess:
    """dr-doctor in ``cwd``, with no user accelerate config and temp folders under ``tmp``."""
    (tmp / "tmp").mkdir(exist_ok=True)
    env = run_env(tmp, TMPDIR=str(tmp / "tmp"))
    return run([*DOCTOR, *args], tmp, check=False, cwd=cwd, env=env)


def lines_of(proc: subprocess.CompletedProcess, status: str) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.strip().startswith(status)]


@pytest.mark.slow
def test_the_doctor_passes_here_and_smoke_tests_every_backend(
    tmp_path, accelerate_config, monkeypatch, capsys
):
    """The whole report, in this process, with a real smoke run of the torch backend. DALI's
    smoke training is the one tests/test_smoke.py runs end to end (two ranks, from a wheel),
    so here the doctor's call for it is recorded and answered SKIP instead of trained again."""
    for folder in ("cwd", "tmp"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    for name, value in run_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    asked, real_smoke = [], doctor.smoke

    def smoke(backend, folder, plan):
        asked.append(backend)
        if backend == "torch":
            return real_smoke(backend, folder, plan)
        return doctor.Result(doctor.SKIP, "smoke-trained by tests/test_smoke.py")

    monkeypatch.setattr(doctor, "smoke", smoke)
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.strip().startswith(doctor.FAIL)] == []
    assert asked == (["torch", "dali"] if doctor.dali_usable() else ["torch"])
    assert re.search(rf"{doctor.OK} +smoke: torch +passed in \d+ s: backend torch, device cpu", out)
    assert out.strip().splitlines()[-1].endswith("smoke-tested backends: torch")
    assert list((tmp_path / "cwd").iterdir()) == []  # it checked shards/ and runs/ by probing
    assert list((tmp_path / "tmp").iterdir()) == []  # the passing smoke run was removed


def test_a_file_where_runs_should_go_fails_with_the_fix(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    proc = run_doctor(["--no-smoke"], tmp_path, tmp_path)
    assert proc.returncode == 1
    (fail,) = lines_of(proc, doctor.FAIL)
    assert re.match(r"FAIL +runs/ +.*runs is a file, not a folder$", fail.strip())
    out = proc.stdout.splitlines()
    fix = out[out.index(fail) + 1].strip()
    assert fix == f"fix: move {tmp_path / 'runs'} away, or use another folder with --runs DIR"
    assert out[-1] == "dr-doctor: 1 problem(s): runs/; the fix is under each FAIL line"


def test_a_read_only_mount_fails_with_the_fix(tmp_path):
    mount = tmp_path / "ro"
    with tmpfs(mount, "1m", "ro"):
        result = doctor.check_folder(mount / "runs", "--runs", 0, "")
    assert result.status == doctor.FAIL
    assert result.found.endswith(f"cannot write in {mount} (Read-only file system)")
    assert "a mount that is not read-only" in result.fix


def test_bad_option_is_one_line(tmp_path):
    proc = run_doctor(["--no-such-option"], tmp_path, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unrecognized arguments: --no-such-option (see dr-doctor --help)"
    ]


def test_a_failing_smoke_run_names_the_error_and_the_log(tmp_path):
    result = doctor.smoke("no-such-backend", tmp_path, doctor.LaunchPlan(1, False))
    assert result.status == doctor.FAIL
    assert result.found.startswith("error: argument --backend: invalid choice")
    (log,) = tmp_path.glob("smoke-no-such-backend-*/doctor.log")
    assert f"the output is in {log}" in result.fix and "--backend torch" in result.fix


# ---------------------------------------------------------------- situations faked


@pytest.fixture
def accelerate_config(tmp_path, monkeypatch):
    """Point accelerate's default config file at a file of the test's."""
    from accelerate.commands.config import config_args

    path = tmp_path / "default_config.yaml"
    monkeypatch.setattr(config_args, "default_config_file", str(path))
    return path


def write_config(path: Path, distributed: str, processes: int, machines: int = 1) -> None:
    path.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        f"distributed_type: {distributed}\nmixed_precision: bf16\n"
        f"num_machines: {machines}\nmachine_rank: 0\nnum_processes: {processes}\n"
        "gpu_ids: all\nuse_cpu: false\n"
    )


def test_accelerate_without_config_starts_one_process_per_gpu(accelerate_config, monkeypatch):
    monkeypatch.setattr(doctor, "torch_gpus", lambda: 0)
    result, plan = doctor.check_accelerate()
    assert result.status == doctor.OK and (plan.processes, plan.on_gpus) == (1, False)
    assert "no config" in result.found and "1 process (on the CPU)" in result.found
    monkeypatch.setattr(doctor, "torch_gpus", lambda: 4)
    result, plan = doctor.check_accelerate()
    assert (plan.processes, plan.on_gpus, plan.args) == (4, True, [])


def test_accelerate_config_asking_for_more_gpus_than_here_fails(accelerate_config, monkeypatch):
    monkeypatch.setattr(doctor, "torch_gpus", lambda: 2)
    write_config(accelerate_config, "MULTI_GPU", 4)
    result, _ = doctor.check_accelerate()
    assert result.status == doctor.FAIL and "but there are 2 GPU(s)" in result.found
    assert result.fix.endswith("--num_processes 2 to accelerate launch")


def test_accelerate_config_using_fewer_gpus_than_here_warns(accelerate_config, monkeypatch):
    monkeypatch.setattr(doctor, "torch_gpus", lambda: 4)
    write_config(accelerate_config, "NO", 1)
    result, plan = doctor.check_accelerate()
    assert result.status == doctor.WARN and result.found.endswith("leaving 3 of 4 GPUs idle")
    assert "--num_processes 4" in result.fix and plan.processes == 1


def test_a_multi_machine_config_smoke_tests_this_machines_share(accelerate_config, monkeypatch):
    monkeypatch.setattr(doctor, "torch_gpus", lambda: 8)
    write_config(accelerate_config, "MULTI_GPU", 16, machines=2)
    result, plan = doctor.check_accelerate()
    assert result.status == doctor.OK
    assert plan.args == ["--num_machines", "1", "--num_processes", "8", "--multi_gpu"]


def test_gpus_torch_cannot_use_because_its_cuda_is_too_new(monkeypatch):
    monkeypatch.setattr(doctor, "torch_gpus", lambda: 0)
    monkeypatch.setattr(doctor, "kernel_gpus", lambda: 2)
    monkeypatch.setattr(doctor, "driver_version", lambda: "535.104.05")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    torch = doctor.torch_module()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    result = doctor.check_gpus()
    assert result.status == doctor.FAIL
    assert "2 NVIDIA GPU(s) with driver 535.104.05, but torch sees none" == result.found
    assert "needs driver >= 580.65.06" in result.fix and result.fix.endswith("/cu126")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert doctor.check_gpus().fix == "CUDA_VISIBLE_DEVICES='' hides them: unset it"


def test_two_dali_wheels_or_one_that_does_not_import_fail(monkeypatch):
    both = [("nvidia-dali-cuda120", "2.4.0"), ("nvidia-dali-cuda130", "2.4.0")]
    monkeypatch.setattr(doctor, "dali_wheels", lambda: both)
    monkeypatch.setattr(doctor, "driver_version", lambda: None)
    result = doctor.check_dali()
    assert result.status == doctor.FAIL
    assert result.fix == (
        "pip uninstall -y nvidia-dali-cuda120 nvidia-dali-cuda130 && pip install nvidia-dali-cuda120"
    )
    monkeypatch.setattr(doctor, "dali_wheels", lambda: both[1:])
    monkeypatch.setattr(doctor, "dali_import_error", lambda: "OSError: libcudart.so.13: no")
    result = doctor.check_dali()
    assert result.status == doctor.FAIL and "does not import (OSError" in result.found
    assert not doctor.dali_usable()
    assert doctor.check_dali_gpu_decoder().status == doctor.SKIP


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
def test_the_decoder_check_pipeline_decodes_like_pillow():
    """The pipeline the GPU check runs with "mixed", run here on the CPU."""
    jpeg = doctor.sample_jpeg()
    decoded = doctor.decode_with_dali(jpeg, device_id=None)
    reference = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    assert decoded.shape == reference.shape == (256, 256, 3)
    assert np.abs(decoded.astype(int) - reference).mean() < 4
