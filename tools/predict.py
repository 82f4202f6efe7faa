"""Grade fundus photographs with a trained checkpoint.

    python tools/predict.py --checkpoint runs/resnet18/best.pt photos/ [more.jpeg ...] \
        --out predictions/ [--tta]

Each photo goes through exactly what a training image went through: the shard builder's
decision (a photo already at the shards' size is kept as it is, any other is border-cropped,
padded square, resized, Graham-normalised if the shards were, and JPEG-encoded), then the
loaders' evaluation path (decode, resize to the model's size, normalise). So raw camera
photos work as they are, and a photo packed into shards gets the same probabilities here
as from ``trainer/evaluate.py``. Writes ``OUT/predictions.csv``, one row per image: the
predicted grade, the five probabilities (calibrated with the checkpoint's temperature), or the reason it could not be graded (unreadable,
too small, a symlink loop). With ``--pair-eyes`` each row also keeps the eye's own figures
(``pred_alone``, ``referable_score_alone``) beside the both-eyes ones (``grade``,
``referable_score``), the method (``pair_method``: ``alone`` for an eye without its partner
here, ``blend w=0.30`` or ``fused``) and the patient's screening decision
(``patient_referable``: 1 when either eye's both-eyes referable score reaches the checkpoint's
referral threshold, or, without one, either eye's grade is 2 or more); the summary line says
the method and how many pairs it found. Such an image is reported and skipped; the exit status is 1
when any was, 0 when all were graded. ``--preprocess plain|graham`` says how to prepare the
photos for a checkpoint that does not record it; one that contradicts what the checkpoint
records stops (``--allow-preprocessing-mismatch`` goes on, with a warning). ``--explain``
also writes ``OUT/cam/<name>.png`` per graded photo: where the model looked (Grad-CAM,
trainer/judging/explain.py) beside the photo as the model saw it.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.cli import arg, parse_config, run_cli
from pipeline.constants import IMAGE_EXTENSIONS, NUM_CLASSES
from pipeline.errors import UserError
from pipeline.fileio import (
    atomic_write,
    check_out_folder,
    folder_lock,
    inside,
    safe_cell,
    staged_outputs,
)
from pipeline.shardformat import make_key, patient_of, unique_keys
from pipeline.writing.preprocess import BadImage, prepare
from trainer.base.metrics import REFERABLE_GRADE
from trainer.base.preprocessing import check_preprocessing
from trainer.base.runfiles import PREDICTIONS_FILE
from trainer.judging.options import CAM_DIR, FUSION_KEY

# torch and the modules that import it load inside the functions that use them: --help and
# option errors are answered before they load
if TYPE_CHECKING:
    import torch

    from trainer.base.decisions import Decisions

PHOTO_EXTENSIONS = IMAGE_EXTENSIONS  # what make_shards packs
PHOTO_NAMES = "/".join(PHOTO_EXTENSIONS)


@dataclass
class PredictConfig:
    inputs: list[Path] = arg(
        help=f"photos, or folders searched for {PHOTO_NAMES}",
        positional=True,
        metavar="IMAGE_OR_DIR",
    )
    checkpoint: Path = arg(help="best.pt written by trainer/train.py", metavar="FILE")
    out: Path = arg(Path("."), "folder to write predictions.csv into", metavar="DIR")
    tta: bool = arg(
        False, "average over the eight flips and 90-degree rotations (as evaluate.py --tta)"
    )
    batch_size: int = arg(16, "images per forward pass")
    pair_eyes: bool = arg(
        False,
        "grade both eyes of a patient together (10_left with 10_right, by file name): "
        "with the checkpoint's fusion head (dr-fuse) if it has one, else blending each "
        "eye's outputs with its partner's (the weight chosen on val)",
    )
    explain: bool = arg(
        False,
        "also write OUT/cam/<name>.png per photograph: the class-activation map of its "
        "prediction beside the photograph as the model saw it",
    )
    device: str = arg("auto", "torch device (auto: cuda when there is a GPU, else cpu)")
    preprocess: str = arg(
        "checkpoint",
        "how to prepare the photos: as the checkpoint's training images were, or plain / "
        "graham for a checkpoint that does not record it",
        choices=("checkpoint", "plain", "graham"),
    )
    allow_preprocessing_mismatch: bool = arg(
        False, "with a --preprocess that contradicts the checkpoint: go on, with a warning"
    )

    def __post_init__(self):
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass
class Prediction:
    path: Path
    grade: int | None = None
    probs: list[float] | None = None
    error: str | None = None
    alone: tuple[int, float] | None = None  # --pair-eyes: (grade, referable score) eye alone
    method: str | None = None  # --pair-eyes: alone / blend w=0.30 / fused
    patient_referable: int | None = None


@dataclass
class Pairing:
    """How --pair-eyes graded a set of photographs (``paired_outputs``)."""

    outputs: np.ndarray  # (N, k) both eyes
    cuts: tuple[float, ...] | None
    method: str  # "blend w=0.30" or "fused"
    temperature: float | None  # the single eye's; none for the fusion head's outputs
    threshold: float | None  # the referral threshold that goes with these outputs


def find_images(inputs: list[Path]) -> tuple[list[Path], list[Prediction]]:
    """Files named directly, and every photo (PHOTO_EXTENSIONS, any case) below named folders
    (symbolic links followed); the second list reports the symlink loops met on the way."""
    found: list[Path] = []
    problems: list[Prediction] = []
    for item in map(Path, inputs):
        if not item.is_dir():
            found.append(item)  # a missing file is reported per image, like an unreadable one
            continue
        seen: dict[tuple[int, int], str] = {}
        for folder, dirs, files in os.walk(item, followlinks=True):
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                problems.append(
                    Prediction(
                        Path(folder), error=f"symlink loop (back to {seen[st.st_dev, st.st_ino]})"
                    )
                )
                dirs.clear()
                continue
            seen[st.st_dev, st.st_ino] = folder
            dirs.sort()
            for name in sorted(files):
                path = Path(folder) / name
                if path.suffix.lower() in PHOTO_EXTENSIONS:
                    found.append(path)
    if not found and not problems:
        raise UserError(f"no {PHOTO_NAMES} images found in {', '.join(map(str, inputs))}")
    return found, problems


def load_for_model(path: Path, shard_size: int, image_size: int, graham: bool) -> torch.Tensor:
    """uint8 CHW tensor of one photo, exactly as training saw it (see the module docstring):
    the shard builder's ``prepare``, so the same files are refused for the same reasons."""
    from pipeline.loading.samples import eval_image

    try:
        return eval_image(prepare(path, shard_size, graham=graham), image_size, str(path))
    except UserError as err:
        raise BadImage(str(err)) from None


