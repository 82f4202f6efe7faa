"""--log-with: every epoch's figures and confusion matrices through Accelerate's trackers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from accelerate import Accelerator
from PIL import Image

from trainer.base.runfiles import CONFUSION_DIR
from trainer.fitting.config import TrainConfig


class Trackers:
    """--log-with: every epoch's figures and confusion matrices through Accelerate's trackers
    (metrics.jsonl stays the record)."""

    def __init__(self, accelerator: Accelerator, cfg: TrainConfig, out: Path):
        self.accelerator, self.on = accelerator, bool(cfg.log_with)
        if self.on:
            accelerator.project_configuration.set_directories(str(out))
            hparams = {
                k: v if isinstance(v, int | float | str | bool) else str(v)
                for k, v in cfg.to_dict().items()
                if v is not None
            }
            accelerator.init_trackers(out.name, config=hparams)

    def log(self, row: dict, out: Path) -> None:
        if not self.on:
            return
        scalars = {}
        for key, value in row.items():
            if isinstance(value, list | tuple):
                scalars |= {f"{key}_{i}": v for i, v in enumerate(value)}
            elif isinstance(value, int | float) and key != "epoch":
                scalars[key] = value
        self.accelerator.log(scalars, step=row["epoch"])
        if not self.accelerator.is_main_process:
            return
        images = {
            f"confusion/{png.name.split('_epoch')[0]}": np.asarray(Image.open(png).convert("RGB"))[
                None
            ]
            for png in sorted((out / CONFUSION_DIR).glob(f"*_epoch_{row['epoch']:03d}.png"))
        }
        for tracker in self.accelerator.trackers:
            options = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
            tracker.log_images(images, step=row["epoch"], **options)
