"""Fundus photograph -> square RGB JPEG: open safely, crop the black frame, pad, resize.

Pure functions of their inputs, shared by the shard writer (``pipeline/packing.py``) and
by anything that must preprocess raw photos the same way (prediction on a folder).

Large JPEGs are decoded with ``Image.draft`` (libjpeg's DCT-domain scaling by 1/2, 1/4
or 1/8), so a 3888x2592 photo meant for 512x512 is decoded at 972x648, never at full size.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from pipeline.constants import DEFAULT_IMAGE_SIZE

MAX_PIXELS = 100_000_000  # raw EyePACS tops out at 5184x3456 = 18 Mpx
# a file is refused above this before it is read: a raw fundus photo is a few MB, an
# uncompressed 16-bit RGB TIFF of a 24 Mpx camera 144 MB
MAX_FILE_BYTES = 256_000_000
MIN_SIDE = 64  # px; a smaller photo holds too little of the retina to grade
EXIF_ORIENTATION = 0x0112
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


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (a link is followed
    only to one) of at most ``max_bytes``; else BadImage with the reason. Opened without
    blocking, so a FIFO swapped in after the check cannot hang the reader either."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BadImage("missing") from None
    except OSError as err:
        kind = _kind_of(path)
        raise BadImage(
            f"not an image ({kind})" if kind else f"unreadable ({err.strerror or err})"
        ) from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = f"not an image ({file_kind(st.st_mode)})"
    elif st.st_size > max_bytes:
        problem = (
            f"file too large ({st.st_size / 1e6:.0f} MB; the limit is {max_bytes / 1e6:.0f} MB)"
        )
    if problem:
        os.close(fd)
        raise BadImage(problem)
    return fd


def _kind_of(path) -> str | None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else file_kind(mode)


def read_bytes(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file ``path`` (``open_regular``'s checks), or BadImage."""
    fd = open_regular(path, max_bytes)
    try:
        with open(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)  # a file that grew since the check is still bounded
    except OSError as err:
        raise BadImage(f"unreadable ({err.strerror or err})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise BadImage(f"file too large (over {max_bytes / 1e6:.0f} MB)")
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
            # Pillow's decompression-bomb limit is a reject here, never only a warning
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("too large") from None  # more pixels than Pillow's bomb limit
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
    except (MemoryError, Image.DecompressionBombWarning):
        raise BadImage("too large to decode") from None
    return to_rgb(upright(img))


def upright(img: Image.Image) -> Image.Image:
    """``img`` as a viewer shows it: turned by its EXIF orientation (a phone's portrait photo
    is stored sideways with Orientation 6), the tag then dropped."""
    try:
        if img.getexif().get(EXIF_ORIENTATION, 1) == 1:
            return img  # exif_transpose would return a copy: a whole image more at the peak
        return ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, struct.error, KeyError, TypeError):
        return img  # an unreadable EXIF block: the pixels as stored


def orientation(data: bytes) -> int:
    """The EXIF orientation of an image's bytes (1, as stored, when it has none)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 -- any doubt: not passed through, the decode decides
        return 0


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode Pillow opens: 16-bit and 32-bit integer data (``I;16``, ``I``)
    and float data are scaled to 0-255, not clipped (Pillow's own conversion clips 16-bit
    grey at 255, which turns a photograph white); grey, palette, RGBA, CMYK as Pillow converts.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return Image.fromarray(_grey_8bit(img)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # transparent pixels become black, like the frame around the eye
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (0, 0, 0))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def _grey_8bit(img: Image.Image, rows: int = 256) -> np.ndarray:
    """8-bit grey from 16/32-bit integer or float grey, a band of ``rows`` rows at a time in
    float32: the whole image never exists as floats (a 10000x10000 16-bit PNG as float64
    would be 800 MB, twice over)."""
    data = np.asarray(img)
    top = float(data.max()) if data.size else 0.0
    factor = 1 / 257.0 if img.mode.startswith("I;16") or top > 255 else 1.0  # 16 onto 8 bits
    if img.mode == "F" and top <= 1.0:
        factor = 255.0
    grey = np.empty(data.shape, np.uint8)
    for start in range(0, data.shape[0], rows):
        band = data[start : start + rows].astype(np.float32) * np.float32(factor)
        np.clip(np.rint(band, out=band), 0, 255, out=band)
        grey[start : start + rows] = band
    return grey


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


def passthrough_bytes(
    path: str | os.PathLike, size: int, max_bytes: int = MAX_FILE_BYTES
) -> bytes | None:
    """The file's bytes if it is already a complete baseline 3-channel JPEG of size x size.

    Never raises: anything doubtful returns None and goes through the full decode, which
    gives the reason if the file is bad. Reads the first ``PROBE_BYTES`` and stops there
    unless the frame header says the file passes (so a raw photo costs one small read);
    small files are read whole by that first read.
    """
    try:
        fd = open_regular(path, max_bytes)
    except BadImage:
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
    # A photo stored turned (EXIF orientation) is decoded too, to be turned upright.
    if not data.rstrip(b"\x00").endswith(_JPEG_EOI) or orientation(data) != 1:
        return None
    return data


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
    max_bytes: int = MAX_FILE_BYTES,
) -> bytes:
    """The JPEG bytes to pack for the image at ``path``; raises BadImage.

    An image that already is a baseline RGB JPEG of ``size`` x ``size`` is returned as
    its original bytes unless ``force`` or ``graham`` asks for preprocessing.
    """
    if not (graham or force):
        original = passthrough_bytes(path, size, max_bytes)
        if original is not None:
            return original
    img = open_image(read_bytes(path, max_bytes), draft_size=size, max_pixels=max_pixels)
    # The same limit, and words, for packing and predict. Shards smaller than MIN_SIDE lower
    # it; a JPEG's draft decode never goes below ``size``, so it never trips this.
    least = min(MIN_SIDE, size)
    if min(img.size) < least:
        width, height = img.size
        raise BadImage(
            f"too small to grade ({width}x{height} pixels; at least {least} on the short side)"
        )
    return encode_jpeg(preprocess(img, size, graham=graham))
