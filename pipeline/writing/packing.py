"""Pack a data folder into WebDataset shards: ``pack(PackConfig(data_dir, out_dir))``.

The steps, in order:

1. read the source layout (``pipeline.writing.sources``), split the samples by patient into
   train, val and test (as far as the layout does not already say);
2. order the samples: train in a seeded shuffle (DALI only shuffles inside a buffer, so
   the order on disk matters), val and test sorted by key; cut them into chunks of ``shard_size``,
   chunk ``i`` of a split becomes ``<split>-<i>.tar``;
3. a chunk whose first file is already a ``size`` x ``size`` baseline JPEG goes whole to a
   worker process, which reads, hashes and writes its shard from the original bytes
   (shards in parallel; it gives the chunk back if a file needs decoding). The other
   chunks' images are prepared (``pipeline.writing.preprocess``) across the pool in small tasks,
   a bounded number ahead, and their shards written here; memory stays flat whatever the
   dataset size. Results are taken in chunk order, so the output does not depend on
   ``workers``;
4. write each shard atomically with ``pipeline.shardformat.write_shard``, then ``rejects.csv``;
   fsync the shards once all are written, then write ``manifest.json`` last.

The manifest of an earlier run is deleted first, so a folder being rebuilt never has one
that lies. A rerun reuses each shard whose inputs (ids, labels, file size and mtime) and
settings are unchanged and whose bytes still match, from a small record kept beside the
shards (``.progress.json``); anything else is rebuilt, and shards of the earlier run that
are not part of the new one are removed. The same inputs give the same bytes.
"""

from __future__ import annotations

import csv
import ctypes
import gc
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, fields
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import PIL
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from pipeline import cli
from pipeline.cli import IMAGE_SIZE, abandon_threads, arg
from pipeline.constants import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_SHARD_SIZE,
    INDEX_SUFFIX,
    MANIFEST_NAME,
    NUM_CLASSES,
    REJECTS_NAME,
    SHARD_NAME,
    SPLITS,
)
from pipeline.errors import UserError
from pipeline.fileio import (
    atomic_write,
    atomic_write_json,
    file_sha256,
    folder_lock,
    make_writable_dir,
    safe_cell,
    stale_partials,
)
from pipeline.hostinfo import usable_cores
from pipeline.manifest import Manifest, SplitInfo
from pipeline.remote import CACHE_HELP, is_remote
from pipeline.shardformat import ShardInfo, fsync_files, write_shard
from pipeline.writing import channelstats
from pipeline.writing.layouts import LAYOUT_NAMES, Options
from pipeline.writing.pack_summary import Expected, loud_warnings, reason_kind, write_samples
from pipeline.writing.preprocess import (
    JPEG_QUALITY,
    MAX_FILE_BYTES,
    BadImage,
    passthrough_bytes,
    prepare,
)
from pipeline.writing.sources import Sample, Source, assign_splits, patients_in_both, read_source

PROGRESS_NAME = ".progress.json"
PREPROCESS_VERSION = 1  # bump when preprocessing changes, so reruns rebuild every shard
# 2: 16-bit images scaled, not clipped; 3: EXIF orientation applied (in the rerun
# fingerprint, not the manifest)
DECODING = 3
TASK_SIZE = 8  # images per pool task
# Room per default worker: one decoding a photo near Pillow's 89 Mpx limit peaked at 573 MB
# (81 Mpx, 16-bit; docs/benchmarks.md), with its shard bytes and imports beside it.
WORKER_MEMORY = 1_000_000_000
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
TASKS_AHEAD = 4  # tasks in flight per worker
_SHARD_FILE = re.compile(
    rf"^({'|'.join(SPLITS)})-\d{{6}}(\.tar|{re.escape(INDEX_SUFFIX)})$"
)  # SHARD_NAME


