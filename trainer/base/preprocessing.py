"""Whether a checkpoint meets images prepared the way its training images were.

``best.pt`` stores the training shards' ``preprocess`` (manifest.json's: ``size``,
``graham``, ``crop_border``, ...). A model trained on plain photographs and evaluated on
Graham-normalised ones (or the reverse, or on another stored size) runs without an error
and reports figures that mean nothing, so ``evaluate.py`` and ``predict.py`` stop instead,
naming both sides; ``--allow-preprocessing-mismatch`` goes on with a warning.
"""

from __future__ import annotations

import sys

from pipeline.errors import UserError

# what changes the picture a model sees; the rest (JPEG quality, Pillow's version) barely does
COMPARED = ("graham", "crop_border", "size")
ALLOW_FLAG = "--allow-preprocessing-mismatch"


def describe(prep: dict, keys: tuple[str, ...] = COMPARED) -> str:
    """``graham=False, crop_border=True, size=512`` (the keys that are recorded)."""
    return ", ".join(f"{k}={prep[k]}" for k in keys if k in prep) or "nothing recorded"


def differences(trained: dict, given: dict) -> tuple[str, ...]:
    """The compared settings both sides record and that differ (one unrecorded is no evidence)."""
    return tuple(k for k in COMPARED if k in trained and k in given and trained[k] != given[k])


def check_preprocessing(
    trained: dict, given: dict, checkpoint: str, other: str, allow: bool = False
) -> None:
    """A UserError naming both sides when they differ; with ``allow``, a warning line instead."""
    keys = differences(trained, given)
    if not keys:
        return
    line = (
        f"{checkpoint} was trained on images prepared with {describe(trained, keys)}, but "
        f"{other} has {describe(given, keys)}"
    )
    if not allow:
        raise UserError(
            f"{line}; use images prepared the same way, or pass {ALLOW_FLAG} to go on anyway"
        )
    print(f"warning: {line} ({ALLOW_FLAG}): the figures may mean little", file=sys.stderr)
