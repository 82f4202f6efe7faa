"""What a run ran on: the git commit, the library versions, the device, the world size.

Written whole into config.json and summary.json; ``describe`` is the short block printed at
the start of a run for a person reading the log.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

REPO = Path(__file__).resolve().parents[2]


def environment(accelerator: Accelerator, backend: str) -> dict:
    import accelerate
    import torchvision

    try:
        from nvidia import dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    device = accelerator.device
    return {
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "accelerate": accelerate.__version__,
        "dali": dali_version,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "backend": backend,
        "hostname": platform.node(),
        "argv": sys.argv,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """HEAD of the checkout this file is in, with "-dirty" if tracked files changed."""
    try:
        commit = _git("rev-parse", "HEAD")
        return commit + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
