"""What a DALI failure is: one sample that cannot be read or decoded, or everything else.

DALI raises a RuntimeError whose text names the failing operator and quotes the error,
e.g. (DALI 2.4, a JPEG with a damaged stream, decoded on the CPU)::

    Critical error in pipeline:
    Error in CPU operator `nvidia.dali.fn.decoders.image`,
    which was used in the pipeline definition with the following traceback:
      File ".../dali.py", line 88, in decode
        ...
    encountered:

    nvImageCodec failure: '#3'
    Current pipeline object is no longer valid.

Only a reader or decoder failing over the data is a *sample* failure: the loader then
finds the sample on the CPU and names its shard and key. Everything else is a *device*
failure and keeps DALI's own words: a pipeline that does not build ("Critical error when
building pipeline"), allocation ("Can't allocate N bytes on device 0."), CUDA, the driver,
NVML, nvJPEG and nvImageCodec failing to start or to run (statuses other than a bad
codestream). Scanning a rank's slice for a bad JPEG takes minutes on a large split and
would blame the data for the GPU; so nothing unknown is scanned.

No DALI import here: the classification is plain text, tested with the texts DALI raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SAMPLE, DEVICE = "sample", "device"

# nvImageCodec statuses (nvimgcodec.h) that mean "this codestream is bad or unsupported":
# BAD_CODESTREAM 3, CODESTREAM_UNSUPPORTED 4, their extension twins 13 and 14, and
# EXTENSION_INCOMPLETE_BITSTREAM 19. NOT_INITIALIZED 1, ALLOCATOR_FAILURE 5, EXECUTION_FAILED
# 6, ARCH_MISMATCH 7, MISSED_DEPENDENCIES 10, CUDA_CALL_ERROR 21 ... are the decoder's own.
CODESTREAM_STATUSES = frozenset({3, 4, 13, 14, 19})

# Words of the GPU, its driver and libraries failing; they win over everything else.
DEVICE_WORDS = (
    "can't allocate",  # "Can't allocate %zu bytes on device %d." (dali::CUDABadAlloc)
    "allocation failed",  # "CUDA allocation failed"
    "out of memory",
    "bad_alloc",
    "cuda runtime api error",
    "cuda driver api error",
    "cuda error",
    "cudaerror",
    "cuda_error",
    "cuinit",
    "cuda-capable",
    "cuda driver",
    "cuda runtime",
    "nvml",
    "nvjpeg error",  # 'NVJPEG error "5" : NVJPEG_STATUS_ALLOCATOR_FAILURE'
    "nvjpeg_status",
    "requires nvimagecodec",
    "nvimgcodec-cu",  # "... `pip install nvidia-nvimgcodec-cu12`": the library is missing
    "could not create decoder",
    "failed to load cuda",  # "Failed to load CUDA driver!"
    "failed to load lib",
    "cannot load cuda",
    "stub library",
)

# Words of a read or decode failure of the data (with or without an operator line).
SAMPLE_WORDS = (
    "failed to decode sample",
    "unable to decode",
    "corrupted tar",
    "underful sample",
    "malformed index",
    "offset is outside",
    "error reading from a file",
    "unable to read",
    "unexpected end of file",
    "webdataset_loader",
)

OPERATOR = re.compile(r"Error (?:in|when executing) (\w+) operator `?([\w.]+)`?")
CODEC_STATUS = re.compile(r"nvImageCodec failure: '#(\d+)'")
PREFIX = re.compile(r"^(Critical error (in|when building) pipeline:|.*\bencountered:)\s*")
NOISE = re.compile(
    r"^(Current pipeline object is no longer valid\.|C\+\+ context:|\[frame \d+\]|Stacktrace"
    r"|File \"|which was used in the pipeline)"
)


@dataclass(frozen=True)
class DaliFailure:
    kind: str  # SAMPLE or DEVICE
    building: bool
    operator: str | None  # "nvidia.dali.fn.decoders.image", "ImageDecoder" (older DALI)
    backend: str | None  # "CPU", "MIXED", "GPU"
    detail: str  # DALI's own message, without its traceback and boilerplate

    def sentence(self, what: str) -> str:
        """One sentence for a device failure while ``what`` ("reading split 'train' on cuda:0")."""
        where = f" in {self.operator} ({self.backend.lower()})" if self.operator else ""
        if self.building:
            return f"DALI could not build its pipeline for {what}{where}: {self.detail}"
        return f"DALI failed{where} while {what} (not a data problem): {self.detail}"


def classify(text: str, building: bool = False) -> DaliFailure:
    """The kind of a DALI failure from its text; ``building``: raised by ``Pipeline.build``."""
    low = text.lower()
    match = OPERATOR.search(text)
    backend, operator = (match[1], match[2]) if match else (None, None)
    status = CODEC_STATUS.search(text)
    kind = DEVICE
    if building or any(w in low for w in DEVICE_WORDS):
        kind = DEVICE
    elif status is not None:  # the decoder said why: a bad codestream or its own failure
        kind = SAMPLE if int(status[1]) in CODESTREAM_STATUSES else DEVICE
    elif any(w in low for w in SAMPLE_WORDS):
        kind = SAMPLE
    elif operator and "reader" in operator.lower():  # a reader fails over its files
        kind = SAMPLE
    return DaliFailure(kind, building, operator, backend, detail_of(text))


def detail_of(text: str) -> str:
    """DALI's message without the pipeline traceback, C++ context and boilerplate lines."""
    lines = [ln.strip() for ln in text.splitlines()]
    if "encountered:" in lines:  # DALI 2.x: the message follows the traceback
        lines = lines[len(lines) - lines[::-1].index("encountered:") :]
    lines = [PREFIX.sub("", ln) for ln in lines]
    kept = [ln for ln in lines if ln and not NOISE.match(ln)]
    kept = list(dict.fromkeys(kept))  # DALI repeats lines when errors nest
    return " ".join(kept) or "no message"
