"""The trainer's one config: a dataclass, and the command line generated from it.

Defaults reproduce the reference recipe (DESIGN.md section 6): resnet18, SGD lr 0.01,
momentum 0.9, weight decay 5e-4, batch 8 per device, 10 epochs, 512 px, cross-entropy,
constant lr, random horizontal and vertical flips.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields

from pipeline.errors import UserError

ARCHS = ("resnet18", "resnet50")  # the keys of trainer.model.MODELS (checked by a test)
BACKENDS = ("auto", "dali", "torch")
CLASS_WEIGHTS = ("none", "inverse", "sqrt")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "no", "bf16", "fp16")

# Options a resumed run may change; any other option given with --resume must match the run.
RESUMABLE = ("resume", "out", "shards", "epochs", "lr", "workers", "backend", "quiet")


def option(default, help: str, choices=None, type=None, metavar=None):
    return field(default=default, metadata={"help": help, "choices": choices, "type": type,
                                            "metavar": metavar})


@dataclass
class TrainConfig:
    arch: str = option("resnet18", "network", choices=ARCHS)
    shards: str = option("shards", "shard folder written by tools/make_shards.py", metavar="DIR")
    out: str | None = option(None, "run folder (default: runs/ARCH-YYYYmmdd-HHMMSS)", type=str,
                             metavar="DIR")
    epochs: int = option(10, "epochs to train (with --resume: the new total)")
    batch_size: int = option(8, "images per step per device (process)")
    lr: float = option(0.01, "SGD learning rate (peak, after warmup)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "SGD weight decay")
    image_size: int = option(512, "square input size in pixels")
    pretrained: bool = option(False, "start from torchvision's ImageNet weights (downloaded once)")
    weights: str | None = option(None, "start from a local state dict: full model or ImageNet "
                                 "backbone (its 1000-way head is dropped)", type=str, metavar="FILE")
    resume: bool = option(False, "continue the run in --out from its checkpoints/last/")
    backend: str = option("auto", "loader backend (auto: DALI if installed)", choices=BACKENDS)
    seed: int = option(0, "seed for initialisation, shuffling and augmentation")
    workers: int | None = option(None, "loader workers per process (default: the loader's choice)",
                                 type=int)
    class_weights: str = option("none", "weight the loss by inverse (or sqrt inverse) class "
                                "frequency of the train split", choices=CLASS_WEIGHTS)
    schedule: str = option("constant", "learning-rate schedule after warmup", choices=SCHEDULES)
    warmup_epochs: float = option(0.0, "linear warmup from ~0 to --lr over this many epochs")
    precision: str = option("auto", "autocast dtype; auto: bf16 on a GPU (fp16 where bf16 is "
                            "unsupported or the launcher asks for fp16), fp32 (no) on the CPU",
                            choices=PRECISIONS)
    quiet: bool = option(False, "no progress bar; one line per epoch")

    def __post_init__(self):
        positive = {"epochs": self.epochs, "batch-size": self.batch_size, "lr": self.lr,
                    "image-size": self.image_size}
        for name, value in positive.items():
            if not value > 0:
                raise UserError(f"--{name} must be positive, got {value}")
        for name, value in {"momentum": self.momentum, "weight-decay": self.weight_decay,
                            "warmup-epochs": self.warmup_epochs}.items():
            if value < 0:
                raise UserError(f"--{name} must be 0 or more, got {value}")
        if self.pretrained and self.weights:
            raise UserError("use either --pretrained or --weights FILE, not both")
        if self.image_size < 32:
            raise UserError(f"--image-size {self.image_size} is too small for a ResNet (use 32 or more)")

    def to_dict(self) -> dict:
        return asdict(self)


def build_parser() -> argparse.ArgumentParser:
    """One option per field of TrainConfig; SUPPRESS keeps only what was typed."""
    parser = argparse.ArgumentParser(
        prog="trainer/train.py", description="Train a ResNet diabetic-retinopathy grader.",
        argument_default=argparse.SUPPRESS, allow_abbrev=False,
    )
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        help_text = meta["help"]
        if "(default" not in help_text and f.default not in (None, False):
            help_text += f" (default: {f.default})"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=help_text)
        else:
            parser.add_argument(flag, type=meta["type"] or type(f.default), choices=meta["choices"],
                                metavar=meta["metavar"], help=help_text)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """The config, and the names of the options given on the command line (for --resume)."""
    given = vars(build_parser().parse_args(argv))  # unknown options: usage + exit 2
    return TrainConfig(**given), set(given)


def merge_for_resume(saved: dict, cli: TrainConfig, given: set[str]) -> TrainConfig:
    """The saved run's config, with the options typed now that a resumed run may change."""
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    changed = {}
    for name in given:
        new, old = getattr(cli, name), getattr(config, name)
        if new == old:
            continue
        if name not in RESUMABLE:
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"{flag} {new} differs from the run being resumed ({old}); drop it, "
                "or start a new run with another --out"
            )
        changed[name] = new
    config_dict = config.to_dict() | changed | {"resume": True}
    return TrainConfig(**config_dict)
