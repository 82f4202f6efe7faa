"""A small bounded fuzz: byte-flipped PNG, JPEG and TIFF photos through packing and predict.

Each damaged file must be packed (a decodable JPEG comes out) or rejected with a reason
(BadImage); any other exception is a bug. Seeded, a few hundred files, seconds.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.loading.samples import eval_image
from pipeline.writing.preprocess import BadImage, prepare
from tests.conftest import python
from tools.make_synthetic import render_fundus

PER_FORMAT = 100
# A flipped header byte often claims a huge picture; Pillow's own limit (89 Mpx) would decode
# it, slowly. The fuzz hunts for exceptions, not for big pictures: 1 Mpx keeps it seconds.
FUZZ_PIXELS = 1_000_000
FORMATS = {"png": "PNG", "jpeg": "JPEG", "tif": "TIFF"}


def encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(render_fundus(3, np.random.default_rng(0), 72)).save(buf, FORMATS[fmt])
    return buf.getvalue()


def flipped(data: bytes, rng: np.random.Generator, header: float = 0.7) -> bytes:
    """``data`` with 1-8 bytes set at random places, a share ``header`` of them in the first
    200 bytes (where a decoder's trust lives), and sometimes cut short."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        start, end = (0, min(len(out), 200)) if rng.random() < header else (200, len(out))
        out[int(rng.integers(start, end))] = int(rng.integers(0, 256))
    if rng.random() < 0.2:
        out = out[: int(rng.integers(1, len(out)))]
    return bytes(out)


def fuzzed_files(folder, fmt: str, n: int = PER_FORMAT, header: float = 0.7) -> list:
    rng = np.random.default_rng(sum(map(ord, fmt)))
    data = encoded(fmt)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"f{fmt}{i:03d}.{fmt}"
        path.write_bytes(flipped(data, rng, header))
        paths.append(path)
    return paths


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_flipped_bytes_are_packed_or_rejected_never_raised(fmt, tmp_path):
    packed = rejected = 0
    for path in fuzzed_files(tmp_path, fmt):
        try:
            data = prepare(path, 64, force=True, max_pixels=FUZZ_PIXELS)
        except BadImage as err:
            assert err.reason, path
            rejected += 1
        else:
            assert Image.open(io.BytesIO(data)).size == (64, 64)
            packed += 1
        try:  # predict (tools/predict.py load_for_model): prepare, then the loaders' decode
            image = eval_image(prepare(path, 64, max_pixels=FUZZ_PIXELS), 64, str(path))
            assert image.shape == (3, 64, 64)
        except BadImage as err:
            assert err.reason, path
    assert packed + rejected == PER_FORMAT
    assert rejected > 0  # the fuzz does damage


def test_make_shards_over_a_folder_of_damaged_photos(tmp_path):
    """The real command: every damaged file packed or listed in rejects.csv. Flips past the
    header here: a header claiming 80 Mpx is decoded by the real limits, slowly."""
    imgs = tmp_path / "data/imgs"
    paths = [p for fmt in FORMATS for p in fuzzed_files(imgs, fmt, n=15, header=0.0)]
    rows = "".join(f"{p.stem},{i % 5}\n" for i, p in enumerate(paths))
    (tmp_path / "labels.csv").write_text("image,level\n" + rows)
    out = tmp_path / "shards"
    proc = python(
        "tools/make_shards.py",
        tmp_path / "data",
        out,
        "--labels",
        tmp_path / "labels.csv",
        "--size",
        "64",
        "--workers",
        "1",
        "--quiet",
        tmp=tmp_path,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    samples = (out / "samples.csv").read_text().count("\n") - 1
    rejects = (out / "rejects.csv").read_text().count("\n") - 1
    assert samples + rejects == len(paths) and samples > 0, (samples, rejects)
