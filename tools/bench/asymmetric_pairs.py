"""Both eyes on patients whose eyes differ: does each eye keep its own evidence?

    python tools/bench/asymmetric_pairs.py --checkpoint demo/runs/resnet18-regress/best.pt \
        --pairs 24 --out pairs/ [--size 256 --difficulty realistic --lesion-scale 3 --seed 900]

Renders ``--pairs`` new patients (tools/make_synthetic.py, so no photograph was trained on),
each with one grade-0 and one grade-4 eye (which eye is random), keyed ``90N_left`` /
``90N_right``, prepares them as predict.py does and grades every eye three ways: alone, both
eyes blended (the checkpoint's weight, clipped as predict clips it) and fused (the
checkpoint's dr-fuse head, when it has one). Prints one table row per method: the pairs
whose grade-4 eye scores above its grade-0 partner, of those the eye alone orders right the
ones the method keeps in that order, the pairs whose two eyes got one grade, healthy eyes
graded referable, and the patients referred (either eye grade >= 2). ``OUT/pairs.csv``
holds every eye's grade and severity per method. The severity compared is the regress
head's score, or the log-odds of referable DR (classify, ordinal; calibrated).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.cli import arg, parse_config, run_cli
from pipeline.errors import UserError
from tools.make_synthetic import DIFFICULTIES, render_fundus
from tools.predict import load_for_model, outputs_and_features
from trainer.base.metrics import REFERABLE_GRADE
from trainer.judging.options import FUSION_KEY

# torch and the trainer's modules load inside the functions that use them: --help and option
# errors are answered before they load

SICK = 4


@dataclass
class PairsConfig:
    checkpoint: Path = arg(
        help="best.pt (with dr-fuse's head for the fused column)", metavar="FILE"
    )
    out: Path = arg(help="folder for the photographs and pairs.csv", metavar="DIR")
    pairs: int = arg(24, "patients, each with a grade-0 and a grade-4 eye")
    size: int = arg(256, "photograph size (as make_synthetic --size)")
    difficulty: str = arg("realistic", "as make_synthetic --difficulty", choices=DIFFICULTIES)
    lesion_scale: float = arg(3.0, "as make_synthetic --lesion-scale (the demo's: 3)")
    seed: int = arg(900, "seed of the photographs (the demo's data use seed 0)")

    def __post_init__(self):
        if self.pairs < 1:
            raise UserError(f"--pairs must be at least 1, got {self.pairs}")


def render_pairs(cfg: PairsConfig) -> tuple[list[Path], np.ndarray]:
    """The photographs, written into OUT/photos, and their grades."""
    rng = np.random.default_rng(cfg.seed)
    folder = cfg.out / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    paths, grades = [], []
    for i in range(cfg.pairs):
        sick_eye = int(rng.integers(2))
        for j, eye in enumerate(("left", "right")):
            grade = SICK if j == sick_eye else 0
            pixels = render_fundus(
                grade,
                rng,
                cfg.size,
                eye,
                difficulty=cfg.difficulty,
                lesion_scale=cfg.lesion_scale,
            )
            path = folder / f"90{i}_{eye}.jpeg"
            Image.fromarray(pixels).save(path, quality=95)
            paths.append(path)
            grades.append(grade)
    return paths, np.array(grades)


def severity(head_name: str, outputs: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """What orders two eyes: the regress score, else the log-odds of referable DR."""
    if head_name == "regress":
        return outputs[:, 0].astype(np.float64)
    p = probs[:, REFERABLE_GRADE:].sum(axis=1).clip(1e-300, None)
    q = probs[:, :REFERABLE_GRADE].sum(axis=1).clip(1e-300, None)
    return np.log(p) - np.log(q)


def methods(info: dict, keys: list[str], outputs: np.ndarray, features: np.ndarray, cuts):
    """{name: (outputs, cut-points, temperature)} for alone, the blend and, if stored, fusion."""
    from trainer.judging.fusion import fused_outputs
    from trainer.judging.pairing import blend_partners, usable_blend

    temperature = info.get("temperature")
    weight = usable_blend(info.get("pair_blend"))
    pair_cuts = info.get("pair_cut_points") or cuts
    found = {
        "alone": (outputs, cuts, temperature),
        f"blend w={weight:.2f}": (
            blend_partners(keys, outputs, weight),
            tuple(pair_cuts) if pair_cuts else None,
            temperature,
        ),
    }
    fusion = info.get(FUSION_KEY)
    if fusion:
        fused_cuts = fusion.get("cut_points")
        found["fused"] = (
            fused_outputs(fusion, keys, features, outputs),
            tuple(fused_cuts) if fused_cuts else None,
            None,
        )
    return found


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(
        PairsConfig, argv, prog="asymmetric_pairs.py", description=__doc__.splitlines()[0]
    )
    import torch

    from pipeline.loading.contract import normalization
    from trainer.base.bestfile import head_of, load_best
    from trainer.judging.calibration import scaled

    model, info = load_best(cfg.checkpoint)
    head, cuts = head_of(info)
    size = int(info["image_size"])
    prep = info.get("preprocess") or {}
    shift, scale = normalization("cpu", info["mean"], info["std"])
    paths, grades = render_pairs(cfg)
    images = torch.stack(
        [
            load_for_model(p, int(prep.get("size", size)), size, bool(prep.get("graham")))
            for p in paths
        ]
    )
    outputs, features = outputs_and_features(model.eval(), images, shift, scale, tta=False)
    keys = [p.stem for p in paths]
    sick = grades.reshape(-1, 2).argmax(axis=1)
    first = np.arange(0, len(keys), 2)
    rows, per_eye = [], {"key": keys, "true": grades}
    alone_right = None
    for name, (out, method_cuts, temperature) in methods(
        info, keys, outputs.numpy(), features.numpy(), cuts
    ).items():
        probs = head.probs(scaled(out, temperature), method_cuts)
        graded = head.grades(out, method_cuts)
        sev = severity(head.name, out, probs)
        right = sev[first + sick] > sev[first + 1 - sick]
        alone_right = right if alone_right is None else alone_right
        per_eye |= {f"{name}: grade": graded, f"{name}: severity": sev}
        rows.append(
            {
                "method": name,
                "ordered right": f"{right.sum()} of {len(first)}",
                "order kept where alone is right": f"{(right & alone_right).sum()} of {alone_right.sum()}",
                "one grade for both eyes": int((graded[first] == graded[first + 1]).sum()),
                "grade-0 eyes graded referable": int(
                    (graded[grades == 0] >= REFERABLE_GRADE).sum()
                ),
                "patients referred": int(
                    (graded.reshape(-1, 2) >= REFERABLE_GRADE).any(axis=1).sum()
                ),
            }
        )
    write_table(cfg.out / "pairs.csv", per_eye)
    print(
        f"{cfg.pairs} patients, one grade-0 and one grade-4 eye each ({cfg.checkpoint}, {head.name} head)"
    )
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    return 0


def write_table(path: Path, columns: dict) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for values in zip(*columns.values(), strict=True):
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in values])


if __name__ == "__main__":
    run_cli(main)
