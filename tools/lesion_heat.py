"""Does the model look at the lesions? Grad-CAM heat inside synthetic lesion masks.

    python tools/make_synthetic.py --out data/ --masks ...      # photographs + masks/
    python tools/lesion_heat.py --checkpoint runs/r18/best.pt --data data/ \
        [--shards shards/ --split test] [--out heat/] [--target referable --layer layer3]

For every photograph in ``--data`` whose picture shows referable disease (drawn grade >= 2,
``masks/drawn_grades.csv``; with ``--shards``, only those in ``--split`` of that shard
folder, so a model is judged on photographs it did not train on), it prepares the photo as
``tools/predict.py`` does, computes the class-activation map of the checkpoint's head
(trainer/judging/explain.py), carries the lesion mask through the same crop, pad and resize, and
measures over the fundus:

- heat share: the share of the map's heat that falls inside the lesion mask;
- area share: the share of the fundus the mask covers.

A model that ignored the lesions would have a heat share near the area share; the ratio is
how many times more heat the lesions get than their area. The synthetic lesions lie nearer
the centre of the eye than its rim, so a map that merely favours the centre also scores
above 1x (a fixed centred Gaussian, sd = a sixth of the image: 1.50x on the demo's set).
The baseline that accounts for this scores each photograph's map against the masks of the
other photographs: a map that follows this photograph's lesions beats it, one that only
favours where lesions tend to be does not. The maps are those predict and evaluate draw,
zero outside the fundus circle; the line also gives the share of the heat the unmasked maps
put outside it, and the ratio the unmasked maps scored. Prints the means over the
photographs and the ratios; ``--out`` also writes ``lesion_heat.csv`` (per photograph) and
the overlays.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.cli import arg, parse_config, run_cli
from pipeline.errors import UserError
from pipeline.manifest import read_manifest
from pipeline.shardformat import read_index
from pipeline.writing.preprocess import fundus_circle
from tools.make_synthetic import DRAWN_GRADES, MASKS_DIR
from tools.predict import load_for_model
from trainer.base.metrics import REFERABLE_GRADE
from trainer.judging.options import CAM_LAYER, CAM_TARGET, CAM_TARGETS

# torch and the modules that import it load where used, after the command line is parsed
if TYPE_CHECKING:
    import torch


@dataclass
class HeatConfig:
    checkpoint: Path = arg(help="best.pt written by trainer/train.py", metavar="FILE")
    data: Path = arg(help="make_synthetic --masks output folder", metavar="DIR")
    shards: Path | None = arg(None, "only the photographs in --split of this shard folder")
    split: str = arg("test", "with --shards: the split whose photographs to measure")
    out: Path | None = arg(None, "write lesion_heat.csv and the overlays here", metavar="DIR")
    target: str = arg(CAM_TARGET, "the score the maps explain", choices=CAM_TARGETS)
    layer: str = arg(CAM_LAYER, "the ResNet stage mapped (layer1..layer4)")


@dataclass
class Heat:
    photos: int
    heat_share: float  # mean over photographs
    area_share: float
    others_ratio: float = float("nan")  # each map against other photographs' masks
    outside_share: float = float("nan")  # of the unmasked maps' heat, outside the fundus circle
    unmasked_ratio: float = float("nan")  # the heat-to-area ratio of the unmasked maps

    @property
    def ratio(self) -> float:
        return self.heat_share / self.area_share if self.area_share > 0 else float("nan")


OTHER_SHIFTS = 20  # at most this many other photographs' masks per map


def others_ratio(cams: list, masks: list, fundi: list) -> float:
    """The heat-to-area ratio of each map scored against the lesion masks of other
    photographs (photograph i against i + j, for up to ``OTHER_SHIFTS`` shifts j), averaged
    over the shifts; nan for fewer than two photographs."""
    from trainer.judging.explain import lesion_heat

    n = len(cams)
    ratios = []
    for j in np.unique(np.linspace(1, n - 1, min(OTHER_SHIFTS, n - 1)).round().astype(int)):
        shares = np.array(
            [lesion_heat(cams[i], masks[(i + j) % n] & fundi[i], fundi[i]) for i in range(n)]
        )
        if shares[:, 1].mean() > 0:
            ratios.append(shares[:, 0].mean() / shares[:, 1].mean())
    return float(np.mean(ratios)) if ratios else float("nan")


def referable_pictures(data: Path, keys: set[str] | None = None) -> list[tuple[Path, Path]]:
    """(photo, mask) of every picture drawn with referable disease, in name order."""
    table = data / MASKS_DIR / DRAWN_GRADES
    if not table.is_file():
        raise UserError(f"{data} has no {MASKS_DIR}/{DRAWN_GRADES}; make it with --masks")
    photos = {p.stem: p for p in data.rglob("*.jpeg") if MASKS_DIR not in p.parts}
    with open(table, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["drawn"]) >= REFERABLE_GRADE]
    names = sorted(r["image"] for r in rows if keys is None or r["image"] in keys)
    return [(photos[n], data / MASKS_DIR / f"{n}.png") for n in names if n in photos]


def split_keys(shards: Path, split: str) -> set[str]:
    manifest = read_manifest(shards)
    return {
        ref.key
        for shard in manifest.split(split).shards
        for ref in read_index(manifest.root / shard.index, shard.file)
    }


def measure(
    model: torch.nn.Module,
    info: dict,
    pictures: list[tuple[Path, Path]],
    out: Path | None = None,
    layer: str = CAM_LAYER,
    target: str = CAM_TARGET,
) -> tuple[Heat, list[dict]]:
    """The mean heat and area shares over ``pictures``, and one row per photograph."""
    from trainer.judging.explain import (
        explain_images,
        fundus_of,
        lesion_heat,
        mask_as_model_saw,
        overlay,
    )

    if not pictures:
        raise UserError("no photograph with referable lesions to measure")
    size = int(info["image_size"])
    prep = info.get("preprocess") or {}
    shard_size, graham = int(prep.get("size", size)), bool(prep.get("graham", False))
    images = [load_for_model(photo, shard_size, size, graham) for photo, _ in pictures]
    explained = explain_images(model, info, images, layer=layer, target=target, fundus_only=False)
    circle = fundus_circle(size, size)
    rows, cams, masks, fundi, raw = [], [], [], [], []
    for (photo, mask), (pixels, unmasked) in zip(pictures, explained, strict=True):
        cam = unmasked * circle  # as grad_cam's default draws it (its scale does not matter)
        lesions = mask_as_model_saw(photo, mask, shard_size, size, graham)
        cams.append(cam)
        masks.append(lesions)
        fundi.append(fundus_of(pixels))
        heat, area = lesion_heat(cam, lesions, fundi[-1])
        raw.append(lesion_heat(unmasked, lesions, fundi[-1])[0])
        outside = float(unmasked[~circle].sum() / max(unmasked.sum(), 1e-12))
        rows.append(
            {"image": photo.stem, "heat_share": heat, "area_share": area, "outside": outside}
        )
        if out is not None:
            caption = (
                f"{photo.stem}: {100 * heat:.0f} % of the heat on {100 * area:.0f} % of the fundus"
            )
            overlay(pixels, cam / max(cam.max(), 1e-12), caption).save(out / f"{photo.stem}.png")
    area_share = float(np.mean([r["area_share"] for r in rows]))
    heat = Heat(
        len(rows),
        float(np.mean([r["heat_share"] for r in rows])),
        area_share,
        others_ratio(cams, masks, fundi),
        float(np.mean([r["outside"] for r in rows])),
        float(np.mean(raw)) / area_share if area_share > 0 else float("nan"),
    )
    return heat, rows


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(HeatConfig, argv, prog="lesion_heat.py", description=__doc__.splitlines()[0])
    from trainer.base.bestfile import load_best

    model, info = load_best(cfg.checkpoint)
    keys = split_keys(cfg.shards, cfg.split) if cfg.shards else None
    if cfg.out:
        cfg.out.mkdir(parents=True, exist_ok=True)
    heat, rows = measure(
        model, info, referable_pictures(cfg.data, keys), cfg.out, cfg.layer, cfg.target
    )
    if cfg.out:
        with open(cfg.out / "lesion_heat.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["image", "heat_share", "area_share", "outside"])
            writer.writeheader()
            writer.writerows(rows)
    where = f" ({cfg.split} split of {cfg.shards})" if cfg.shards else ""
    print(
        f"{heat.photos} referable photograph(s){where}: {100 * heat.heat_share:.1f} % of the "
        f"heat inside the lesion masks, which cover {100 * heat.area_share:.1f} % of the fundus "
        f"({heat.ratio:.2f}x their area share; other photographs' masks on the same maps: "
        f"{heat.others_ratio:.2f}x); {cfg.target} maps of {cfg.layer}, zero outside the fundus "
        f"circle (unmasked, {100 * heat.outside_share:.1f} % of their heat lay outside it and "
        f"they scored {heat.unmasked_ratio:.2f}x)"
    )
    return 0


def cli() -> None:
    """The ``dr-lesion-heat`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
