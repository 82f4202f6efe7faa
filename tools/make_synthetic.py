"""Synthetic colour fundus photographs with diabetic-retinopathy lesions that grow with the grade.

    python tools/make_synthetic.py --out data/ --n 200 --image-size 512 --layout lab --seed 0 \
        [--difficulty easy|realistic]

Each picture is a black frame holding an orange-red retina (darker towards the rim), a bright
optic disc (left in a left eye, right in a right eye), a branching vessel tree and, by grade:
1 microaneurysms; 2 also haemorrhages and yellow exudates; 3 more of all and cotton-wool spots;
4 as 3 plus tangles of new vessels (neovascularisation). Lesion sizes scale with the image, so
the grade stays learnable at 64-128 px. Images come in left/right pairs per patient
(`10_left`, `10_right`) whose grades differ by at most one, with the EyePACS class mix.

Layouts (those tools/make_shards.py reads): `lab` writes train/test_img.csv + train/test_label.csv (no
header, split by patient here) and images/<id>.jpeg; `kaggle` writes trainLabels.csv
(`image,level`) and train/<id>.jpeg. `eyepacs`, `aptos`, `messidor2`, `idrid` and `ddr` write the
public datasets' own files with their quirks (see docs/datasets.md): the Kaggle test release
with its Public/Private `Usage`, APTOS PNGs and its unlabeled test.csv, Messidor-2's `2.0`
grades and ungradable rows, IDRiD's trailing-space header, blank rows and names repeated in
both sets, DDR's `valid` split and grade 5. `--width 768 --image-size 512` makes 3:2 raw-camera-like frames
with wide black side borders. 200 images at 256 px take a few seconds on one core.

`--difficulty easy` (the default) is the above, unchanged for a given seed: lesions big and
plentiful enough that colour histograms and spot counts grade it (see the tests), too easy to
show whether a training option helps. `--difficulty realistic` is meant to be hard the way
EyePACS is:

- lesions at their real size: microaneurysms 2.3-3.5 px across in a 512 px high frame
  (scaling with the frame, so sub-pixel smudges at 128 px), haemorrhages and exudates half the
  size of easy's, cotton-wool spots and new vessels two thirds; few lesions in mild disease
  (grade 1: 1-6 microaneurysms, nothing else), counts that overlap between neighbouring grades,
  and each lesion faint by a random amount, fainter in lower grades;
- camera variation: frames 75-100 % of `--size` high, square, 4:3 or 3:2, the eye off-centre
  and sometimes cut at the frame's edge; exposure (gain 0.6-1.4, gamma 0.8-1.25), a colour cast
  per channel, light falling off towards one side, soft dust shadows, half the pictures out of
  focus (Gaussian blur up to 0.4 % of the frame height), sensor noise, JPEG quality 75-95.
  `--width` is refused: the frame is drawn per picture (the shard builder crops the black
  border, pads and resizes, so any frame packs);
- label noise: 10 % of the written labels (seeded) are one grade off the drawn picture. The
  written labels keep the EyePACS class mix, so the pictures have a slightly different one (about
  66/14/14/3/2 %), and since grade 0 outnumbers grade 1 ten to one, about half the pictures
  with grade-1 lesions are labelled 0 (`label_noise`, `draw_labels`);
- the two eyes of a patient share their drawn grade about 90 % of the time (85 % of the
  written labels agree), never more than one grade apart in the picture.

Lesions at their real size only survive training at a real size (512 px). `--lesion-scale K`
draws every lesion K times larger, nothing else changed, for training at a fraction of that:
the demo trains at 128 px on realistic pictures drawn with `--lesion-scale 3`.

`--masks` also writes where the lesions are: `masks/<id>.png` beside each photograph (255
where a lesion was painted) and `masks/drawn_grades.csv`; the pictures are the same with or
without it. `tools/lesion_heat.py` uses them to measure whether a model looks at lesions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.cli import IMAGE_SIZE, arg, parse_config, run_cli
from pipeline.constants import EYEPACS_CLASS_MIX, NUM_CLASSES
from pipeline.errors import UserError
from pipeline.fileio import make_writable_dir
from pipeline.shardformat import patient_of

LAYOUTS = ("lab", "kaggle", "eyepacs", "aptos", "messidor2", "idrid", "ddr")
DIFFICULTIES = ("easy", "realistic")
EYES = ("left", "right")
JPEG_QUALITY = 92
MIN_SIZE = 32
MASKS_DIR = "masks"  # --masks: masks/<id>.png (255 = lesion) and masks/drawn_grades.csv
DRAWN_GRADES = "drawn_grades.csv"
LESION_MASK_LEVEL = 0.1  # share of a lesion's full opacity from which a pixel counts as lesion

# Lesions per image as (low, high) inclusive ranges, one per grade 0-4. Ranges of neighbouring
# grades barely overlap so that the grade can be read off the picture.
LESION_COUNTS = {
    "microaneurysm": ((0, 0), (8, 14), (14, 22), (24, 36), (24, 36)),
    "haemorrhage": ((0, 0), (0, 0), (3, 6), (10, 16), (10, 16)),
    "exudate": ((0, 0), (0, 0), (5, 10), (14, 24), (14, 24)),
    "cotton_wool": ((0, 0), (0, 0), (0, 0), (2, 4), (2, 4)),
    "tangle": ((0, 0), (0, 0), (0, 0), (0, 0), (3, 5)),
    "preretinal": ((0, 0), (0, 0), (0, 0), (0, 0), (1, 2)),
}

# realistic: few lesions in mild disease, and ranges that overlap so that neighbouring grades
# share pictures (a grade 2 with three microaneurysms looks like a grade 1).
REALISTIC_LESION_COUNTS = {
    "microaneurysm": ((0, 0), (1, 6), (3, 14), (8, 24), (6, 24)),
    "haemorrhage": ((0, 0), (0, 0), (0, 4), (4, 14), (2, 14)),
    "exudate": ((0, 0), (0, 0), (0, 10), (0, 18), (0, 18)),
    "cotton_wool": ((0, 0), (0, 0), (0, 1), (0, 3), (0, 3)),
    "tangle": ((0, 0), (0, 0), (0, 0), (0, 0), (1, 3)),
    "preretinal": ((0, 0), (0, 0), (0, 0), (0, 0), (0, 1)),
}


@dataclass(frozen=True)
class Style:
    """How a difficulty draws: lesion counts, lesion sizes (fractions of the frame height, with a
    floor in px), per-lesion opacity per grade (None: opaque), and where the eye sits."""

    counts: dict
    microaneurysm: tuple[float, float]
    haemorrhage: float
    exudate: tuple[float, float]
    cotton_wool: float
    tangle: tuple[float, float]  # radius, step of the new vessel's random walk
    new_vessel: tuple[float, float]
    preretinal: float
    opacity: tuple[tuple[float, float], ...] | None
    retina: tuple[
        float, float, float
    ]  # radius / height: low, high in a square, high in a wide frame
    off_centre: float  # sd of the eye's centre / height


EASY = Style(
    counts=LESION_COUNTS,
    microaneurysm=(0.008, 0.8),
    haemorrhage=0.022,
    exudate=(0.009, 0.6),
    cotton_wool=0.03,
    tangle=(0.07, 0.014),
    new_vessel=(0.0045, 0.6),
    preretinal=0.06,
    opacity=None,
    retina=(0.42, 0.47, 0.53),
    off_centre=0.01,
)
# Microaneurysms about 2.3-3.5 px across at 512 px: real ones are 25-100 um, and a 45-degree
# field (about 12 mm) spans some 450 px of a 512 px photograph.
REALISTIC = Style(
    counts=REALISTIC_LESION_COUNTS,
    microaneurysm=(0.0026, 0.0),
    haemorrhage=0.009,
    exudate=(0.004, 0.0),
    cotton_wool=0.02,
    tangle=(0.045, 0.009),
    new_vessel=(0.003, 0.0),
    preretinal=0.035,
    opacity=((1.0, 1.0), (0.25, 0.6), (0.35, 0.8), (0.45, 0.9), (0.45, 0.9)),
    retina=(0.42, 0.48, 0.56),
    off_centre=0.035,
)
STYLES = {"easy": EASY, "realistic": REALISTIC}


def _scaled(style: Style, factor: float) -> Style:
    """``style`` with every lesion drawn ``factor`` times larger (counts, faintness and the
    camera unchanged): what survives training at a fraction of the photographs' size."""
    return replace(
        style,
        microaneurysm=(style.microaneurysm[0] * factor, style.microaneurysm[1] * factor),
        haemorrhage=style.haemorrhage * factor,
        exudate=(style.exudate[0] * factor, style.exudate[1] * factor),
        cotton_wool=style.cotton_wool * factor,
        tangle=(style.tangle[0] * factor, style.tangle[1] * factor),
        new_vessel=(style.new_vessel[0] * factor, style.new_vessel[1]),
        preretinal=style.preretinal * factor,
    )