@dataclass
class PackConfig:
    """make_shards' options (``tools/make_shards.py --help``)."""

    data_dir: str = arg(
        help="folder with the images and label files (with --verify: the shard folder, "
        "or an s3://, gs://, http(s):// URL of one)",
        positional=True,
    )
    out_dir: str | None = arg(
        None,
        "shard folder to write (created), or an s3:// or gs:// prefix to upload to",
        positional=True,
    )
    size: int = arg(DEFAULT_IMAGE_SIZE, "side of the square images in px", **IMAGE_SIZE)
    shard_size: int = arg(DEFAULT_SHARD_SIZE, "samples per shard")
    workers: int | None = arg(
        None, "decoding processes (default: every usable core the free memory can feed)"
    )
    max_file_mb: float = arg(
        MAX_FILE_BYTES / 1e6, "refuse image files larger than this (MB) before reading them"
    )
    seed: int = arg(0, "seeds the train order and the made splits")
    test_fraction: float = arg(0.2, "test share of the images a layout gives no split")
    val_fraction: float = arg(
        0.1,
        "share of the training images (whole patients) set apart as the "
        "validation split, which chooses the best epoch; 0: none",
    )
    graham: bool = arg(False, "Ben Graham normalisation (local average subtracted)")
    strict: bool = arg(False, "fail (exit 2) if any input is rejected or a split is left empty")
    labels: Path | None = arg(
        None,
        "label file for any other layout: csv, tsv or whitespace; columns image, grade "
        "[, split][, patient] under their usual names (or --image-col ...)",
        metavar="FILE",
    )
    layout: str | None = arg(
        None,
        "read DATA_DIR as this layout (default: recognised by its files)",
        choices=LAYOUT_NAMES,
    )
    split_as: str | None = arg(
        None,
        "pack every image into this one split (an external set to evaluate on: --split-as test)",
        choices=SPLITS,
    )
    image_col: str | None = arg(None, "--labels: the image column's name", metavar="NAME")
    grade_col: str | None = arg(None, "--labels: the grade column's name", metavar="NAME")
    split_col: str | None = arg(None, "--labels: the split column's name", metavar="NAME")
    patient_col: str | None = arg(None, "--labels: the patient column's name", metavar="NAME")
    quiet: bool = arg(False, "no progress bar (for logs)")
    cache: str | None = arg(None, CACHE_HELP, metavar="DIR")
    verify: bool = arg(
        False,
        "check the shard folder DATA_DIR instead of packing: sha256, indexes, "
        "counts, unique keys, no patient in two splits, grades (exit 1 on any problem)",
    )

    def __post_init__(self):
        if self.verify and self.out_dir is not None:
            raise UserError("--verify takes one folder, the shard folder to check")
        if not self.verify and self.out_dir is None:
            raise UserError(
                "give the data folder and the shard folder to write: make_shards.py DATA_DIR OUT_DIR"
            )
        self.data_dir = self.data_dir if is_remote(self.data_dir) else Path(self.data_dir)
        if self.out_dir is not None and not is_remote(self.out_dir):
            self.out_dir = Path(self.out_dir)
        if self.size < 16:
            raise UserError(f"--image-size must be at least 16 px, got {self.size}")
        if self.shard_size < 1:
            raise UserError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.max_file_mb <= 0:
            raise UserError(f"--max-file-mb must be positive, got {self.max_file_mb}")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if not 0 <= self.test_fraction < 1:
            raise UserError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class PackResult:
    manifest: Manifest
    rejects: list[tuple[str, str]]
    counts: dict[str, list[int]]  # split -> packed samples per grade
    reused_shards: int


@dataclass
class _Chunk:
    split: str
    file: str
    samples: list[Sample]
    fingerprint: str