def photo_graham(args: PredictConfig, recorded: dict) -> bool:
    """Whether photos get Graham's normalisation: the checkpoint's record, or --preprocess."""
    check_preprocessing(
        recorded,
        {"crop_border": True},
        str(args.checkpoint),
        "predict.py (it always crops the black border)",
        allow=args.allow_preprocessing_mismatch,
    )
    if args.preprocess == "checkpoint":  # one that records nothing was trained on plain images
        return bool(recorded.get("graham", False))
    graham = args.preprocess == "graham"
    check_preprocessing(
        recorded,
        {"graham": graham},
        str(args.checkpoint),
        f"--preprocess {args.preprocess}",
        allow=args.allow_preprocessing_mismatch,
    )
    return graham


def predict_batch(
    model, images: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, tta: bool
) -> torch.Tensor:
    """The head's raw outputs (N, k); with ``tta`` averaged over the eight flips and
    rotations (trainer/judging/tta.py)."""
    return outputs_and_features(model, images, shift, scale, tta)[0]


def outputs_and_features(
    model, images: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, tta: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's raw outputs (N, k) and the backbone features (N, D) (``model(x)`` is
    ``model.fc(features)``); with ``tta`` both averaged over the eight flips and rotations
    (trainer/judging/tta.py, as evaluate.py --tta)."""
    import torch

    from trainer.base.model import backbone_features
    from trainer.judging.tta import tta_outputs_and_features

    with torch.no_grad():
        x = torch.addcmul(shift, images, scale)  # the loaders' normalisation, to the bit
        if tta:
            return tta_outputs_and_features(model, x)
        features = backbone_features(model, x).float()
        return model.fc(features).float(), features


def main(argv: list[str] | None = None) -> int:
    args = parse_config(PredictConfig, argv, prog="predict.py", description=__doc__.splitlines()[0])
    check_out_folder(args.out).mkdir(parents=True, exist_ok=True)  # before any work
    with folder_lock(args.out, "predict"), staged_outputs(args.out, PREDICTIONS_FILE) as stage:
        graded, failed = grade_photos(args, stage)
    if graded == 0:
        raise UserError("none of the images could be read")
    return 1 if failed else 0


def grade_photos(args: PredictConfig, stage: Path) -> tuple[int, int]:
    """Grade every photo: (graded, not graded). The outputs go into ``stage``, moved into
    --out when complete, so an interrupted run leaves the previous predictions or none."""
    import torch

    from pipeline.loading.contract import normalization
    from trainer.base.bestfile import open_best
    from trainer.judging.calibration import scaled
    from trainer.judging.explain import explain_images

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    best = open_best(args.checkpoint, device=args.device)
    model, info = best.model, best.info
    image_size = int(info["image_size"])
    prep = info.get("preprocess") or {}
    shard_size, graham = int(prep.get("size", image_size)), photo_graham(args, prep)
    shift, scale = normalization(args.device, info["mean"], info["std"])
    head, cuts = best.head, best.decisions.cut_points
    paths, results = find_images(args.inputs)
    for problem in results:
        print(f"error: cannot grade {problem.path}: {problem.error}", file=sys.stderr)

    pending: list[tuple[Prediction, torch.Tensor]] = []
    graded: list[tuple[Prediction, np.ndarray, np.ndarray]] = []
    maps: list[tuple[np.ndarray, np.ndarray]] = []  # --explain: (pixels, map) per graded photo

    def flush():
        if pending:
            images = torch.stack([t for _, t in pending])
            outputs, features = outputs_and_features(
                model, images.to(args.device), shift, scale, args.tta
            )
            graded.extend(
                zip(
                    (p for p, _ in pending),
                    outputs.cpu().numpy(),
                    features.cpu().numpy(),
                    strict=True,
                )
            )
            if args.explain:
                maps.extend(explain_images(model, info, list(images), args.device))
            pending.clear()

    progress = Progress(len(paths))
    for path in paths:
        progress.step()
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
    pairs_line = ""
    if graded:
        preds = [p for p, _, _ in graded]
        outputs = np.stack([o for _, o, _ in graded])
        # calibrated, as evaluate.py's
        probs = head.probs(scaled(outputs, best.decisions.temperature), cuts)
        grades = head.grades(outputs, cuts)
        for pred, p, g in zip(preds, probs, grades, strict=True):
            pred.probs, pred.grade = [float(x) for x in p], int(g)
        if args.pair_eyes:  # partners found by file name: 10_left.jpeg beside 10_right.jpeg
            stems = [p.path.stem for p in preds]
            features = np.stack([f for *_, f in graded])
            pairing = paired_outputs(info, best.decisions, stems, outputs, features)
            pairs_line = grade_pairs(preds, stems, pairing, head)

    out = args.out / PREDICTIONS_FILE
    atomic_write(stage / PREDICTIONS_FILE, lambda tmp: write_csv(tmp, results, args.pair_eyes))
    if maps:
        write_explained(stage / CAM_DIR, [p for p, *_ in graded], maps)
    failed = sum(r.error is not None for r in results)
    graded = len(results) - failed
    counts = np.bincount([r.grade for r in results if r.grade is not None], minlength=NUM_CLASSES)
    print(
        f"graded {graded} image(s), {failed} not graded; predicted grades 0-4: "
        f"{' / '.join(map(str, counts))}; wrote {out}"
    )
    if pairs_line:
        print(pairs_line)
    return graded, failed


def paired_outputs(
    info: dict, decisions: Decisions, keys: list[str], outputs: np.ndarray, features: np.ndarray
) -> Pairing:
    """Both eyes graded together, as evaluate.py --pair-eyes does: the checkpoint's fusion head
    (dr-fuse) if it has one, else the blend with what val decided (``Pairing``)."""
    from trainer.judging.fusion import fused_outputs
    from trainer.judging.pairing import blend_partners

    fusion = info.get(FUSION_KEY)
    if fusion:
        cuts = fusion.get("cut_points")
        fused = fused_outputs(fusion, keys, features, outputs)
        threshold = fusion.get("referable_threshold")
        return Pairing(fused, tuple(cuts) if cuts else None, "fused", None, threshold)
    weight = decisions.pair_blend  # clipped to 0.4 when best.pt was read
    return Pairing(
        blend_partners(keys, outputs, weight),
        decisions.blend_cuts,
        f"blend w={weight:.2f}",
        decisions.temperature,
        decisions.referable_threshold,
    )


def grade_pairs(preds: list[Prediction], keys: list[str], pairing: Pairing, head) -> str:
    """Give each graded prediction its both-eyes grade and probabilities, keeping its own as
    ``alone``, and its patient's decision; the line predict prints about it."""
    from trainer.judging.calibration import scaled
    from trainer.judging.pairing import partner_index

    partner = partner_index(keys)
    probs = head.probs(scaled(pairing.outputs, pairing.temperature), pairing.cuts)
    grades = head.grades(pairing.outputs, pairing.cuts)
    for pred, p, g, other in zip(preds, probs, grades, partner, strict=True):
        pred.alone = (pred.grade, sum(pred.probs[REFERABLE_GRADE:]))
        if other >= 0:
            pred.probs, pred.grade, pred.method = [float(x) for x in p], int(g), pairing.method
        else:  # no partner here: the eye alone, whatever the method
            pred.method = "alone"
    referable: dict[str, int] = {}
    for pred, key in zip(preds, keys, strict=True):
        score = sum(pred.probs[REFERABLE_GRADE:])
        says = score >= pairing.threshold if pairing.threshold is not None else None
        if says is None:
            says = pred.grade >= REFERABLE_GRADE
        referable[patient_of(key)] = max(referable.get(patient_of(key), 0), int(says))
    for pred, key in zip(preds, keys, strict=True):
        pred.patient_referable = referable[patient_of(key)]
    pairs = int((partner >= 0).sum()) // 2
    rule = (
        f"referable score >= {pairing.threshold:.4f}"
        if pairing.threshold is not None
        else f"grade >= {REFERABLE_GRADE}"
    )
    return (
        f"both eyes: {pairs} pair(s) of one patient's left and right eye graded together "
        f"({pairing.method}), {len(preds) - 2 * pairs} photograph(s) without their partner "
        f"graded alone; {sum(referable.values())} of {len(referable)} patient(s) referable "
        f"(either eye's {rule})"
    )