# realistic frames: (height / --size) range, and aspect ratios with their shares.
FRAME_HEIGHT = (0.75, 1.0)
FRAME_ASPECTS = ((1.0, 0.4), (4 / 3, 0.3), (3 / 2, 0.3))
LABEL_NOISE = 0.10  # share of realistic labels one grade off the picture
REALISTIC_PAIR_STEPS = (0.15, 0.7, 0.15)  # second eye: one grade down, same, one up (proposal)

RETINA = np.array([200, 92, 42], np.float32)
OPTIC_DISC = np.array([252, 226, 150], np.float32)
VESSEL = np.array([120, 22, 14], np.float32)
RED_LESION = np.array([88, 10, 8], np.float32)
EXUDATE = np.array([246, 222, 92], np.float32)
COTTON_WOOL = np.array([238, 214, 186], np.float32)
FIBROUS = np.array([214, 206, 196], np.float32)


class _Mask:
    """A grey mask drawn `ss` times larger than the image (cheap anti-aliasing), read back in [0, 1]."""

    def __init__(self, h: int, w: int, ss: int):
        self.h, self.w, self.ss = h, w, ss
        self.im = Image.new("L", (w * ss, h * ss), 0)
        self.draw = ImageDraw.Draw(self.im)
        self.empty = True

    def dot(self, x: float, y: float, r: float, value: int = 255) -> None:
        s, r = self.ss, max(r * self.ss, 0.75)
        self.draw.ellipse([x * s - r, y * s - r, x * s + r, y * s + r], fill=value)
        self.empty = False

    def line(self, points: Sequence[tuple[float, float]], width: float, value: int = 255) -> None:
        s = self.ss
        scaled = [(x * s, y * s) for x, y in points]
        self.draw.line(scaled, fill=value, width=max(1, round(width * s)), joint="curve")
        self.empty = False

    def polygon(self, points: np.ndarray, value: int = 255) -> None:
        pts = [(float(x) * self.ss, float(y) * self.ss) for x, y in points]
        self.draw.polygon(pts, fill=value)
        self.empty = False

    def array(self, blur: float = 0.0) -> np.ndarray | None:
        """The mask at image size, blurred by `blur` px; None when nothing was drawn."""
        if self.empty:
            return None
        im = self.im.resize((self.w, self.h), Image.Resampling.BOX) if self.ss > 1 else self.im
        if blur > 0:
            im = im.filter(ImageFilter.GaussianBlur(blur))
        return np.asarray(im, np.float32) / 255.0


