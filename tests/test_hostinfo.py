"""Usable cores (affinity and cgroup CPU quotas), the default worker counts built on them,
and the /dev/shm rule for the torch backends' worker batches, on faked cgroup files and a
faked statvfs."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from pipeline import hostinfo
from pipeline.hostinfo import affinity_cores, cpu_quota, shm_free_bytes, usable_cores
from pipeline.loading import torch_backend
from pipeline.loading.loader import EvalSpec, TrainSpec, build_loader, default_workers
from pipeline.loading.torch_backend import fit_shared_memory


def cgroup_v2(tmp_path, cpu_max: str | None, own: str = "/", own_max: str | None = None):
    """A fake /sys/fs/cgroup (v2) and /proc/self/cgroup: ``cpu_max`` at the root (None: no
    file, as on a host), ``own_max`` in the process's own cgroup ``own``."""
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    if cpu_max is not None:
        (root / "cpu.max").write_text(cpu_max + "\n")
    if own_max is not None:
        folder = root / own.strip("/")
        folder.mkdir(parents=True)
        (folder / "cpu.max").write_text(own_max + "\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_a_cgroup_v2_quota_limits_the_usable_cores(tmp_path):
    root, proc = cgroup_v2(tmp_path, "250000 100000")
    assert cpu_quota(root, proc) == 2.5
    assert usable_cores(root, proc) == min(affinity_cores(), 2)
    root, proc = cgroup_v2(tmp_path / "b", "max 100000")
    assert cpu_quota(root, proc) is None and usable_cores(root, proc) == affinity_cores()
    # the process's own cgroup (a host with systemd slices) holds the tighter limit
    root, proc = cgroup_v2(tmp_path / "c", None, "/system.slice/job.scope", "50000 100000")
    assert cpu_quota(root, proc) == 0.5 and usable_cores(root, proc) == 1  # never below 1


def test_a_cgroup_v1_cfs_quota_limits_the_usable_cores(tmp_path):
    root = tmp_path / "cgroup"
    (root / "cpu" / "docker" / "abc").mkdir(parents=True)
    (root / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us").write_text("300000\n")
    (root / "cpu" / "docker" / "abc" / "cpu.cfs_period_us").write_text("100000\n")
    (root / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # the hierarchy's root: unlimited
    (root / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("2:cpuacct:/\n1:cpu:/docker/abc\n0::/\n")
    assert cpu_quota(root, proc) == 3.0
    assert usable_cores(root, proc) == min(affinity_cores(), 3)


def test_unreadable_or_absent_cgroup_files_mean_no_limit(tmp_path):
    root, proc = cgroup_v2(tmp_path, "garbage")
    assert cpu_quota(root, proc) is None
    assert cpu_quota(tmp_path / "none", tmp_path / "no-proc") is None


def test_cores_are_divided_among_the_local_processes(monkeypatch, tmp_path):
    root, _ = cgroup_v2(tmp_path, "max 100000")
    cores = usable_cores(root)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert hostinfo.cores_per_process(root) == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 4))
    assert hostinfo.cores_per_process(root) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert hostinfo.cores_per_process(root) == max(1, cores // 2)


def test_default_workers_leave_a_core_to_the_process_feeding_a_gpu(monkeypatch):
    """A CUDA target: usable cores / local processes - 1 (8 cores, 2 ranks: 3 each); a CPU
    target keeps at most 4; DALI's threads take the whole share."""
    monkeypatch.setattr("pipeline.loading.loader.cores_per_process", lambda: 4)
    cuda = torch.device("cuda", 0)
    assert default_workers("torch", cuda) == 3
    assert default_workers("torch-nvjpeg", cuda) == 3
    assert default_workers("torch", torch.device("cpu")) == 4
    assert default_workers("dali-gpu", cuda) == 4
    monkeypatch.setattr("pipeline.loading.loader.cores_per_process", lambda: 1)
    assert default_workers("torch", cuda) == 0  # one core: the main process decodes
    monkeypatch.setattr("pipeline.loading.loader.cores_per_process", lambda: 16)
    assert default_workers("torch", torch.device("cpu")) == 4


def faked_statvfs(free_bytes: int):
    def statvfs(path):
        return SimpleNamespace(f_bavail=free_bytes // 4096, f_frsize=4096)

    return statvfs


def test_shm_free_bytes_reads_statvfs(tmp_path):
    assert shm_free_bytes(tmp_path, faked_statvfs(64 << 20)) == 64 << 20
    assert shm_free_bytes(tmp_path / "absent") is None
    real = os.statvfs(tmp_path)
    assert shm_free_bytes(tmp_path) == real.f_bavail * real.f_frsize


MIB = 1 << 20


@pytest.fixture
def said(monkeypatch, capsys):
    monkeypatch.setattr(torch_backend, "_said", set())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    return lambda: capsys.readouterr().err.strip().splitlines()


def test_shared_memory_caps_the_prefetch_first_quietly(said):
    # 8 workers x 4 batches of 25 MiB = 800 MiB in flight; half of 1 GiB holds 20 batches
    assert fit_shared_memory(8, 4, 25 * MIB, "train", free=1024 * MIB) == (8, 2)
    assert said() == []
    assert fit_shared_memory(8, 4, 25 * MIB, "train", free=8192 * MIB) == (8, 4)


def test_shared_memory_too_small_for_the_workers_says_so_in_one_line(said):
    # Docker's default 64 MiB: half of it holds one 25 MiB uint8 batch, no 100 MiB float batch
    assert fit_shared_memory(8, 4, 25 * MIB, "train", free=64 * MIB) == (1, 1)
    (line,) = said()
    assert "/dev/shm has 64 MiB free: 1 loader workers instead of 8" in line
    assert fit_shared_memory(4, 2, 100 * MIB, "train", free=64 * MIB) == (0, 2)
    (line,) = said()
    assert "less than one 100 MiB batch: no loader workers" in line
    fit_shared_memory(4, 2, 100 * MIB, "val", free=64 * MIB)
    assert said() == []  # the val and test loaders do not repeat it
    assert fit_shared_memory(0, 2, 100 * MIB, "train", free=0) == (0, 2)  # none asked: none


def test_the_torch_loader_runs_with_the_workers_that_fit(tiny_shards, monkeypatch, said):
    """A faked 1 MiB /dev/shm: a 64 px float batch of 4 is 192 KiB, so 2 fit (half of 1 MiB)
    where 3 workers x 2 batches were asked; the epoch still yields every sample once."""
    monkeypatch.setattr(torch_backend, "shm_free_bytes", lambda: MIB)
    ld = build_loader(
        tiny_shards, EvalSpec(split="test", batch_size=4, image_size=64, workers=3, backend="torch")
    )
    assert (ld.workers, ld.prefetch) == (2, 1)
    assert "2 loader workers instead of 3" in said()[0]
    assert sum(len(labels) for _, labels in ld) == ld.num_samples
    train = build_loader(
        tiny_shards, TrainSpec(batch_size=4, image_size=64, workers=2, backend="torch")
    )
    assert (train.workers, train.prefetch) == (2, 1)
