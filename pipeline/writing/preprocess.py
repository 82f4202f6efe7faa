"""Fundus photograph -> square RGB JPEG: open safely, crop the black frame, pad, resize.

Pure functions of their inputs, shared by the shard writer (``pipeline/packing.py``) and
by anything that must preprocess raw photos the same way (prediction on a folder).

Large JPEGs are decoded with ``Image.draft`` (libjpeg's DCT-domain scaling by 1/2, 1/4
or 1/8), so a 3888x2592 photo meant for 512x512 is decoded at 972x648, never at full size.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from pipeline.constants import DEFAULT_IMAGE_SIZE

MAX_PIXELS = 100_000_000  # raw EyePACS tops out at 5184x3456 = 18 Mpx
JPEG_QUALITY = 95
BORDER_THRESHOLD = 20  # brightest channel, 0-255: darker counts as the black frame
GRAHAM_MASK = 0.9  # keep this fraction of the circle's radius, grey outside
PROBE_BYTES = 1 << 16  # first read of a possible pass-through file: most 512 px JPEGs whole

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class BadImage(Exception):
    """An input that cannot be packed; ``reason`` is short ("truncated", "not an image")."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- reading


def read_bytes(path: str | os.PathLike) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadImage("missing") from None
    except IsADirectoryError:
        raise BadImage("not an image (a folder)") from None
    except OSError as err:
        raise BadImage(f"unreadable ({err.strerror or err})") from None
    if not data:
        raise BadImage("empty file")
    return data


