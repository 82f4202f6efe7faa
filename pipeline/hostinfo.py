"""What this machine gives one process: usable CPU cores and shared memory.

Both halves of ``pipeline`` size their worker pools from here (make_shards' packing
processes, the loaders' DataLoader workers and DALI threads), so they agree on what the
machine has. Usable cores are the fewer of the CPUs this process may run on (affinity)
and the container's CPU quota: cgroup v2 ``cpu.max`` (``"200000 100000"`` = 2 cores,
``"max 100000"`` = no limit) or cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
(quota -1 = no limit), the tightest over the process's cgroup and its parents. A
container that sees 64 CPUs with a quota of 4 would otherwise start 64 workers that take
turns on 4 cores.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SHM = Path("/dev/shm")


def affinity_cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def read_quota(cpu_max: Path) -> float | None:
    """Cores allowed by a cgroup v2 ``cpu.max`` file; None when unlimited or unreadable."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def read_cfs_quota(folder: Path) -> float | None:
    """Cores allowed by cgroup v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``; None if none."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def own_cgroups(root: Path, proc_cgroup: Path) -> list[Path]:
    """Folders that may hold this process's CPU limit: its own cgroup and each parent, for
    v2 (``0::/path``) and for the v1 ``cpu`` controller, plus the root (inside a container
    the root is the container's own cgroup)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    folders = [root, root / "cpu", root / "cpu,cpuacct"]
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            base = root
        elif "cpu" in controllers.split(","):
            base = root / "cpu" if (root / "cpu").is_dir() else root / controllers
        else:
            continue
        parts = Path(path.strip() or "/").parts[1:]
        folders += [base.joinpath(*parts[:n]) for n in range(len(parts), 0, -1)]
    return folders


def cpu_quota(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """The tightest CPU quota (in cores) over this process's cgroups; None when unlimited."""
    limits = []
    for folder in own_cgroups(root, proc_cgroup):
        for limit in (read_quota(folder / "cpu.max"), read_cfs_quota(folder)):
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def usable_cores(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The fewer of the affinity's CPUs and the cgroup quota (rounded down, at least 1)."""
    cores = affinity_cores()
    quota = cpu_quota(root, proc_cgroup)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota + 1e-9)))
    return cores


def local_processes() -> int:
    """Processes the launcher started on this machine: torchrun (``accelerate launch``) sets
    LOCAL_WORLD_SIZE; without it this is the only one."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def cores_per_process(root: Path = CGROUP_ROOT) -> int:
    """Usable cores divided among the launcher's processes on this machine (at least 1):
    eight ranks that each took every core would run eight times the threads it has."""
    return max(1, usable_cores(root) // local_processes())


def shm_free_bytes(path: Path = SHM, statvfs=os.statvfs) -> int | None:
    """Free bytes of the shared memory DataLoader workers hand batches through; None where
    there is no such filesystem (not Linux)."""
    try:
        st = statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
