"""Grade fundus photographs with a trained checkpoint.

    python tools/predict.py --checkpoint runs/resnet18/best.pt photos/ [more.jpeg ...] \
        --out predictions/ [--tta]

Each image gets the shard builder's preprocessing (black border cropped, padded to a
square, resized; Ben Graham's normalisation if the shards had it), so raw camera photos
work as they are. Writes ``OUT/predictions.csv``, one row per image: the predicted grade,
the five probabilities, or the reason it could not be read. An unreadable image is reported and
skipped; the exit status is 1 when any was, 0 when all were graded.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cli import arg, parse_config, run_cli
from pipeline.constants import IMAGE_EXTENSIONS, NUM_CLASSES
from pipeline.errors import UserError
from pipeline.writing.preprocess import BadImage, open_image, preprocess
from trainer.checkpoint import load_best

PHOTO_EXTENSIONS = (*IMAGE_EXTENSIONS, ".png")
PREDICTIONS_FILE = "predictions.csv"


@dataclass
class PredictConfig:
    inputs: list[Path] = arg(
        help="photos, or folders searched for .jpeg/.jpg/.png",
        positional=True,
        metavar="IMAGE_OR_DIR",
    )
    checkpoint: Path = arg(help="best.pt written by trainer/train.py", metavar="FILE")
    out: Path = arg(Path("."), "folder to write predictions.csv into", metavar="DIR")
    tta: bool = arg(False, "average over horizontal/vertical flips")
    batch_size: int = arg(16, "images per forward pass")
    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "torch device")

    def __post_init__(self):
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass
class Prediction:
    path: Path
    grade: int | None = None
    probs: list[float] | None = None
    error: str | None = None


def find_images(inputs: list[Path]) -> list[Path]:
    """Files named directly, and every photo (.jpeg/.jpg/.png, any case) below named folders."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(
                p for p in item.rglob("*") if p.suffix.lower() in PHOTO_EXTENSIONS and p.is_file()
            )
        else:
            found.append(item)  # a missing file is reported per image, like an unreadable one
    if not found:
        raise UserError(f"no .jpeg/.jpg/.png images found in {', '.join(map(str, inputs))}")
    return found


def load_for_model(path: Path, shard_size: int, image_size: int, graham: bool) -> torch.Tensor:
    """uint8 CHW tensor: the shard builder's preprocessing, then the training resolution."""
    img = preprocess(open_image(path, draft_size=shard_size), shard_size, graham=graham)
    array = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    if shard_size != image_size:
        array = (
            F.interpolate(
                array[None].float(),
                size=(image_size, image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )[0]
            .round()
            .clamp(0, 255)
            .byte()
        )
    return array


@torch.no_grad()
def predict_batch(
    model, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, tta: bool
) -> torch.Tensor:
    """Class probabilities (N, 5); with ``tta`` averaged over the four flips."""
    x = (images.float() - mean) / std
    views = [x, x.flip(-1), x.flip(-2), x.flip(-1, -2)] if tta else [x]
    return torch.stack([model(v).float().softmax(1) for v in views]).mean(0)


def main(argv: list[str] | None = None) -> int:
    args = parse_config(PredictConfig, argv, prog="predict.py", description=__doc__.splitlines()[0])

    model, info = load_best(args.checkpoint, device=args.device)
    image_size = int(info["image_size"])
    prep = info.get("preprocess") or {}
    shard_size, graham = int(prep.get("size", image_size)), bool(prep.get("graham", False))
    mean = torch.tensor(info["mean"], device=args.device).view(1, 3, 1, 1)
    std = torch.tensor(info["std"], device=args.device).view(1, 3, 1, 1)
    paths = find_images(args.inputs)

    results: list[Prediction] = []
    pending: list[tuple[Prediction, torch.Tensor]] = []

    def flush():
        if pending:
            probs = predict_batch(
                model, torch.stack([t for _, t in pending]).to(args.device), mean, std, args.tta
            )
            for (pred, _), p in zip(pending, probs.cpu().tolist(), strict=True):
                pred.probs, pred.grade = p, int(np.argmax(p))
            pending.clear()

    for path in paths:
        pred = Prediction(path)
        results.append(pred)
        try:
            pending.append((pred, load_for_model(path, shard_size, image_size, graham)))
        except BadImage as err:
            pred.error = err.reason
            print(f"error: cannot grade {path}: {err.reason}", file=sys.stderr)
            continue
        if len(pending) == args.batch_size:
            flush()
    flush()

    out = args.out / PREDICTIONS_FILE
    write_csv(out, results)
    failed = sum(r.error is not None for r in results)
    graded = len(results) - failed
    counts = np.bincount([r.grade for r in results if r.grade is not None], minlength=NUM_CLASSES)
    print(
        f"graded {graded} image(s), {failed} unreadable; predicted grades 0-4: "
        f"{' / '.join(map(str, counts))}; wrote {out}"
    )
    if graded == 0:
        raise UserError("none of the images could be read")
    return 1 if failed else 0


def write_csv(path: Path, results: list[Prediction]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "grade", *[f"p{g}" for g in range(NUM_CLASSES)], "error"])
        for r in results:
            probs = [f"{p:.4f}" for p in r.probs] if r.probs else [""] * NUM_CLASSES
            writer.writerow(
                [str(r.path), "" if r.grade is None else r.grade, *probs, r.error or ""]
            )


def cli() -> None:
    """The ``dr-predict`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