def open_image(
    src: str | os.PathLike | bytes, draft_size: int | None = None, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Decode ``src`` (a path or the file's bytes) to an RGB image, or raise BadImage.

    ``draft_size``: the JPEG is decoded at the smallest DCT scale whose both sides are
    still at least that many pixels. Images claiming more than ``max_pixels`` are refused
    from their header, before anything is decoded.
    """
    data = src if isinstance(src, bytes | bytearray) else read_bytes(src)
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise BadImage("too large") from None
    except Image.UnidentifiedImageError:
        # A JPEG or PNG signature whose header cannot be parsed was cut short.
        known = data.startswith(_JPEG_SOI) or data.startswith(b"\x89PNG")
        raise BadImage("truncated" if known else "not an image") from None
    except (OSError, SyntaxError, ValueError, struct.error):
        raise BadImage("truncated") from None
    width, height = img.size
    if width * height > max_pixels:
        raise BadImage(f"too large ({width}x{height} pixels)")
    if draft_size and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    try:
        img.load()
    except OSError as err:
        raise BadImage(
            "truncated" if "truncated" in str(err).lower() else "corrupt image data"
        ) from None
    except (SyntaxError, ValueError, struct.error, Image.DecompressionBombError):
        raise BadImage("corrupt image data") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode Pillow opens: 16-bit and 32-bit integer data (``I;16``, ``I``)
    and float data are scaled to 0-255, not clipped (Pillow's own conversion clips 16-bit
    grey at 255, which turns a photograph white); grey, palette, RGBA, CMYK as Pillow converts.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        data = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or data.max() > 255:
            data = data / 257.0  # the 16-bit range onto the 8-bit one
        elif img.mode == "F" and data.max() <= 1.0:
            data = data * 255.0
        grey = np.clip(np.rint(data), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # transparent pixels become black, like the frame around the eye
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (0, 0, 0))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def jpeg_frame(f) -> tuple[int, int, int, int] | None:
    """(SOF marker, height, width, components) from a JPEG file object's header, else None.

    Walks the marker segments with seeks, so an EXIF or ICC block costs no reading.
    """
    if f.read(2) != _JPEG_SOI:
        return None
    while True:
        head = f.read(4)
        if len(head) < 4 or head[0] != 0xFF:
            return None
        marker, length = head[1], struct.unpack(">H", head[2:])[0]
        if marker in _SOF_MARKERS:
            body = f.read(6)
            if len(body) < 6:
                return None
            _, height, width, comps = struct.unpack(">BHHB", body)
            return marker, height, width, comps
        if marker == 0xDA or length < 2:  # scan data before any frame header
            return None
        f.seek(length - 2, io.SEEK_CUR)


def passthrough_bytes(path: str | os.PathLike, size: int) -> bytes | None:
    """The file's bytes if it is already a complete baseline 3-channel JPEG of size x size.

    Never raises: anything doubtful returns None and goes through the full decode, which
    gives the reason if the file is bad. Reads the first ``PROBE_BYTES`` and stops there
    unless the frame header says the file passes (so a raw photo costs one small read);
    small files are read whole by that first read.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        head = os.read(fd, PROBE_BYTES)
        frame = jpeg_frame(io.BytesIO(head))
        if frame is None and len(head) == PROBE_BYTES:  # the frame header may lie further on
            os.lseek(fd, 0, os.SEEK_SET)
            with open(fd, "rb", closefd=False) as f:
                frame = jpeg_frame(f)
            os.lseek(fd, len(head), os.SEEK_SET)
        if frame != (0xC0, size, size, 3):
            return None
        parts = [head]
        while block := os.read(fd, 1 << 20):
            parts.append(block)
    except (OSError, struct.error):
        return None
    finally:
        os.close(fd)
    data = head if len(parts) == 1 else b"".join(parts)
    # A file cut short almost never ends in the end-of-image marker; such files are decoded.
    return data if data.rstrip(b"\x00").endswith(_JPEG_EOI) else None


# ---------------------------------------------------------------- geometry


def crop_border(
    img: Image.Image, threshold: int = BORDER_THRESHOLD, min_fraction: float = 0.01
) -> Image.Image:
    """Crop the dark frame around the eye.

    A row or column belongs to the eye when more than ``min_fraction`` of it is brighter
    than ``threshold`` (in its brightest channel), so stray noisy pixels in the frame do
    not count. Measured on a copy reduced to about 256 px; an image with almost nothing
    bright in it is returned as it is.
    """
    box = border_box(img, threshold, min_fraction)
    return img.crop(box) if box is not None else img


def border_box(
    img: Image.Image, threshold: int = BORDER_THRESHOLD, min_fraction: float = 0.01
) -> tuple[int, int, int, int] | None:
    """The box ``crop_border`` crops ``img`` to (left, top, right, bottom); None when it
    keeps the image whole. Whatever must follow the photograph's geometry (a lesion mask)
    is cropped with it."""
    factor = max(1, min(img.size) // 256)
    small = img.reduce(factor) if factor > 1 else img
    bright = np.asarray(small).max(axis=2) > threshold
    rows = np.flatnonzero(bright.mean(axis=1) > min_fraction)
    cols = np.flatnonzero(bright.mean(axis=0) > min_fraction)
    if len(rows) == 0 or len(cols) == 0:
        return None
    w, h = img.size
    box = (
        int(cols[0] * factor),
        int(rows[0] * factor),
        int(min(w, (cols[-1] + 1) * factor)),
        int(min(h, (rows[-1] + 1) * factor)),
    )
    if (box[2] - box[0]) * (box[3] - box[1]) < 0.01 * w * h or box == (0, 0, w, h):
        return None
    return box


def pad_square(img: Image.Image, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Centre ``img`` on a square of its longer side."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new("RGB", (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def fundus_circle(width: int, height: int, fraction: float = 1.0) -> np.ndarray:
    """(height, width) bool, true inside the eye's circle of a prepared image: the border
    crop leaves the eye's diameter as the longer side and ``pad_square`` centres it, so the
    circle is the one inscribed in the square (``fraction`` of its radius)."""
    yy, xx = np.ogrid[:height, :width]
    radius = min(width, height) / 2
    return np.hypot(xx - (width - 1) / 2, yy - (height - 1) / 2) <= fraction * radius


def graham_normalise(img: Image.Image) -> Image.Image:
    """Ben Graham's normalisation (Kaggle DR 2015): 4*img - 4*blur(img) + 128, circle masked.

    The blur's sigma is the eye's radius / 30 as in his script; outside 90% of the circle
    the image is a flat 128 grey, which hides the rim artefacts the subtraction makes.
    """
    w, h = img.size
    radius = min(w, h) / 2
    blur = img.filter(ImageFilter.GaussianBlur(radius / 30))
    a = np.asarray(img, np.float32)
    b = np.asarray(blur, np.float32)
    out = np.clip(4 * a - 4 * b + 128, 0, 255)
    out[~fundus_circle(w, h, GRAHAM_MASK)] = 128
    return Image.fromarray(out.astype(np.uint8))


def preprocess(
    img: Image.Image, size: int = DEFAULT_IMAGE_SIZE, graham: bool = False
) -> Image.Image:
    """Crop the frame, pad to square, resize to ``size`` x ``size``, optionally Graham-normalise."""
    img = pad_square(crop_border(img))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return graham_normalise(img) if graham else img


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """Baseline RGB JPEG bytes (no progressive scans: every decoder reads them fast)."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality, progressive=False, optimize=False)
    return buf.getvalue()


def prepare(
    path: str | os.PathLike,
    size: int = DEFAULT_IMAGE_SIZE,
    graham: bool = False,
    force: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> bytes:
    """The JPEG bytes to pack for the image at ``path``; raises BadImage.

    An image that already is a baseline RGB JPEG of ``size`` x ``size`` is returned as
    its original bytes unless ``force`` or ``graham`` asks for preprocessing.
    """
    if not (graham or force):
        original = passthrough_bytes(path, size)
        if original is not None:
            return original
    img = open_image(path, draft_size=size, max_pixels=max_pixels)
    return encode_jpeg(preprocess(img, size, graham=graham))