def pack(cfg: PackConfig, console: Console | None = None) -> PackResult:
    """Build the shard folder ``cfg.out_dir`` from ``cfg.data_dir``; UserError on bad input."""
    console = console or cli.console()
    if not cfg.quiet:
        console.print(f"[bold]make_shards[/] {_options_line(cfg)}")
    columns = Options(
        image_col=cfg.image_col,
        grade_col=cfg.grade_col,
        split_col=cfg.split_col,
        patient_col=cfg.patient_col,
    )
    source = read_source(cfg.data_dir, cfg.labels, cfg.layout, columns)
    out = _make_out_dir(Path(cfg.out_dir))
    with folder_lock(out, "make_shards"):
        _clear_out_dir(out)
        return _pack(cfg, source, out, console)


def _pack(cfg: PackConfig, source: Source, out: Path, console: Console) -> PackResult:
    """``pack`` once the output folder is ours alone."""
    samples = assign_splits(
        source.samples, cfg.test_fraction, cfg.seed, cfg.val_fraction, cfg.split_as
    )
    rejects = list(source.rejects)
    if cfg.strict and rejects:  # no point preparing images for a run that will fail
        _write_rejects(out, rejects)
        raise _strict_error(rejects, out)

    chunks = plan_chunks(samples, cfg.shard_size, cfg.seed, _settings(cfg))
    record = _load_record(out)
    reusable = {c.file for c in chunks if _can_reuse(out, record.get(c.file), c.fingerprint)}
    todo = [c for c in chunks if c.file not in reusable]
    # A chunk whose first image passes through is tried whole in one worker; the others
    # have their images decoded across the pool (raw photos: seconds of work per shard).
    whole = {
        c.file
        for c in todo
        if not cfg.graham and passthrough_bytes(c.samples[0].path, cfg.size) is not None
    }

    shards: dict[str, list[ShardInfo]] = {split: [] for split in SPLITS}
    counts = {split: [0] * NUM_CLASSES for split in SPLITS}
    train_sums = list(channelstats.ZERO)
    new_record: dict[str, dict] = {}
    workers = cfg.workers or default_workers()
    with _pool(workers if todo else 1, out) as pool, _progress(console, cfg.quiet) as bar:
        task = bar.add_task("packing", total=len(samples))
        tried = {
            c.file: _start(pool, _pack_originals, out / c.file, c, cfg.size)
            for c in todo
            if c.file in whole
        }
        preparer = _Preparer(cfg.size, cfg.graham, pool, workers, int(cfg.max_file_mb * 1e6))
        prepared = preparer.run(s for c in todo if c.file not in whole for s in c.samples)
        for chunk in chunks:
            bar.update(task, description=f"packing {chunk.file}")
            if chunk.file in reusable:
                entry = new_record[chunk.file] = record[chunk.file]
            else:
                if chunk.file in tried:
                    entry = _result(tried.pop(chunk.file))
                    if entry is None:  # an image needs decoding: prepare the chunk image by image
                        entry = _write_chunk(out / chunk.file, chunk, preparer.run(chunk.samples))
                else:
                    entry = _write_chunk(out / chunk.file, chunk, prepared)
                new_record[chunk.file] = entry
                _save_record(out, {**record, **new_record})  # an interrupted run resumes here
            if entry["shard"] is not None:
                shards[chunk.split].append(ShardInfo(**entry["shard"]))
            counts[chunk.split] = [
                a + b for a, b in zip(counts[chunk.split], entry["class_counts"], strict=True)
            ]
            rejects.extend(tuple(r) for r in entry["rejects"])
            if chunk.split == "train":
                train_sums = channelstats.add(train_sums, entry["channel_sums"])
            bar.advance(task, len(chunk.samples))

    _remove_stale(
        out, keep={name for s in shards.values() for i in s for name in (i.file, i.index)}
    )
    _save_record(out, new_record)
    _write_rejects(out, rejects)
    if cfg.strict and rejects:
        raise _strict_error(rejects, out)
    if not any(shards.values()):
        raise UserError(f"no image could be packed; see {out / REJECTS_NAME} for the reasons")
    expected = Expected.of(source.samples, cfg.split_as, cfg.val_fraction, cfg.test_fraction)
    n_listed = len(source.samples) + len(source.rejects)
    warnings = loud_warnings(n_listed, rejects, counts, expected, REJECTS_NAME)
    if cfg.strict and warnings:
        raise UserError(f"{'; '.join(warnings)} (--strict)")
    write_samples(out, samples, rejects)

    manifest = Manifest(
        root=out,
        image_size=cfg.size,
        splits={split: SplitInfo.of(shards[split], counts[split]) for split in SPLITS},
        preprocess=_settings(cfg),
        source={
            "layout": source.layout,
            "path": str(source.root),
            "labels": str(Path(cfg.labels).resolve()) if cfg.labels else None,
            "notes": source.notes,
        },
        seed=cfg.seed,
        channel_stats=channelstats.stats(train_sums, sum(counts["train"])),
        report={
            "rejected": len(rejects),
            "rejected_by_reason": dict(sorted(Counter(reason_kind(r[1]) for r in rejects).items())),
            "patients_in_both_splits": patients_in_both(samples),
            "config": _config_dict(cfg),
            "warnings": warnings,
        },
    )
    # the shards reach the disk before the manifest that vouches for them
    fsync_files(out / name for s in shards.values() for i in s for name in (i.file, i.index))
    manifest.write()
    result = PackResult(manifest, rejects, counts, reused_shards=len(reusable))
    console.print(summary_table(result, out))
    for line in warnings:
        console.print(f"[bold yellow]warning:[/] {line}", highlight=False)
    return result


