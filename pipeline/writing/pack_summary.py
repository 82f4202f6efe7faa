"""What a packing run says beyond its table: loud warnings and the sample table.

``loud_warnings``: when more than ``REJECT_WARNING`` of the listed images were rejected, or
a split that should have images has none, one line each naming the top reasons and their
counts (``make_shards --strict`` turns them into an error). ``write_samples``: the packed
samples' keys, splits, grades, patients and original paths (``pipeline.samplelist``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.constants import SPLITS
from pipeline.samplelist import SAMPLES_NAME, SampleRecord, write_sample_table

REJECT_WARNING = 0.05  # share of the listed images
TOP_REASONS = 3


def reason_kind(reason: str) -> str:
    """``bad label: '7' is not ...`` -> ``bad label``; ``too large (9x9 pixels)`` -> ``too large``."""
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip()


@dataclass(frozen=True)
class Expected:
    """The splits a run should fill, from what the source says and the options."""

    splits: tuple[str, ...]

    @classmethod
    def of(cls, listed, split_as: str | None, val_fraction: float, test_fraction: float):
        if split_as is not None:
            return cls((split_as,))
        given = {s.split for s in listed}
        want = ["train"]
        if val_fraction > 0 or "val" in given:
            want.append("val")
        if "test" in given or (None in given and test_fraction > 0):
            want.append("test")
        return cls(tuple(want))


def loud_warnings(
    n_listed: int,
    rejects: list[tuple],
    counts: dict[str, list[int]],
    expected: Expected,
    where: str,
) -> list[str]:
    """One line per reason to worry: many rejects (top reasons with counts), empty splits."""
    lines = []
    if n_listed and len(rejects) > REJECT_WARNING * n_listed:
        kinds = Counter(reason_kind(r[1]) for r in rejects).most_common(TOP_REASONS)
        top = ", ".join(f"{kind} {n}" for kind, n in kinds)
        share = 100 * len(rejects) / n_listed
        lines.append(
            f"{len(rejects)} of {n_listed} listed images ({share:.0f} %) were rejected: {top} "
            f"(see {where})"
        )
    for split in SPLITS:
        if split in expected.splits and sum(counts[split]) == 0:
            lines.append(f"split {split} is empty")
    return lines


def write_samples(out: Path, samples, rejects: list[tuple]) -> None:
    """``samples.csv``: every packed sample (those rejected while decoding left out)."""
    rejected = {r[0] for r in rejects if len(r) > 2}  # (key, reason, path): rejected at decoding
    records = [
        SampleRecord(s.key, s.split, s.label, s.patient, s.source)
        for s in sorted(samples, key=lambda s: (SPLITS.index(s.split), s.key))
        if s.key not in rejected
    ]
    write_sample_table(out / SAMPLES_NAME, records)