def _blend(img: np.ndarray, mask: np.ndarray | None, colour: np.ndarray, strength: float) -> None:
    """Paint `colour` over `img` in place with opacity `mask * strength`."""
    if mask is not None:
        img += (mask * strength)[..., None] * (colour - img)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled bicubically."""
    grid = rng.normal(0.0, 1.0, (cells, cells)).astype(np.float32)
    im = Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(im) / 1.5


def _random_points(rng, n, cx, cy, radius, avoid, avoid_r) -> np.ndarray:
    """n points spread uniformly over the disc of `radius`, none within `avoid_r` of `avoid`."""
    if n == 0:
        return np.zeros((0, 2))
    m = 4 * n + 16
    r = radius * np.sqrt(rng.random(m))
    t = rng.random(m) * 2 * math.pi
    pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    keep = np.hypot(pts[:, 0] - avoid[0], pts[:, 1] - avoid[1]) > avoid_r
    return pts[keep][:n]


def _count(rng: np.random.Generator, style: Style, kind: str, grade: int) -> int:
    low, high = style.counts[kind][grade]
    return int(rng.integers(low, high + 1))


def _opacity(rng: np.random.Generator, style: Style, grade: int) -> int:
    """A lesion's mask value; easy draws nothing here, so its random stream is as it always was."""
    if style.opacity is None:
        return 255
    return round(255 * rng.uniform(*style.opacity[grade]))


def _vessel_tree(mask: _Mask, rng, disc, radius_px, centre, retina_r, size, side) -> None:
    """Four arcades out of the optic disc, random-walking and branching, thinner at each branch."""
    cx, cy = centre
    step = 0.035 * retina_r
    # (start angle, bend per step) with y pointing down, for an optic disc on the left.
    arcades = [(-1.05, 0.085), (1.05, -0.085), (-2.5, -0.03), (2.5, 0.03)]
    stack = []
    for angle, bend in arcades:
        if side > 0:  # mirror for an optic disc on the right
            angle, bend = math.pi - angle, -bend
        x = disc[0] + 0.05 * radius_px * math.cos(angle)
        y = disc[1] + 0.05 * radius_px * math.sin(angle)
        stack.append((x, y, angle + rng.normal(0, 0.1), 0.013 * size, bend))
    min_width = 0.0035 * size
    segments = 0
    while stack and segments < 900:
        x, y, angle, width, bend = stack.pop()
        points = [(x, y)]
        for _ in range(60):
            bend *= 0.97  # arcades straighten out instead of curling up
            angle += bend + rng.normal(0, 0.12)
            x, y = x + step * math.cos(angle), y + step * math.sin(angle)
            points.append((x, y))
            segments += 1
            if math.hypot(x - cx, y - cy) > 0.98 * retina_r:
                break
            if rng.random() < 0.16 and width > min_width:
                turn = rng.choice((-1.0, 1.0)) * rng.uniform(0.45, 1.0)
                stack.append((x, y, angle + turn, width * 0.62, rng.normal(0, 0.05)))
                stack.append((x, y, angle, width * 0.85, bend))
                break
        mask.line(points, width)