# ---------------------------------------------------------------- planning


def plan_chunks(samples: list[Sample], shard_size: int, seed: int, settings: dict) -> list[_Chunk]:
    """Train in a seeded shuffled order, val and test sorted by key; ``shard_size`` samples a chunk."""
    chunks = []
    for split in SPLITS:
        members = sorted((s for s in samples if s.split == split), key=lambda s: s.key)
        if split == "train":
            order = np.random.default_rng([seed, 1]).permutation(len(members))
            members = [members[i] for i in order]
        for index, start in enumerate(range(0, len(members), shard_size)):
            part = members[start : start + shard_size]
            name = SHARD_NAME.format(split=split, index=index)
            chunks.append(_Chunk(split, name, part, _fingerprint(part, settings)))
    return chunks


def _fingerprint(samples: list[Sample], settings: dict) -> str:
    rows = []
    for s in samples:
        try:
            st = s.path.stat()
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = (-1, -1)
        rows.append((s.key, s.label, str(s.path), *stamp))
    return hashlib.sha256(json.dumps([settings, DECODING, rows]).encode()).hexdigest()


def _settings(cfg: PackConfig) -> dict:
    """Everything that decides a shard's bytes besides its inputs."""
    return {
        "size": cfg.size,
        "graham": cfg.graham,
        "crop_border": True,
        "pass_through": not cfg.graham,
        "jpeg_quality": JPEG_QUALITY,
        "pillow": PIL.__version__,
        "version": PREPROCESS_VERSION,
    }


# ---------------------------------------------------------------- preparing images


