"""Named recipes: sets of defaults for the trainer, chosen with ``--recipe``.

    accelerate launch trainer/train.py --recipe huang2023 --shards shards     # their recipe
    accelerate launch trainer/train.py --recipe huang2023 --epochs 10         # ... shorter

An option given on the command line always wins; then the recipe's value; then the head's
own default (below); then the dataclass default (``TrainConfig``, which is the
``reference`` recipe, the lab report's). ``config.json`` and every checkpoint record the
resolved values and the recipe's name. docs/recipes.md says where each value comes from
and which parts of a published recipe this project does not reproduce.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from pipeline.errors import UserError

TrainConfig = Any  # trainer.fitting.config.TrainConfig, which imports this module (not the reverse)

# Huang, Lin, Cheng, Lyu, Tam, Tang: "Identifying the key components in ResNet-50 for
# diabetic retinopathy grading from fundus images: a systematic investigation",
# Diagnostics 13(10):1664, 2023 (0.8631 kappa on the EyePACS Private test set); values as
# the authors' configs/eyepacs.yaml sets them (github.com/YijinHuang/pytorch-classification).
HUANG2023 = {
    "arch": "resnet50",
    "pretrained": True,  # ImageNet (torchvision's V1 weights)
    "imagenet_weights": "V1",
    "image_size": 512,
    "head": "regress",
    "regress_loss": "mse",
    "class_weights": "none",  # and instance-balanced sampling, which is all this project does
    "label_smoothing": 0.0,
    "optimizer": "sgd",
    "lr": 1e-3,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "epochs": 25,
    "schedule": "cosine",
    "min_lr": 1e-4,  # their "clipped cosine": cosine from 1e-3, never below 1e-4
    "warmup_epochs": 0.0,
    "clip_grad": None,  # they do not clip the single-eye network's gradient
    "ema": None,
    "grad_accumulation": 1,
    # flips, rotation through the full circle, translation +-20 %, brightness and contrast
    # +-0.2, every one on every image; no random crop (their config lists it with p=0)
    "augment": "huang2023",
    "rotate": 180.0,
    "scale_jitter": 0.0,
    "color_jitter": 0.2,
    "translate": 0.2,
    "normalize": "dataset",  # the train split's own channel mean and std
}

RECIPES: dict[str, dict] = {"reference": {}, "huang2023": HUANG2023}
# A recipe's batch is global: each process gets GLOBAL_BATCH / world size (16 = 16 on one
# GPU, 2 x 8 on eight).
GLOBAL_BATCH = {"huang2023": 16}
# The regress head with MSE diverges at the reference lr 0.01 in its first epoch (a grade-4
# image far from a fresh head's ~0 output gives a gradient 8x smooth L1's, and with momentum
# 0.9 the weights blow up within ~10 steps). Clipping the gradient norm at 1 bounds every
# step without moving the minimum; a warmup alone only postpones the blow-up.
REGRESS_MSE_CLIP = 1.0


def head_defaults(cfg: TrainConfig) -> dict:
    """Defaults that depend on the head (applied only where neither the command line nor the
    recipe set the option)."""
    if cfg.head == "regress" and cfg.regress_loss == "mse":
        return {"clip_grad": REGRESS_MSE_CLIP}
    return {}


def world_size() -> int:
    """The number of processes of this launch (accelerate launch and torchrun set it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def resolve(cfg: TrainConfig, given: set[str], world: int | None = None) -> TrainConfig:
    """``cfg`` with its recipe's values, then the head's defaults, wherever an option was not
    given on the command line."""
    if cfg.recipe not in RECIPES:
        raise UserError(f"unknown recipe '{cfg.recipe}'; choose one of {', '.join(RECIPES)}")
    recipe = dict(RECIPES[cfg.recipe])
    if "weights" in given:  # --weights FILE replaces the recipe's ImageNet start
        recipe.pop("pretrained", None)
    values = {k: v for k, v in recipe.items() if k not in given}
    if cfg.recipe in GLOBAL_BATCH and "batch_size" not in given:
        values["batch_size"] = per_process_batch(GLOBAL_BATCH[cfg.recipe], world or world_size())
    cfg = replace(cfg, **values)
    settled = given | set(recipe)
    extra = {k: v for k, v in head_defaults(cfg).items() if k not in settled}
    return replace(cfg, **extra) if extra else cfg


def per_process_batch(global_batch: int, world: int) -> int:
    if global_batch % world:
        raise UserError(
            f"the recipe's global batch of {global_batch} does not divide among {world} "
            "processes; give --batch-size (per process) explicitly"
        )
    return global_batch // world
