"""Write a run's report: one self-contained HTML page with its figures and pictures.

    python tools/report.py runs/resnet18            # writes runs/resnet18/report.html
    python tools/report.py runs/resnet18 --shards /data/shards --gallery 20

The trainer writes it at the end of every run; this rewrites it for any run folder, also
one that was killed or is still going (it shows the epochs that finished). The gallery and
a run without saved per-image predictions need the run's shards: those named in its
config.json, or ``--shards``. What the page holds: trainer/judging/run_page.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.cli import arg, parse_config, run_cli
from pipeline.errors import UserError
from trainer.judging.options import GALLERY


@dataclass
class ReportConfig:
    run: Path = arg(help="run folder written by trainer/train.py", positional=True, metavar="RUN")
    shards: Path | None = arg(None, "the run's shard folder, if it has moved", metavar="DIR")
    gallery: int = arg(GALLERY, "photographs in the gallery of the most confidently wrong")

    def __post_init__(self):
        if self.gallery < 0:
            raise UserError(f"--gallery must be 0 or more, got {self.gallery}")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ReportConfig, argv, prog="report.py", description=__doc__.splitlines()[0])
    if not cfg.run.is_dir():
        raise UserError(f"{cfg.run} is not a folder")
    if cfg.shards is not None and not (cfg.shards / "manifest.json").is_file():
        raise UserError(f"{cfg.shards} has no manifest.json; is it a shard folder?")
    from trainer.judging.run_page import write_report  # torch loads after the options are read

    path = write_report(cfg.run, cfg.shards, cfg.gallery)
    print(f"wrote {path}")
    return 0


def cli() -> None:
    """The ``dr-report`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
