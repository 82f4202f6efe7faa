"""The trainer's one config: a dataclass, and the command line generated from it.

Defaults reproduce the reference recipe: resnet18, SGD lr 0.01, momentum 0.9, weight decay
5e-4, batch 8 per device, 10 epochs, 512 px, cross-entropy, constant lr, random horizontal
and vertical flips.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from pipeline.cli import arg, parse_config_given
from pipeline.errors import UserError
from pipeline.loading.augment import PRESETS, AugmentConfig, augment_preset
from pipeline.remote import CACHE_HELP
from trainer.base.normalize import NORMALIZE
from trainer.fitting.recipes import RECIPES, resolve

ARCHS = ("resnet18", "resnet50")  # the keys of trainer.base.model.MODELS (checked by a test)
HEADS = (
    "classify",
    "regress",
    "ordinal",
)  # the keys of trainer.base.heads.HEADS (checked by a test)
OPTIMIZERS = ("sgd", "adamw")
TRACKERS = ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive")
BACKENDS = ("auto", "dali", "torch", "torch-nvjpeg")
CLASS_WEIGHTS = ("none", "inverse", "sqrt")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "no", "bf16", "fp16")
RECIPE_NAMES = tuple(RECIPES)

# Options a resumed run may change; any other option given with --resume must match the run.
RESUMABLE = (
    "resume",
    "out",
    "shards",
    "cache",
    "epochs",
    "lr",
    "workers",
    "backend",
    "quiet",
    "verify_shards",
    "deterministic",
    "shard_io",
    "log_with",
)


@dataclass
class TrainConfig:
    recipe: str = arg(
        "reference",
        "a named set of defaults (docs/recipes.md): reference (the lab report) or "
        "huang2023 (Huang et al. 2023's ResNet-50 EyePACS recipe); options given "
        "explicitly override it",
        choices=RECIPE_NAMES,
    )
    arch: str = arg("resnet18", "network", choices=ARCHS)
    shards: str = arg(
        "shards",
        "shard folder written by tools/make_shards.py, or s3://, gs://, http(s):// URL of one",
        metavar="DIR",
    )
    cache: str | None = arg(None, CACHE_HELP, metavar="DIR")
    out: str | None = arg(None, "run folder (default: runs/ARCH-YYYYmmdd-HHMMSS)", metavar="DIR")
    epochs: int = arg(10, "epochs to train (with --resume: the new total)")
    batch_size: int = arg(8, "images per step per device (process)")
    head: str = arg(
        "classify",
        "classify: 5-way softmax (the reference); regress: one output on the "
        "grade, cut-points tuned on val for kappa; ordinal: 4 cumulative sigmoids",
        choices=HEADS,
    )
    regress_loss: str = arg(
        "mse",
        "loss of the regress head (with it, the gradient is clipped at norm 1 unless "
        "--clip-grad says otherwise: see docs/recipes.md)",
        choices=("mse", "smoothl1"),
    )
    tune_cuts: bool = arg(
        False,
        "regress head: tune the cut-points on a val split under 500 images too (they stay "
        "0.5/1.5/2.5/3.5 there otherwise; tuned ones leave every grade a band >= 0.5)",
    )
    label_smoothing: float = arg(0.0, "classify head: cross-entropy label smoothing")
    optimizer: str = arg(
        "sgd", "sgd (the reference, with --momentum) or adamw (try --lr 1e-3)", choices=OPTIMIZERS
    )
    lr: float = arg(0.01, "learning rate (peak, after warmup)")
    momentum: float = arg(0.9, "SGD momentum")
    nesterov: bool = arg(False, "SGD with Nesterov momentum")
    weight_decay: float = arg(5e-4, "weight decay")
    ema: float | None = arg(
        None,
        "keep an exponential moving average of the weights with this decay "
        "(e.g. 0.999); it is what is evaluated and saved in best.pt",
        metavar="DECAY",
    )
    grad_accumulation: int = arg(
        1, "batches per optimizer step (gradients accumulated)", metavar="N"
    )
    clip_grad: float | None = arg(
        None,
        "clip the gradient norm to this (unless given: 1 for the regress head with MSE, "
        "else no clipping; inf turns it off)",
        metavar="NORM",
    )
    compile: bool = arg(False, "torch.compile the model")
    image_size: int = arg(512, "square input size in pixels")
    pretrained: bool = arg(False, "start from torchvision's ImageNet weights (downloaded once)")
    imagenet_weights: str = arg(
        "V1",
        "which torchvision ImageNet weights: V1 (the reference's) or V2 (resnet50 only)",
        choices=("V1", "V2"),
    )
    weights: str | None = arg(
        None,
        "start from a local state dict: full model or ImageNet backbone "
        "(its 1000-way head is dropped)",
        metavar="FILE",
    )
    resume: str | None = arg(
        None,
        "continue the run in --out from its checkpoints/last/ (also from the middle of an "
        "epoch); --resume auto: continue it if --out holds one, else start it (a requeued job)",
        choices=("last", "auto"),
        const="last",
    )
    backend: str = arg(
        "auto",
        "loader backend (auto: DALI if installed, else torch-nvjpeg on a GPU, else torch)",
        choices=BACKENDS,
    )
    seed: int = arg(0, "seed for initialisation, shuffling and augmentation")
    workers: int | None = arg(None, "loader workers per process (default: the loader's choice)")
    augment: str = arg(
        "reference",
        "train augmentation: reference (flips), strong (flips, "
        "rotation through the full circle, scale and colour jitter) or huang2023 (flips, "
        "full rotation, translation 0.2, colour 0.2)",
        choices=tuple(PRESETS),
    )
    rotate: float | None = arg(
        None, "max rotation in degrees (overrides --augment's)", metavar="DEG"
    )
    scale_jitter: float | None = arg(
        None, "random square crop of [1-S, 1] of the area (overrides --augment's)", metavar="S"
    )
    color_jitter: float | None = arg(
        None, "brightness and contrast factors in [1-C, 1+C] (overrides --augment's)", metavar="C"
    )
    translate: float | None = arg(
        None,
        "shift in x and y of up to T of the size, black fill (overrides --augment's)",
        metavar="T",
    )
    normalize: str = arg(
        "imagenet",
        "per-channel mean and std to normalise with: ImageNet's, or the train split's "
        "own (measured by make_shards; recorded in best.pt either way)",
        choices=NORMALIZE,
    )
    class_weights: str = arg(
        "none",
        "weight the loss by inverse (or sqrt inverse) class frequency of the train split",
        choices=CLASS_WEIGHTS,
    )
    schedule: str = arg("constant", "learning-rate schedule after warmup", choices=SCHEDULES)
    min_lr: float = arg(
        0.0, "--schedule cosine: the lr never goes below this (a clipped cosine)", metavar="LR"
    )
    warmup_epochs: float = arg(0.0, "linear warmup from ~0 to --lr over this many epochs")
    precision: str = arg(
        "auto",
        "autocast dtype; auto: bf16 on a GPU (fp16 where bf16 is not "
        "native or the launcher asks for fp16), fp32 (no) on the CPU",
        choices=PRECISIONS,
    )
    deterministic: bool = arg(
        False,
        "deterministic GPU kernels and no cuDNN autotuning: a resumed "
        "run then ends bit for bit like an uninterrupted one on a GPU too (slower)",
    )
    shard_io: str = arg(
        "auto",
        "how DALI reads the tars: mmap, read (better on network filesystems), "
        "or auto (read on NFS/Lustre/FUSE and the like, else mmap)",
        choices=("auto", "mmap", "read"),
    )
    verify_shards: bool = arg(
        False,
        "check every shard byte by byte against the manifest before "
        "training (sha256, indexes, keys, patients, grades); the sizes and index "
        "counts are always checked",
    )
    log_with: list[str] | None = arg(
        None,
        "also log each epoch to these trackers through Accelerate (metrics.jsonl stays the record)",
        choices=TRACKERS,
    )
    quiet: bool = arg(False, "no progress bar; one line per epoch")
    smoke: bool = arg(
        False, "check this machine: 2 epochs at 64 px on the packaged fixture (trainer/smoke.py)"
    )

    def __post_init__(self):
        positive = {
            "epochs": self.epochs,
            "batch-size": self.batch_size,
            "lr": self.lr,
            "image-size": self.image_size,
        }
        for name, value in positive.items():
            if not value > 0:
                raise UserError(f"--{name} must be positive, got {value}")
        for name, value in {
            "momentum": self.momentum,
            "weight-decay": self.weight_decay,
            "warmup-epochs": self.warmup_epochs,
            "min-lr": self.min_lr,
        }.items():
            if value < 0:
                raise UserError(f"--{name} must be 0 or more, got {value}")
        if self.pretrained and self.weights:
            raise UserError("use either --pretrained or --weights FILE, not both")
        if self.ema is not None and not 0 < self.ema < 1:
            raise UserError(f"--ema must be a decay between 0 and 1 (e.g. 0.999), got {self.ema}")
        if self.grad_accumulation < 1:
            raise UserError(f"--grad-accumulation must be at least 1, got {self.grad_accumulation}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise UserError(f"--clip-grad must be positive, got {self.clip_grad}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.label_smoothing and self.head != "classify":
            raise UserError("--label-smoothing applies to the classify head only")
        if self.class_weights != "none" and self.head == "regress":
            raise UserError(
                "--class-weights applies to the classify and ordinal heads only: weighting "
                "a regression target shifts the grade it learns (use --class-weights none)"
            )
        if self.min_lr > self.lr:
            raise UserError(f"--min-lr {self.min_lr} is above --lr {self.lr}")
        if self.imagenet_weights == "V2" and self.arch != "resnet50":
            raise UserError("--imagenet-weights V2 exists for resnet50 only")
        if self.image_size < 32:
            raise UserError(
                f"--image-size {self.image_size} is too small for a ResNet (use 32 or more)"
            )
        self.augment_config()  # checks the knobs' ranges now, not at the first batch

    def augment_config(self) -> AugmentConfig:
        return augment_preset(
            self.augment,
            rotate=self.rotate,
            scale=self.scale_jitter,
            color=self.color_jitter,
            translate=self.translate,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """The config with its recipe resolved (trainer/fitting/recipes.py), and the names of the options
    given on the command line (for --resume)."""
    cfg, given = parse_config_given(
        TrainConfig,
        argv,
        prog="trainer/train.py",
        description="Train a ResNet diabetic-retinopathy grader.",
    )
    return resolve(cfg, given), given


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
    return TrainConfig(**(config.to_dict() | changed | {"resume": "last"}))