def default_workers() -> int:
    """Every usable core (affinity and the container's CPU quota), but no more workers than
    the free memory holds at ``WORKER_MEMORY`` each (the peak of one worker decoding the
    largest photo it accepts)."""
    cores = usable_cores()
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return cores
    return max(1, min(cores, free // WORKER_MEMORY))


def _prepare_one(
    path: str | os.PathLike, size: int, graham: bool, max_bytes: int = MAX_FILE_BYTES
) -> tuple[bytes | None, str | None]:
    """(jpeg bytes, None) or (None, reason)."""
    try:
        return prepare(path, size, graham=graham, force=True, max_bytes=max_bytes), None
    except BadImage as err:
        return None, err.reason
    except Exception as err:  # a file PIL chokes on in a way of its own: reject, go on
        return None, f"unreadable ({type(err).__name__}: {err})"


def _prepare_task(
    paths: list[str], size: int, graham: bool, measure: list[bool], max_bytes: int
) -> list[tuple[bytes | None, str | None, list[int] | None]]:
    """Pool task: ``_prepare_one`` of each path, with the channel sums of those to ``measure``
    (train images: ``channelstats``, taken here in the worker)."""
    out = []
    for path, wanted in zip(paths, measure, strict=True):
        data, reason = _prepare_one(path, size, graham, max_bytes)
        out.append((data, reason, channelstats.image_sums(data) if data and wanted else None))
    return out


class _Preparer:
    """Prepared bytes for a stream of samples, in order, with a bounded number in flight.

    Pass-through files are read here; the rest go to the pool (or are decoded here when
    there is none).
    """

    def __init__(
        self,
        size: int,
        graham: bool,
        pool: ProcessPoolExecutor | None,
        workers: int,
        max_bytes: int = MAX_FILE_BYTES,
    ):
        self.size, self.graham, self.pool, self.workers = size, graham, pool, workers
        self.max_bytes = max_bytes

    def run(
        self, samples: Iterable[Sample]
    ) -> Iterator[tuple[Sample, bytes | None, str | None, list[int] | None]]:
        """(sample, prepared bytes or None, reject reason or None, the train image's channel
        sums or None), in the order of ``samples``."""
        pending: deque = deque()
        for batch in _batched(samples, TASK_SIZE):
            ready = [
                None if self.graham else passthrough_bytes(s.path, self.size, self.max_bytes)
                for s in batch
            ]
            todo = [s for s, data in zip(batch, ready, strict=True) if data is None]
            paths = [str(s.path) for s in todo]
            measure = [s.split == "train" for s in todo]
            pending.append(
                (
                    batch,
                    ready,
                    _start(
                        self.pool,
                        _prepare_task,
                        paths,
                        self.size,
                        self.graham,
                        measure,
                        self.max_bytes,
                    )
                    if paths
                    else None,
                )
            )
            while len(pending) > self.workers * TASKS_AHEAD:
                yield from _resolve(*pending.popleft())
        while pending:
            yield from _resolve(*pending.popleft())


def _resolve(
    batch, ready, job
) -> Iterator[tuple[Sample, bytes | None, str | None, list[int] | None]]:
    results = iter(_result(job) if job else ())
    for sample, data in zip(batch, ready, strict=True):
        yield (sample, data, None, None) if data is not None else (sample, *next(results))


@contextmanager
def _pool(workers: int, out: Path) -> Iterator[ProcessPoolExecutor | None]:
    """A process pool of ``workers`` writing into ``out``, or None for one worker (everything
    runs here).

    Forked when this process runs no other thread: a forked worker starts in milliseconds,
    a spawned one re-imports numpy and PIL (about a second). Every forked worker is started
    here, before the progress bar starts its thread. With other threads about (a caller's),
    forking could copy a lock some thread holds, so the workers are spawned.
    """
    if workers <= 1:
        yield None
        return
    fork = sys.platform == "linux" and threading.active_count() == 1
    pool = None
    try:
        pool = ProcessPoolExecutor(
            workers,
            mp_context=get_context("fork" if fork else "spawn"),
            initializer=_worker_init,
            initargs=(os.getpid(),),
        )
        if fork:
            # The workers never collect what they inherit: garbage of this process (a DALI
            # pipeline left unreachable) finalised in a worker, where its threads don't exist, hangs.
            gc.freeze()
            # Ctrl-C or `kill` while forking would raise inside Python's after-fork hooks, which
            # swallow it: the run would go on. Held back until the workers exist, it lands here.
            held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                pool.submit(int)  # a fork pool forks all its workers at its first task
            finally:
                gc.unfreeze()
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        yield pool
        pool.shutdown(wait=True, cancel_futures=True)
    except BaseException:
        # Interrupted (Ctrl-C, `kill`) or failed, in any phase, even while the workers were
        # being started: stop them now rather than wait for the shards they are writing, and
        # remove the temp files they leave (their pids are gone: stale). The pool itself is left as it is: a worker
        # killed while sending a result leaves the pool's manager thread waiting for the rest
        # for ever, and its shutdown, or the interpreter's exit, would wait on that thread.
        if pool is not None:
            abandon_threads()
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a second Ctrl-C waits
        try:
            _kill_workers()
            for leftover in stale_partials(out):
                leftover.unlink(missing_ok=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise


def _kill_workers() -> None:
    """SIGKILL every child process and reap it: none is left running, none a zombie."""
    workers = multiprocessing.active_children()
    for child in workers:
        child.kill()
    for child in workers:
        child.join()


def _worker_init(parent: int) -> None:
    """In each worker: die with the main process, whatever kills it (even SIGKILL)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the CLI's handler, inherited by fork
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # Ctrl-C reaches the whole group: the main process stops us
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held back while it was forked
    if sys.platform == "linux":
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the main process died before the line above
        os._exit(1)


def _start(pool: ProcessPoolExecutor | None, fn, *args) -> Future | partial:
    """``fn(*args)`` in the pool, or, without one, a call made here when its result is asked for."""
    return pool.submit(fn, *args) if pool else partial(fn, *args)


def _result(job: Future | partial):
    return job.result() if isinstance(job, Future) else job()


def _batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


# ---------------------------------------------------------------- writing


class _NeedsDecoding(Exception):
    pass


def _pack_originals(path: Path, chunk: _Chunk, size: int) -> dict | None:
    """Pool task: the chunk's shard from its files' bytes as they are, and its record entry.

    None, and no shard written, as soon as an image is not pass-through: the chunk then
    goes image by image through the pool, so one odd file in a shard never leaves a whole
    shard's decoding to one worker. What was read until then is all that is lost.
    """

    def originals():
        for sample in chunk.samples:
            data = passthrough_bytes(sample.path, size)
            if data is None:
                raise _NeedsDecoding
            yield sample, data, None, None

    try:
        return _write_chunk(path, chunk, originals())
    except _NeedsDecoding:
        return None


def _write_chunk(path: Path, chunk: _Chunk, prepared: Iterator) -> dict:
    """Write one shard from the next ``len(chunk.samples)`` prepared samples; its record entry."""
    counts = [0] * NUM_CLASSES
    rejects: list[tuple[str, str]] = []
    sums = list(channelstats.ZERO)

    def accepted():
        nonlocal sums
        for expected in chunk.samples:
            sample, data, reason, image_sums = next(prepared)
            assert sample is expected, "prepared samples out of order"
            if data is None:
                rejects.append((sample.key, reason, sample.source))
                continue
            counts[sample.label] += 1
            if chunk.split == "train":  # measured in the worker, or here for pass-through bytes
                sums = channelstats.add(sums, image_sums or channelstats.image_sums(data))
            yield sample.key, data, sample.label

    samples = accepted()
    first = next(samples, None)
    info = None
    if first is not None:  # a chunk whose every image was rejected writes no shard
        info = write_shard(path, itertools.chain([first], samples), fsync=False)
    return {
        "fingerprint": chunk.fingerprint,
        "shard": asdict(info) if info else None,
        "index_sha256": file_sha256(path.with_suffix(INDEX_SUFFIX)) if info else None,
        "class_counts": counts,
        "rejects": rejects,
        "channel_sums": sums,
    }


def _can_reuse(out: Path, entry: dict | None, fingerprint: str) -> bool:
    """Whether an earlier run's shard was made from the same inputs and is still intact."""
    if not entry or entry.get("fingerprint") != fingerprint or "channel_sums" not in entry:
        return False
    shard = entry.get("shard")
    if shard is None:
        return True
    tar, idx = out / shard["file"], out / shard["index"]
    try:
        if tar.stat().st_size != shard["bytes"] or not idx.is_file():
            return False
        return file_sha256(tar) == shard["sha256"] and file_sha256(idx) == entry["index_sha256"]
    except (OSError, KeyError):
        return False


def _load_record(out: Path) -> dict:
    try:
        record = json.loads((out / PROGRESS_NAME).read_text())
        return record["shards"] if record.get("version") == PREPROCESS_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _save_record(out: Path, shards: dict) -> None:
    atomic_write_json(
        out / PROGRESS_NAME, {"version": PREPROCESS_VERSION, "shards": shards}, indent=None
    )


def _make_out_dir(out: Path) -> Path:
    """Create the output folder and check that it is writable."""
    try:
        make_writable_dir(out)
    except OSError as err:
        raise UserError(f"cannot write to output folder {out}: {err.strerror or err}") from None
    return out.resolve()


def _clear_out_dir(out: Path) -> None:
    """Remove what would mislead: the manifest of the build being replaced, and temp files
    of runs that were killed (a live run's are never touched: their pids still run)."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for leftover in stale_partials(out):
        leftover.unlink(missing_ok=True)


def _remove_stale(out: Path, keep: set[str]) -> None:
    for path in out.iterdir():
        if _SHARD_FILE.match(path.name) and path.name not in keep:
            path.unlink()


def _write_rejects(out: Path, rejects: list[tuple[str, str]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "reason", "path"])  # path: the file, where one was found
            # the names come from the user's files: formula-safe for a spreadsheet
            writer.writerows([safe_cell(c) for c in (*r, "")[:3]] for r in rejects)

    atomic_write(out / REJECTS_NAME, write)


def _strict_error(rejects: list, out: Path) -> UserError:
    n = len(rejects)
    return UserError(
        f"{n} input{'s were' if n != 1 else ' was'} rejected (--strict), see {out / REJECTS_NAME}"
    )


def _config_dict(cfg: PackConfig) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}


def _options_line(cfg: PackConfig) -> str:
    """The run in words for the log: the folders and the options that differ from their
    defaults, as they would be typed (manifest.json records every setting)."""
    typed = []
    for f in fields(cfg):
        if "help" not in f.metadata or f.metadata["positional"]:
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        value = getattr(cfg, f.name)
        if value != default:
            flag = "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))
            typed.append(flag if value is True else f"{flag} {value}")
    return f"{cfg.data_dir} -> {cfg.out_dir}" + (f" ({' '.join(typed)})" if typed else "")


# ---------------------------------------------------------------- reporting


def _progress(console: Console, quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=True,
    )


def summary_table(result: PackResult, out: Path) -> Table:
    """Packed samples per split and grade, shards per split, rejects by reason."""
    source = result.manifest.source
    table = Table(title=f"shards in {out} ({source.get('layout')} layout)")
    table.add_column("split", no_wrap=True)
    for grade in range(NUM_CLASSES):
        table.add_column(f"grade {grade}", justify="right")
    table.add_column("total", justify="right")
    table.add_column("shards", justify="right")
    for split in SPLITS:
        entry = result.manifest.splits[split]
        table.add_row(
            split, *map(str, entry.class_counts), str(entry.samples), str(len(entry.shards))
        )
    for kind, n in result.manifest.report["rejected_by_reason"].items():
        table.add_row(f"rejected: {kind}", *[""] * NUM_CLASSES, str(n), "", style="red")
    notes = list(source.get("notes", []))
    notes += [f"no {split} split" for split in SPLITS if not result.manifest.has(split)]
    if result.reused_shards:
        notes.append(f"{result.reused_shards} shard(s) reused from an earlier run")
    table.caption = "; ".join(notes) or None
    return table