def write_explained(
    folder: Path, graded: list[Prediction], maps: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    """``folder/<photo name>.png``: each photo as the model saw it, beside its map."""
    from trainer.judging.explain import caption_of, overlay

    folder.mkdir(parents=True, exist_ok=True)
    # named as make_shards names keys: x.jpeg and x.png, or two a/x.png, never share a file
    names = unique_keys(
        [make_key(p.path.stem) for p in graded], [p.path.parent.name for p in graded]
    )
    for pred, (pixels, cam), name in zip(graded, maps, names, strict=True):
        caption = caption_of(str(pred.path), pred.grade, sum(pred.probs[2:]))
        overlay(pixels, cam, caption).save(inside(folder, f"{name}.png"))
    print(f"wrote {len(graded)} class-activation overlay(s) into {folder}")


class Progress:
    """``graded N/M photos`` on stderr every two seconds (a long run is seen to move)."""

    def __init__(self, total: int, every: float = 2.0):
        self.total, self.done, self.every, self.shown = total, 0, every, time.monotonic()

    def step(self) -> None:
        self.done += 1
        if time.monotonic() - self.shown >= self.every:
            self.shown = time.monotonic()
            print(f"graded {self.done - 1}/{self.total} photos", file=sys.stderr, flush=True)


PAIR_COLUMNS = ["pred_alone", "referable_score_alone", "pair_method", "patient_referable"]


def write_csv(path: Path, results: list[Prediction], pair_eyes: bool = False) -> None:
    """One row per photo; the names (a photo called ``=1+1.jpeg``) formula-safe."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["image", "grade", *[f"p{g}" for g in range(NUM_CLASSES)], "referable_score"]
            + (PAIR_COLUMNS if pair_eyes else [])
            + ["error"]
        )
        for r in results:
            probs = [f"{p:.8f}" for p in r.probs] if r.probs else [""] * NUM_CLASSES
            referable = f"{sum(r.probs[REFERABLE_GRADE:]):.8f}" if r.probs else ""
            pair = []
            if pair_eyes:
                pair = ["", "", "", ""]
                if r.alone is not None:
                    pair = [r.alone[0], f"{r.alone[1]:.8f}", r.method, r.patient_referable]
            writer.writerow(
                [safe_cell(str(r.path)), "" if r.grade is None else r.grade, *probs, referable]
                + pair
                + [safe_cell(r.error or "")]
            )


def cli() -> None:
    """The ``dr-predict`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
