"""pipeline.writing.preprocess: safe opening, border crop, square padding, Graham, pass-through."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.writing.preprocess import (
    BadImage,
    crop_border,
    encode_jpeg,
    graham_normalise,
    jpeg_frame,
    open_image,
    pad_square,
    passthrough_bytes,
    prepare,
    preprocess,
)


def jpeg_bytes(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def eye_frame(h: int, w: int, seed: int = 0, noise: int = 12) -> np.ndarray:
    """A dark noisy frame with a bright disc of diameter h in the middle and a few hot pixels."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, noise, (h, w, 3), dtype=np.uint8)
    yy, xx = np.ogrid[:h, :w]
    disc = np.hypot(xx - (w - 1) / 2, yy - (h - 1) / 2) <= h / 2 - 1
    img[disc] = (190, 90, 40)
    hot = rng.integers(0, [h, w], (6, 2))
    img[hot[:, 0], hot[:, 1]] = 255  # salt noise in the frame must not widen the crop
    return img


def jpeg_claiming(h: int, w: int) -> bytes:
    """A small valid JPEG whose frame header is patched to claim h x w pixels."""
    data = bytearray(jpeg_bytes(np.zeros((8, 8, 3), np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def png_claiming(h: int, w: int) -> bytes:
    """A PNG signature and IHDR (valid CRC) claiming h x w pixels, and nothing to decode."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = (
        struct.pack(">I", len(ihdr))
        + b"IHDR"
        + ihdr
        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    )
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + iend


# ---------------------------------------------------------------- opening


def test_open_converts_grayscale_cmyk_png_to_rgb():
    rgb = eye_frame(32, 48)
    gray = jpeg_bytes(rgb[..., 0])
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG")
    cmyk = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    for data, mode in ((gray, "L"), (cmyk, "CMYK"), (buf.getvalue(), "RGB")):
        assert Image.open(io.BytesIO(data)).mode == mode
        img = open_image(data)
        assert img.mode == "RGB" and img.size == (48, 32)


def test_open_uses_dct_draft_for_large_jpegs():
    data = jpeg_bytes(eye_frame(683, 1024))
    img = open_image(data, draft_size=128)
    # libjpeg scales by 1/4 here: the largest factor keeping both sides >= 128.
    assert img.size == (256, 171)
    assert open_image(data).size == (1024, 683)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: None, "missing"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(jpeg_bytes(eye_frame(64, 96))[:900]), "truncated"),
        (lambda p: p.write_bytes(jpeg_bytes(eye_frame(64, 96))[:-2]), "truncated"),
        (lambda p: p.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF"), "truncated"),
        (lambda p: p.write_text("image,level\n10_left,0\n"), "not an image"),
        (lambda p: p.write_bytes(jpeg_claiming(60000, 60000)), "too large"),
        (lambda p: p.write_bytes(png_claiming(40000, 40000)), "too large"),
    ],
    ids=["missing", "empty", "truncated", "no-eoi", "header-only", "text", "jpeg-bomb", "png-bomb"],
)
def test_bad_inputs_raise_with_reason(tmp_path, make, reason):
    path = tmp_path / "x.jpeg"
    make(path)
    with pytest.raises(BadImage) as err:
        open_image(path, draft_size=64)
    assert err.value.reason.startswith(reason)
    with pytest.raises(BadImage, match=reason):
        prepare(path, 64)


def test_pixel_cap_is_checked_before_decoding():
    data = jpeg_bytes(eye_frame(64, 64))
    with pytest.raises(BadImage, match=r"too large \(64x64 pixels\)"):
        open_image(data, max_pixels=64 * 64 - 1)
    assert open_image(data, max_pixels=64 * 64).size == (64, 64)


# ---------------------------------------------------------------- geometry


def test_crop_border_finds_the_eye_despite_noise():
    img = Image.fromarray(eye_frame(120, 180))
    cropped = crop_border(img)
    w, h = cropped.size
    assert abs(w - 118) <= 3 and abs(h - 118) <= 3
    assert crop_border(Image.new("RGB", (40, 30))).size == (40, 30)  # all black: left alone


def test_pad_square_centres():
    img = Image.new("RGB", (30, 20), (200, 100, 50))
    out = np.asarray(pad_square(img))
    assert out.shape == (30, 30, 3)
    assert out[:5].max() == 0 and out[25:].max() == 0 and (out[5:25] == (200, 100, 50)).all()


def test_preprocess_crops_3_2_frame_to_square():
    out = preprocess(Image.fromarray(eye_frame(120, 180)), 64)
    arr = np.asarray(out)
    assert out.size == (64, 64) and out.mode == "RGB"
    # The disc fills the square: its centre row spans (almost) the whole width.
    assert (arr[32, :, 0] > 100).mean() > 0.9


def test_preprocess_pads_a_3_2_photo_without_border():
    filled = np.full((40, 60, 3), 180, np.uint8)
    arr = np.asarray(preprocess(Image.fromarray(filled), 60))
    assert arr.shape == (60, 60, 3)
    assert arr[:8].max() < 10 and arr[-8:].max() < 10  # bands added above and below
    assert arr[20:40].min() > 170


def test_graham_flat_is_grey_and_outside_masked():
    flat = Image.new("RGB", (64, 64), (150, 60, 30))
    arr = np.asarray(graham_normalise(flat)).astype(int)
    assert np.abs(arr[32, 32] - 128).max() <= 2  # no local contrast: mid grey
    assert (arr[0, 0] == 128).all()
    spot = np.full((64, 64, 3), 100, np.uint8)
    spot[30:34, 30:34] = 160
    out = np.asarray(graham_normalise(Image.fromarray(spot))).astype(int)
    assert out[32, 32, 0] > 150 and abs(out[10, 32, 0] - 128) <= 2  # local detail kept, level gone


def test_encode_jpeg_is_baseline_rgb():
    data = encode_jpeg(Image.new("L", (20, 10), 77))
    assert jpeg_frame(io.BytesIO(data)) == (0xC0, 10, 20, 3)


# ---------------------------------------------------------------- pass-through


def test_prepare_passes_original_bytes_through(tmp_path):
    path = tmp_path / "a.jpeg"
    path.write_bytes(jpeg_bytes(eye_frame(64, 64)))
    assert prepare(path, 64) == path.read_bytes()
    assert passthrough_bytes(path, 64) == path.read_bytes()
    for changed in (
        prepare(path, 64, force=True),
        prepare(path, 64, graham=True),
        prepare(path, 32),
    ):
        assert changed != path.read_bytes() and changed[:2] == b"\xff\xd8"
    assert Image.open(io.BytesIO(prepare(path, 32))).size == (32, 32)


@pytest.mark.parametrize(
    "save",
    [dict(progressive=True), dict(mode="L"), dict(cut=True)],
    ids=["progressive", "grayscale", "truncated"],
)
def test_prepare_reencodes_what_is_not_a_clean_baseline_rgb_jpeg(tmp_path, save):
    img = eye_frame(64, 64)
    path = tmp_path / "a.jpeg"
    if save.get("mode") == "L":
        data = jpeg_bytes(img[..., 0])
    else:
        data = jpeg_bytes(img, progressive=save.get("progressive", False))
    if save.get("cut"):
        data = data[: len(data) // 2]
    path.write_bytes(data)
    assert passthrough_bytes(path, 64) is None
    if save.get("cut"):
        with pytest.raises(BadImage, match="truncated"):
            prepare(path, 64)
    else:
        out = prepare(path, 64)
        assert jpeg_frame(io.BytesIO(out)) == (0xC0, 64, 64, 3)