def _lesions(rng, style, grade, size, centre, retina_r, disc, disc_r, macula, shape, ss):
    """Masks (sharp red, blotchy red, exudate, cotton wool, fibrous) for the grade's lesions."""
    red, blot, yellow, cotton, fibrous = (_Mask(*shape, ss) for _ in range(5))
    cx, cy = centre
    spread = 0.86 * retina_r
    ma_size, ma_floor = style.microaneurysm

    for x, y in _random_points(
        rng, _count(rng, style, "microaneurysm", grade), cx, cy, spread, disc, 1.4 * disc_r
    ):
        r = max(ma_floor, ma_size * size) * rng.uniform(0.85, 1.3)
        red.dot(x, y, r, _opacity(rng, style, grade))

    for x, y in _random_points(
        rng, _count(rng, style, "haemorrhage", grade), cx, cy, spread, disc, 1.6 * disc_r
    ):
        r = style.haemorrhage * size * rng.uniform(0.8, 1.6)
        k = 11
        t = np.linspace(0, 2 * math.pi, k, endpoint=False) + rng.random()
        stretch = rng.uniform(1.0, 2.2)  # some blot, some flame-shaped
        rr = r * (1 + 0.25 * rng.normal(size=k)).clip(0.5, 1.5)
        px, py = rr * np.cos(t) * stretch, rr * np.sin(t)
        rot = rng.random() * math.pi
        poly = np.stack(
            [
                x + px * math.cos(rot) - py * math.sin(rot),
                y + px * math.sin(rot) + py * math.cos(rot),
            ],
            1,
        )
        blot.polygon(poly, _opacity(rng, style, grade))

    n_exudates = _count(rng, style, "exudate", grade)
    if n_exudates:
        # Hard exudates gather in clusters, often in a ring around the macula.
        n_clusters = 1 + n_exudates // 8
        ang = rng.random(n_clusters) * 2 * math.pi
        dist = retina_r * rng.uniform(0.15, 0.45, n_clusters)
        heads = np.stack([macula[0] + dist * np.cos(ang), macula[1] + dist * np.sin(ang)], 1)
        which = rng.integers(0, n_clusters, n_exudates)
        offs = rng.normal(0, 0.07 * retina_r, (n_exudates, 2))
        for x, y in heads[which] + offs:
            if (
                math.hypot(x - cx, y - cy) < spread
                and math.hypot(x - disc[0], y - disc[1]) > 1.4 * disc_r
            ):
                r = max(style.exudate[1], style.exudate[0] * size) * rng.uniform(0.8, 1.7)
                yellow.dot(x, y, r, _opacity(rng, style, grade))

    for x, y in _random_points(
        rng, _count(rng, style, "cotton_wool", grade), cx, cy, 0.7 * retina_r, disc, 2 * disc_r
    ):
        r = style.cotton_wool * size * rng.uniform(0.8, 1.3)
        cotton.dot(x, y, r, _opacity(rng, style, grade))

    n_tangles = _count(rng, style, "tangle", grade)
    if n_tangles:
        # New vessels: one at the optic disc (NVD), the rest elsewhere (NVE).
        heads = _random_points(rng, n_tangles - 1, cx, cy, 0.75 * retina_r, disc, 2 * disc_r)
        a = rng.random() * 2 * math.pi
        nvd = (disc[0] + 1.1 * disc_r * math.cos(a), disc[1] + 1.1 * disc_r * math.sin(a))
        for hx, hy in [nvd, *heads]:
            tangle_r = style.tangle[0] * size * rng.uniform(0.9, 1.3)
            value = _opacity(rng, style, grade)
            # the grey-white membrane new vessels grow on
            fibrous.dot(hx, hy, 1.2 * tangle_r, value)
            x, y, angle = hx, hy, rng.random() * 2 * math.pi
            points = [(x, y)]
            for _ in range(100):
                if math.hypot(x - hx, y - hy) > tangle_r:  # turn back into the tangle
                    angle = math.atan2(hy - y, hx - x) + rng.normal(0, 0.6)
                else:
                    angle += rng.normal(0, 1.0)
                step = style.tangle[1] * size
                x, y = x + step * math.cos(angle), y + step * math.sin(angle)
                points.append((x, y))
            width, floor = style.new_vessel
            red.line(points, max(floor, width * size), value)

    # Proliferative disease also bleeds in front of the retina: large boat-shaped pools.
    for x, y in _random_points(
        rng, _count(rng, style, "preretinal", grade), cx, cy, 0.6 * retina_r, disc, 2 * disc_r
    ):
        r = style.preretinal * size * rng.uniform(0.9, 1.2)
        t = np.linspace(0, math.pi, 13)  # a flat top (blood settles) over a half-ellipse
        pool = np.stack([x + 1.5 * r * np.cos(t), y + r * np.sin(t)], 1)
        blot.polygon(pool, _opacity(rng, style, grade))
    return (
        red.array(),
        blot.array(blur=0.004 * size),
        yellow.array(blur=0.002 * size),
        cotton.array(blur=0.012 * size),
        fibrous.array(blur=0.02 * size),
    )


