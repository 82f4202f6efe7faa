"""How fast each console command answers --help, against importing torch and torchvision.

    python tools/bench/help_time.py --repeats 5

Each round runs, for every ``dr-*`` command of pyproject.toml, ``python -c "import torch,
torchvision"`` and then ``dr-X --help`` (the launcher pip wrote beside this interpreter), one
right after the other, so that both meet the same load on a shared machine; the table gives
each command's median over the rounds and its ratio to the median import. Figures:
docs/benchmarks.md.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib

from pipeline.cli import arg, parse_config, run_cli
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
BASELINE = "import torch, torchvision"


@dataclass
class HelpTimeConfig:
    repeats: int = arg(5, "rounds over every command")

    def __post_init__(self):
        if self.repeats < 1:
            raise UserError(f"--repeats must be at least 1, got {self.repeats}")


def wall(argv: list[str]) -> float:
    """Seconds from start to exit of ``argv``, its output thrown away."""
    begin = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - begin


def commands() -> list[str]:
    return sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def measure(repeats: int) -> tuple[list[float], dict[str, list[float]]]:
    """(the baseline's times, each command's times), interleaved round by round."""
    bin_dir = Path(sys.executable).parent
    missing = [c for c in commands() if not (bin_dir / c).is_file()]
    if missing:
        raise UserError(
            f"{', '.join(missing)} not installed beside {sys.executable}: pip install -e ."
        )
    baseline, times = [], {c: [] for c in commands()}
    for _ in range(repeats):
        for command in times:
            baseline.append(wall([sys.executable, "-c", BASELINE]))
            times[command].append(wall([str(bin_dir / command), "--help"]))
    return baseline, times


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(
        HelpTimeConfig, argv, prog="help_time.py", description=__doc__.splitlines()[0]
    )
    baseline, times = measure(cfg.repeats)
    base = statistics.median(baseline)
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.node()}, Python {platform.python_version()}: "
        f'python -c "{BASELINE}" median {base:.2f} s over {len(baseline)} runs'
    )
    print("| command | --help, median s | ratio to the import |\n|---|---|---|")
    for command, samples in times.items():
        median = statistics.median(samples)
        print(f"| `{command} --help` | {median:.2f} | {median / base:.2f} |")
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
