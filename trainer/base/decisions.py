"""What val decides, as one type: ``Decisions``.

The choosing split (val; test without one) decides five things, fitted once per epoch by
``trainer/judging/deciding.py`` and applied unchanged to every split's result; the best
epoch's are saved into best.pt and read back from it (``from_best``) by evaluate, predict,
fuse and the report alike:

- ``cut_points``: the regress head's four score boundaries between the grades (fixed
  0.5/1.5/2.5/3.5 on a small val split unless ``--tune-cuts``; None for the other heads);
- ``temperature``: classify/ordinal outputs are divided by it before the softmax/sigmoid
  (None for the regress head, or a checkpoint older than calibration);
- ``pair_blend``: the weight of an eye's partner when both eyes are blended (0: alone);
- ``pair_cut_points``: the regress head's cut-points for blended scores (None: ``cut_points``);
- ``referable_threshold``: the calibrated P(grade >= 2) at or above which an eye is
  referred (the operating point; None when val had no positives or no negatives).

In metrics.jsonl and best.pt they are stored under these names, lists for the cut-points.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

from pipeline.errors import UserError

MAX_BLEND = 0.4  # the partner's most: the own eye keeps >= 60 % and its own grade
KEYS = ("cut_points", "temperature", "pair_blend", "pair_cut_points", "referable_threshold")


@dataclass(frozen=True, kw_only=True)
class Decisions:
    cut_points: tuple[float, ...] | None = None
    temperature: float | None = None
    pair_blend: float = 0.0
    pair_cut_points: tuple[float, ...] | None = None
    referable_threshold: float | None = None

    @property
    def blend_cuts(self) -> tuple[float, ...] | None:
        """The cut-points that go with blended scores."""
        return self.pair_cut_points or self.cut_points

    def to_dict(self) -> dict:
        """The five values under their stored names (cut-points as lists, as in JSON)."""
        stored = asdict(self)
        for key in ("cut_points", "pair_cut_points"):
            stored[key] = list(stored[key]) if stored[key] else None
        return stored

    @classmethod
    def from_dict(cls, stored: dict, where: str) -> Decisions:
        """The decisions stored in ``stored`` (a best.pt or a metrics line), each checked:
        a damaged or hand-edited value is one line naming ``where``, never a wrong grade."""
        blend = stored.get("pair_blend")
        return cls(
            cut_points=_cuts(stored.get("cut_points"), "cut_points", where),
            temperature=_positive(stored.get("temperature"), "temperature", where),
            pair_blend=own_eye_first(
                _in_range(0.0 if blend is None else blend, "pair_blend", where)
            ),
            pair_cut_points=_cuts(stored.get("pair_cut_points"), "pair_cut_points", where),
            referable_threshold=_optional_number(
                stored.get("referable_threshold"), "referable_threshold", where
            ),
        )


def own_eye_first(weight: float) -> float:
    """A stored partner weight as this version applies it: one above ``MAX_BLEND`` (an older
    version searched up to 0.5, where both eyes got one grade) is clipped, with a warning."""
    if weight <= MAX_BLEND + 1e-9:
        return weight
    print(
        f"warning: the checkpoint's both-eyes weight {weight:.2f} gives the partner eye "
        f"{100 * weight:.0f} % of each eye's outputs; used {MAX_BLEND:.2f}, so that each "
        "eye keeps at least 60 % of its own",
        file=sys.stderr,
    )
    return MAX_BLEND


def _number(value, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{where}: {name} must be a finite number, not {value!r}")
    return float(value)


def _positive(value, name: str, where: str) -> float | None:
    if value is None:
        return None
    if _number(value, name, where) <= 0:
        raise UserError(f"{where}: {name} must be positive, not {value!r}")
    return float(value)


def _in_range(value, name: str, where: str) -> float:
    if not 0.0 <= _number(value, name, where) <= 1.0:
        raise UserError(f"{where}: {name} must lie between 0 and 1, not {value!r}")
    return float(value)


def _optional_number(value, name: str, where: str) -> float | None:
    return None if value is None else _number(value, name, where)


def _cuts(value, name: str, where: str) -> tuple[float, ...] | None:
    if not value:
        return None
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise UserError(f"{where}: {name} must be four numbers, not {value!r}")
    cuts = tuple(_number(v, name, where) for v in value)
    if any(b <= a for a, b in zip(cuts, cuts[1:], strict=False)):
        raise UserError(f"{where}: {name} must increase, not {list(cuts)}")
    return cuts