def _frame(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """A realistic frame (height, width): at most `size` high, square or wider."""
    h = round(size * rng.uniform(*FRAME_HEIGHT))
    aspects, shares = zip(*FRAME_ASPECTS, strict=True)
    return h, round(h * aspects[rng.choice(len(aspects), p=shares)])


def render_fundus(
    grade: int,
    rng: np.random.Generator,
    size: int = 512,
    eye: str = "left",
    *,
    width: int | None = None,
    difficulty: str = "easy",
    lesion_scale: float = 1.0,
) -> np.ndarray:
    """One synthetic fundus photograph of `grade` as an (H, W, 3) uint8 RGB array.

    easy: H = size, W = width or size. realistic: the frame is drawn (H <= size, W >= H, `width`
    must be None) and the photograph goes through `_camera`.
    """
    return render_fundus_with_mask(
        grade, rng, size, eye, width=width, difficulty=difficulty, lesion_scale=lesion_scale
    )[0]


def render_fundus_with_mask(
    grade: int,
    rng: np.random.Generator,
    size: int = 512,
    eye: str = "left",
    *,
    width: int | None = None,
    difficulty: str = "easy",
    lesion_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """`render_fundus`'s photograph (the same pixels for the same rng) and its lesion mask:
    (H, W) bool, true where any lesion was painted (`LESION_MASK_LEVEL` of full opacity or
    more, after the lesion's own blur)."""
    if not 0 <= grade < NUM_CLASSES:
        raise ValueError(f"grade must be 0-{NUM_CLASSES - 1}, got {grade}")
    if eye not in EYES:
        raise ValueError(f"eye must be one of {EYES}, got {eye!r}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    if difficulty == "realistic" and width is not None:
        raise ValueError("a realistic picture draws its own frame: pass no width")
    style = STYLES[difficulty] if lesion_scale == 1.0 else _scaled(STYLES[difficulty], lesion_scale)
    h, w = _frame(rng, size) if difficulty == "realistic" else (size, width or size)
    if w < h:
        raise ValueError(f"width ({w}) must be at least size ({h})")
    size = h  # lesions and vessels scale with the frame

    # Geometry: the retina leaves a black border in a square frame; in a wide frame it may be
    # cut at top and bottom like raw camera photos, with wide black borders at the sides.
    low_r, square_r, wide_r = style.retina
    retina_r = size * rng.uniform(low_r, square_r if w == h else wide_r)
    cx = w / 2 + rng.normal(0, style.off_centre * size)
    cy = h / 2 + rng.normal(0, style.off_centre * size)
    side = -1 if eye == "left" else 1
    disc = (cx + side * retina_r * rng.uniform(0.38, 0.48), cy + rng.normal(0, 0.05 * retina_r))
    disc_r = retina_r * rng.uniform(0.11, 0.13)
    macula = (cx - side * retina_r * 0.05, cy + rng.normal(0, 0.03 * retina_r))

    yy, xx = np.ogrid[0:h, 0:w]
    xx = xx.astype(np.float32)
    yy = yy.astype(np.float32)
    r = np.hypot(xx - cx, yy - cy) / retina_r

    # Background: tinted retina, vignetting, low-frequency texture, a darker macula.
    tint = RETINA * rng.uniform(0.8, 1.12) * rng.uniform(0.92, 1.08, 3).astype(np.float32)
    shade = np.clip(1.0 - 0.55 * r**2.5, 0.0, 1.0)
    shade *= 1.0 + 0.07 * _smooth_noise(rng, h, w, 7)
    d_mac = np.hypot(xx - macula[0], yy - macula[1]) / (0.16 * retina_r)
    shade *= 1.0 - 0.3 * np.exp(-(d_mac**2))
    img = shade[..., None] * tint

    # Optic disc: a bright flat-topped spot in a faint glow, painted only in a window around it.
    y0, y1 = max(0, int(disc[1] - 5 * disc_r)), min(h, int(disc[1] + 5 * disc_r) + 1)
    x0, x1 = max(0, int(disc[0] - 5 * disc_r)), min(w, int(disc[0] + 5 * disc_r) + 1)
    d = np.hypot(xx[:, x0:x1] - disc[0], yy[y0:y1] - disc[1]) / disc_r
    glow = np.maximum(np.exp(-(d**4)), 0.25 * np.exp(-((d / 2.2) ** 2)))
    _blend(img[y0:y1, x0:x1], glow, OPTIC_DISC * rng.uniform(0.9, 1.0), 0.95)

    ss = 2 if size <= 256 else 1  # supersample the masks of small images
    vessels = _Mask(h, w, ss)
    _vessel_tree(vessels, rng, disc, disc_r, (cx, cy), retina_r, size, side)
    _blend(img, vessels.array(), VESSEL, 0.8)

    red, blot, yellow, cotton, fibrous = _lesions(
        rng, style, grade, size, (cx, cy), retina_r, disc, disc_r, macula, (h, w), ss
    )
    _blend(img, fibrous, FIBROUS, 0.55)
    _blend(img, cotton, COTTON_WOOL, 0.8)
    _blend(img, blot, RED_LESION, 0.9)
    _blend(img, red, RED_LESION, 0.9)
    _blend(img, yellow, EXUDATE, 0.95)
    painted = [m for m in (red, blot, yellow, cotton, fibrous) if m is not None]
    lesions = np.zeros((h, w), bool)
    for m in painted:
        lesions |= m >= LESION_MASK_LEVEL

    if difficulty == "realistic":
        img = _camera(img, rng, xx, yy, (cx, cy), retina_r)
    else:
        img += rng.normal(0.0, 2.0, (h, w, 1)).astype(np.float32)  # sensor noise
    edge = np.clip((1.0 - r) * retina_r / 1.5, 0.0, 1.0)  # anti-aliased rim, black outside
    img *= edge[..., None]
    return np.clip(img, 0, 255).astype(np.uint8), lesions & (edge > 0.5)


def _camera(img, rng, xx, yy, centre, retina_r) -> np.ndarray:
    """What cameras and photographers vary: uneven light, exposure, colour, dust, focus, noise."""
    h, w, _ = img.shape
    # light falling off towards one side of the pupil
    angle = rng.uniform(0, 2 * math.pi)
    along = ((xx - centre[0]) * math.cos(angle) + (yy - centre[1]) * math.sin(angle)) / retina_r
    img = img * (1.0 + rng.uniform(0.0, 0.3) * along)[..., None]
    # exposure (log-uniform gain), gamma and a colour cast of the whole picture
    gain = math.exp(rng.uniform(math.log(0.6), math.log(1.4)))
    cast = rng.normal(1.0, (0.06, 0.1, 0.18)).clip(0.6, 1.4).astype(np.float32)
    img = 255.0 * (np.clip(img * gain, 0, 255) / 255.0) ** rng.uniform(0.8, 1.25) * cast
    # dust on the lens: soft dark blotches, a few microaneurysms across
    dust = _Mask(h, w, 1)
    for _ in range(int(rng.integers(0, 3))):
        x, y = centre + rng.normal(0, 0.4 * retina_r, 2)
        dust.dot(x, y, 0.015 * h * rng.uniform(0.6, 1.4), round(255 * rng.uniform(0.1, 0.3)))
    _blend(img, dust.array(blur=0.01 * h), np.zeros(3, np.float32), 1.0)
    if rng.random() < 0.5:  # half the photographs are a little out of focus
        sigma = 0.004 * h * rng.uniform(0.3, 1.0)
        blurred = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        img = np.asarray(blurred.filter(ImageFilter.GaussianBlur(sigma)), np.float32)
    return img + rng.normal(0.0, rng.uniform(1.5, 5.0), (h, w, 3)).astype(np.float32)


def draw_grades(
    n: int,
    class_mix: Sequence[float],
    rng: np.random.Generator,
    steps: tuple[float, float, float] = (0.3, 0.4, 0.3),
) -> list[int]:
    """Grades for images `1_left, 1_right, 2_left, ...`: the eyes of a patient differ by at most 1.

    `steps`: how often the second eye is proposed one grade lower, the same, one higher.
    With n >= 20 every grade appears at least twice (five patients get one grade each, both eyes).
    """
    p = np.asarray(class_mix, np.float64)
    p = p / p.sum()
    n_patients = (n + 1) // 2
    left = rng.choice(NUM_CLASSES, size=n_patients, p=p)
    # The other eye: a Metropolis step of +-1 from the first, which keeps the class mix exact.
    proposal = left + rng.choice((-1, 0, 1), size=n_patients, p=steps)
    valid = (proposal >= 0) & (proposal < NUM_CLASSES)
    proposal = np.where(valid, proposal, left)
    accept = rng.random(n_patients) < np.minimum(1.0, p[proposal] / p[left])
    right = np.where(valid & accept, proposal, left)
    if n >= 4 * NUM_CLASSES:
        forced = rng.permutation(n // 2)[:NUM_CLASSES]  # patients with both eyes present
        left[forced] = right[forced] = np.arange(NUM_CLASSES)
    return [int(g) for g in np.stack([left, right], 1).ravel()[:n]]


def label_noise(
    class_mix: Sequence[float], rate: float = LABEL_NOISE
) -> tuple[np.ndarray, np.ndarray]:
    """(picture mix, P[written | drawn]) such that written labels follow `class_mix` exactly and
    a share `rate` of them is one grade off the picture (either way inside the scale)."""
    p = np.asarray(class_mix, np.float64)
    p = p / p.sum()
    off = np.zeros((NUM_CLASSES, NUM_CLASSES))  # P[drawn | written]
    for g in range(NUM_CLASSES):
        near = [x for x in (g - 1, g + 1) if 0 <= x < NUM_CLASSES]
        off[g, near] = rate / len(near)
        off[g, g] = 1.0 - rate
    joint = p[:, None] * off  # [written, drawn]
    picture_mix = joint.sum(0)
    given = np.divide(joint, picture_mix, out=np.zeros_like(joint), where=picture_mix > 0)
    return picture_mix, given.T


def draw_labels(
    n: int, class_mix: Sequence[float], rng: np.random.Generator, difficulty: str = "easy"
) -> tuple[list[int], list[int]]:
    """(drawn, written) grades for images `1_left, 1_right, ...`: what each picture shows, and
    its label. easy: the same, from `draw_grades`. realistic: the eyes of a patient share their
    drawn grade most of the time, and `LABEL_NOISE` of the labels are one grade off it.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    if difficulty == "easy":
        grades = draw_grades(n, class_mix, rng)
        return grades, list(grades)
    picture_mix, written_given = label_noise(class_mix)
    drawn = draw_grades(n, picture_mix, rng, REALISTIC_PAIR_STEPS)
    cumulative = written_given[drawn].cumsum(1)
    written = (rng.random((n, 1)) > cumulative[:, :-1]).sum(1)
    return drawn, [int(g) for g in written]


def image_ids(n: int) -> list[str]:
    """EyePACS-style ids in pairs: 1_left, 1_right, 2_left, ..."""
    return [f"{i // 2 + 1}_{EYES[i % 2]}" for i in range(n)]


def split_patients(items: Sequence[tuple[str, int]], test_fraction: float, rng) -> set[str]:
    """Test patients: about `test_fraction` of them, spread evenly over the worst-eye grades."""
    worst: dict[str, int] = {}
    for image_id, grade in items:
        p = patient_of(image_id)
        worst[p] = max(worst.get(p, 0), grade)
    patients = list(worst)
    n_test = round(test_fraction * len(patients))
    if test_fraction > 0 and len(patients) >= 2:
        n_test = min(max(n_test, 1), len(patients) - 1)
    if n_test == 0:
        return set()
    order = sorted(range(len(patients)), key=lambda i: (worst[patients[i]], rng.random()))
    picks = ((np.arange(n_test) + rng.random()) * len(patients) / n_test).astype(int)
    return {patients[order[i]] for i in picks}


def _check_options(n, size, layout, width, class_mix, test_fraction, difficulty) -> None:
    if n < 2:
        raise UserError(f"--n must be at least 2 (one left/right pair), got {n}")
    if size < MIN_SIZE:
        raise UserError(f"--image-size must be at least {MIN_SIZE} px, got {size}")
    if layout not in LAYOUTS:
        raise UserError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if width is not None and width < size:
        raise UserError(f"--width ({width}) must be at least --image-size ({size})")
    if difficulty not in DIFFICULTIES:
        raise UserError(
            f"--difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}"
        )
    if difficulty == "realistic" and width is not None:
        raise UserError("--width is for --difficulty easy: realistic draws a frame per picture")
    if len(class_mix) != NUM_CLASSES or min(class_mix) < 0 or sum(class_mix) <= 0:
        raise UserError(f"class_mix must be {NUM_CLASSES} non-negative weights, got {class_mix}")
    if not 0 <= test_fraction < 1:
        raise UserError(f"--test-fraction must be in [0, 1), got {test_fraction}")


def _writable_dir(path: Path) -> Path:
    try:
        make_writable_dir(path)
    except OSError as err:
        raise UserError(f"cannot write to {path}: {err.strerror or err}") from None
    return path


def _write_lines(path: Path, values) -> None:
    path.write_text("".join(f"{v}\n" for v in values))


def generate(
    out_dir,
    n: int = 200,
    size: int = 512,
    layout: str = "lab",
    seed: int = 0,
    class_mix=EYEPACS_CLASS_MIX,
    test_fraction: float = 0.2,
    width: int | None = None,
    *,
    difficulty: str = "easy",
    lesion_scale: float = 1.0,
    masks: bool = False,
    progress: bool = False,
) -> list[tuple[str, int]]:
    """Write n synthetic fundus JPEGs and their labels in `layout`; return (image_id, label) for all.

    `masks`: also each photograph's lesion mask, `masks/<id>.png` (L, 255 = lesion, the
    photograph's size), and `masks/drawn_grades.csv` (`image,drawn`: the grade the picture
    shows, which realistic label noise can make differ from its label)."""
    _check_options(n, size, layout, width, class_mix, test_fraction, difficulty)
    out = Path(out_dir)
    _writable_dir(out)
    ids = image_ids(n)
    drawn, written = draw_labels(n, class_mix, np.random.default_rng([seed, 0]), difficulty)
    items = list(zip(ids, written, strict=True))
    if layout in PUBLIC_LAYOUTS:
        files = PUBLIC_LAYOUTS[layout](out, items, test_fraction, np.random.default_rng([seed, 3]))
    else:
        folder = "train" if layout == "kaggle" else "images"
        files = [f"{folder}/{image_id}.jpeg" for image_id in ids]
    jobs = list(enumerate(zip(ids, drawn, strict=True)))
    if progress:
        from rich.progress import track

        jobs = track(jobs, description=f"rendering {n} images", transient=True)
    for i, (image_id, grade) in jobs:
        eye = image_id.rsplit("_", 1)[1]
        rng = np.random.default_rng([seed, 1, i])
        pixels, lesions = render_fundus_with_mask(
            grade, rng, size, eye, width=width, difficulty=difficulty, lesion_scale=lesion_scale
        )
        quality = JPEG_QUALITY if difficulty == "easy" else int(rng.integers(75, 96))
        path = out / files[i]
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".png":
            Image.fromarray(pixels).save(path, "PNG")
        else:
            Image.fromarray(pixels).save(path, "JPEG", quality=quality)
        if masks:
            mask_dir = _writable_dir(out / MASKS_DIR)
            Image.fromarray(lesions.astype(np.uint8) * 255).save(mask_dir / f"{image_id}.png")
    if masks:
        _write_lines(
            out / MASKS_DIR / DRAWN_GRADES,
            ["image,drawn", *(f"{i},{g}" for i, g in zip(ids, drawn, strict=True))],
        )

    if layout in PUBLIC_LAYOUTS:
        pass
    elif layout == "kaggle":
        _write_lines(out / "trainLabels.csv", ["image,level", *(f"{i},{g}" for i, g in items)])
    else:
        test = split_patients(items, test_fraction, np.random.default_rng([seed, 2]))
        for split in ("train", "test"):
            rows = [(i, g) for i, g in items if (patient_of(i) in test) == (split == "test")]
            _write_lines(out / f"{split}_img.csv", [i for i, _ in rows])
            _write_lines(out / f"{split}_label.csv", [g for _, g in rows])
    return items


# ---------------------------------------------------------------- the public datasets' layouts
# Each writes the label files of one public dataset as distributed (names, headers, quirks)
# and returns where each of the n pictures goes, relative to the data folder.


def _write_rows(path: Path, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{r}\n" for r in rows))


def _eyepacs(out: Path, items, test_fraction: float, rng) -> list[str]:
    """trainLabels.csv + train/; the test release: retinopathy_solution.csv (image,level,Usage,
    about a fifth of the test patients Public, the rest Private, as 10,906 / 42,670) + test/."""
    test = split_patients(items, test_fraction, rng)
    public = {p for p in sorted(test) if rng.random() < 0.2} or set(sorted(test)[:1])
    train = [(i, g) for i, g in items if patient_of(i) not in test]
    solution = [(i, g) for i, g in items if patient_of(i) in test]
    _write_rows(out / "trainLabels.csv", ["image,level", *(f"{i},{g}" for i, g in train)])
    usage = {True: "Public", False: "Private"}
    _write_rows(
        out / "retinopathy_solution.csv",
        ["image,level,Usage", *(f"{i},{g},{usage[patient_of(i) in public]}" for i, g in solution)],
    )
    return [f"{'test' if patient_of(i) in test else 'train'}/{i}.jpeg" for i, _ in items]


def _aptos(out: Path, items, test_fraction: float, rng) -> list[str]:
    """train.csv (id_code,diagnosis) + train_images/<id>.png; test.csv (id_code only) + test_images/."""
    codes = [f"{rng.integers(1 << 48):012x}" for _ in items]
    n_test = int(round(test_fraction * len(items)))
    _write_rows(
        out / "train.csv",
        [
            "id_code,diagnosis",
            *(f"{c},{g}" for c, (_, g) in zip(codes[n_test:], items[n_test:], strict=True)),
        ],
    )
    _write_rows(out / "test.csv", ["id_code", *codes[:n_test]])
    return [f"{'test' if k < n_test else 'train'}_images/{c}.png" for k, c in enumerate(codes)]


def _messidor2(out: Path, items, test_fraction: float, rng) -> list[str]:
    """messidor_data.csv (image_id with its extension, adjudicated_dr_grade, adjudicated_dme,
    adjudicated_gradable) as pandas writes it: grades 2.0, an empty grade on ungradable rows
    (one in eight); images in IMAGES/, Messidor's .png and Brest's upper-case .JPG."""
    names = [
        f"20051020_{43808 + k:05d}_0100_PP.png" if k % 2 == 0 else f"IM{k:06d}.JPG"
        for k in range(len(items))
    ]
    rows = ["image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable"]
    for k, (name, (_, grade)) in enumerate(zip(names, items, strict=True)):
        ungradable = k % 8 == 5
        rows.append(f"{name},,,0" if ungradable else f"{name},{float(grade)},0.0,1")
    _write_rows(out / "messidor_data.csv", rows)
    return [f"IMAGES/{name}" for name in names]


IDRID = "B. Disease Grading"
IDRID_SETS = (
    ("a. Training Set", "a. IDRiD_Disease Grading_Training Labels.csv"),
    ("b. Testing Set", "b. IDRiD_Disease Grading_Testing Labels.csv"),
)


def _idrid(out: Path, items, test_fraction: float, rng) -> list[str]:
    """The two sets numbered from IDRiD_001 each (the same names in both), their label CSVs
    with the header's trailing spaces and the empty rows that end them."""
    n_test = max(1, int(round(test_fraction * len(items))))
    parts = (items[n_test:], items[:n_test])
    files = []
    for (folder, labels), part in zip(IDRID_SETS, parts, strict=True):
        rows = ["Image name,Retinopathy grade ,Risk of macular edema "]
        rows += [f"IDRiD_{k + 1:03d},{g},0" for k, (_, g) in enumerate(part)]
        _write_rows(out / IDRID / "2. Groundtruths" / labels, [*rows, ",,", ",,", ""])
        files += [
            f"{IDRID}/1. Original Images/{folder}/IDRiD_{k + 1:03d}.jpg" for k in range(len(part))
        ]
    test_files, train_files = files[len(parts[0]) :], files[: len(parts[0])]
    return test_files + train_files  # in the order of items: test first


def _ddr(out: Path, items, test_fraction: float, rng) -> list[str]:
    """DR_grading/{train,valid,test}/ and {train,valid,test}.txt (``name grade``), about
    50/20/30 like DDR; one image in ten graded 5 (ungradable)."""
    n = len(items)
    n_test, n_valid = max(1, int(round(test_fraction * n))), max(1, int(round(0.2 * n)))
    splits = ["test"] * n_test + ["valid"] * n_valid + ["train"] * (n - n_test - n_valid)
    names = [f"{7 + k // 50:03d}-{k:04d}-000.jpg" for k in range(n)]
    rows: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for k, (name, split, (_, grade)) in enumerate(zip(names, splits, items, strict=True)):
        rows[split].append(f"{name} {5 if k % 10 == 3 else grade}")
    for split, lines in rows.items():
        _write_rows(out / "DR_grading" / f"{split}.txt", lines)
    return [f"DR_grading/{split}/{name}" for name, split in zip(names, splits, strict=True)]


PUBLIC_LAYOUTS = {
    "eyepacs": _eyepacs,
    "aptos": _aptos,
    "messidor2": _messidor2,
    "idrid": _idrid,
    "ddr": _ddr,
}


@dataclass
class SynthConfig:
    out: Path = arg(help="folder to write the images and label files into (created)", metavar="DIR")
    n: int = arg(200, "number of images")
    size: int = arg(512, "image height in px (realistic: the largest)", **IMAGE_SIZE)
    width: int | None = arg(None, "image width in px (default: square)")
    layout: str = arg("lab", "label files to write", choices=LAYOUTS)
    seed: int = arg(0, "seed of the grades and the pictures")
    test_fraction: float = arg(0.2, "share of the pictures in the layout's test set")
    difficulty: str = arg(
        "easy",
        "easy: big, plentiful lesions; realistic: EyePACS-like tiny faint lesions, camera "
        "variation, 10%% label noise",
        choices=DIFFICULTIES,
    )
    lesion_scale: float = arg(
        1.0,
        "draw lesions this many times larger than life, so that they survive training at a "
        "fraction of the photographs' size (the demo trains at 128 px what EyePACS trains at 512)",
    )
    masks: bool = arg(
        False,
        "also write each photograph's lesion mask (masks/<id>.png, 255 = lesion) and the "
        "grade each picture shows (masks/drawn_grades.csv), for checking where a model looks",
    )

    def __post_init__(self):
        if not 0.25 <= self.lesion_scale <= 8:
            raise UserError(f"--lesion-scale must be between 0.25 and 8, got {self.lesion_scale}")


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(
        SynthConfig, argv, prog="make_synthetic.py", description=__doc__.splitlines()[0]
    )
    items = generate(
        cfg.out,
        n=cfg.n,
        size=cfg.size,
        layout=cfg.layout,
        seed=cfg.seed,
        test_fraction=cfg.test_fraction,
        width=cfg.width,
        difficulty=cfg.difficulty,
        lesion_scale=cfg.lesion_scale,
        masks=cfg.masks,
        progress=True,
    )
    counts = np.bincount([g for _, g in items], minlength=NUM_CLASSES)
    per_grade = ", ".join(f"{g}: {c}" for g, c in enumerate(counts))
    what = f"{cfg.width or cfg.size}x{cfg.size} images"
    if cfg.difficulty == "realistic":
        what = f"realistic images (frames up to {cfg.size} px high)"
    print(
        f"wrote {len(items)} {what} (per grade {per_grade}) to {os.fspath(cfg.out)} ({cfg.layout} layout)"
    )
    return 0


def cli() -> None:
    """The ``dr-make-synthetic`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
