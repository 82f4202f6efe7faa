"""Files written so that a kill, a full disk or a second writer never leaves a lie behind.

- Atomic writes: a temp name beside the target, then one rename. A reader (or a rerun after
  a kill) sees the old file or the new one, never half of one. Temp names carry the host
  and pid of their writer (``.NAME.HOST.PID.partial``), so two writers never share one and
  a leftover can be traced to a run that is gone (``stale_partials``).
- A full disk is one sentence, ``no space left on device while writing FILE`` (a UserError),
  wherever it happens (``reporting_disk_full``).
- ``folder_lock``: one writer per folder, a lock file naming the holder.
- ``inside``: every output path whose name comes from data (a shard key, a photo's name) is
  resolved and refused if it lands outside its output folder.
- ``staged_outputs``: a command's outputs written into a hidden folder beside them and moved
  in together at the end, so an interrupted run leaves the previous outputs or none.
- ``safe_cell``: a CSV cell a spreadsheet shows as text, never runs as a formula.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import html
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import UserError

HOST = socket.gethostname()
LOCK_NAME = ".lock"


def partial_path(path: Path) -> Path:
    """Where ``path`` is written by this process before it is renamed into place."""
    return path.with_name(f".{path.name}.{HOST}.{os.getpid()}.partial")


def stale_partials(folder: Path) -> list[Path]:
    """Temp files in ``folder`` left by processes of this host that no longer run."""
    stale = []
    for path in folder.glob(".*.partial"):
        stem, _, pid = path.name[: -len(".partial")].rpartition(".")
        if pid.isdigit() and stem.endswith(f".{HOST}") and not pid_alive(int(pid)):
            stale.append(path)
    return stale


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


@contextmanager
def reporting_disk_full(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into one sentence naming the file."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on device while writing {path}") from None
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills the temp file, which then replaces ``path``."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        with reporting_disk_full(path):
            write(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def make_writable_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and prove a file can be written in it; OSError if not."""
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test.{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
    return path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- one writer per folder


def _holder(fd: int) -> tuple[int, str] | None:
    """(pid, host) written in a lock file, or None if it is empty or unreadable."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        text = os.read(fd, 4096).decode()
        info = json.loads(text) if text.strip() else None
        return (int(info["pid"]), str(info["host"])) if info else None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def _describe(tool: str, holder: tuple[int, str] | None) -> str:
    if holder is None:
        return f"another {tool}"
    pid, host = holder
    return f"another {tool} (pid {pid}{'' if host == HOST else f' on {host}'})"


@contextmanager
def folder_lock(folder: Path, tool: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` for one run of ``tool``, or fail at once.

    ``flock`` on ``FOLDER/.lock``, which holds the holder's pid and host: the kernel drops
    the lock when the holder dies, however it dies, and the file tells a second run who
    holds it. Finding a holder's name in a lock nobody holds means a run was killed: its
    lock is taken over with a warning. The file is emptied, not removed, on the way out
    (removing it would let two runs lock two different files).
    """
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{_describe(tool, _holder(fd))} is writing to {folder}") from None
        previous = _holder(fd)
        if previous is not None and previous != (os.getpid(), HOST):
            print(
                f"warning: took over the lock of {folder} left by {_describe(tool, previous)[8:]}, "
                "which is no longer running",
                file=sys.stderr,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": HOST, "tool": tool}).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def folder_busy(folder: Path, tool: str) -> str | None:
    """Who holds ``folder_lock`` on ``folder`` now, as a phrase; None when nobody does."""
    path = folder / LOCK_NAME
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(tool, _holder(fd))
        return None
    finally:
        os.close(fd)


# ---------------------------------------------------------------- names from data


def inside(folder: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` (relative to ``folder`` or absolute) if it resolves inside ``folder``, else a
    UserError: a name read from a shard or a photo never writes outside its output folder."""
    root = Path(folder).resolve()
    target = (root / path).resolve()
    if target == root or root not in target.parents:
        raise UserError(f"refusing to write {path}: it resolves outside the folder {folder}")
    return target


def check_out_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """``path`` as an output folder: a UserError at once (before any work) if it names
    something that is not a folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a folder; name a folder to write into")
    return path


def own_entries(folder: Path) -> list[str]:
    """The names in ``folder`` other than a lock and temp files of this project's writers
    (what a user put there or a run wrote); empty for a missing folder."""
    if not folder.is_dir():
        return []
    return sorted(
        p.name for p in folder.iterdir() if p.name != LOCK_NAME and not p.name.endswith(".partial")
    )


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait until the block ends (a few renames): Ctrl-C never
    lands half-way through moving a set of outputs into place."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def staged_outputs(out: str | os.PathLike, last: str | None = None) -> Iterator[Path]:
    """A hidden folder inside ``out`` (``.staged.HOST.PID.partial``) to write a command's
    outputs into; when the block ends they replace their namesakes in ``out`` together
    (signals held, ``last`` renamed last, after the old ``last`` was removed first), and an
    exception or a signal before then leaves ``out`` as it was."""
    out = Path(out)
    stage = out / f".staged.{HOST}.{os.getpid()}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        with reporting_disk_full(out):
            yield stage
            with signals_held():
                _move_in(stage, out, last)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _move_in(stage: Path, out: Path, last: str | None) -> None:
    names = sorted(p.name for p in stage.iterdir())
    if last in names:  # the marker of a complete set goes first and comes back last
        (out / last).unlink(missing_ok=True)
        names = [n for n in names if n != last] + [last]
    for name in names:
        target = out / name
        if (stage / name).is_dir() and target.is_dir() and not target.is_symlink():
            old = out / f".{name}.{HOST}.{os.getpid()}.old"
            os.rename(target, old)
            os.rename(stage / name, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage / name, target)


# ---------------------------------------------------------------- cells for people

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value):
    """``value`` as a CSV cell a spreadsheet cannot execute: text starting with ``= + - @``,
    a tab or a carriage return gets a leading ``'`` (the OWASP rule), unless it is a number
    (``-0.5`` stays a number). Anything not a string is returned as it is."""
    if not isinstance(value, str) or not value.startswith(_FORMULA_START):
        return value
    try:
        float(value)
    except ValueError:
        return "'" + value
    return value


def md_cell(text) -> str:
    """``text`` for a markdown table cell: HTML escaped (a folder named ``<img src=x
    onerror=...>`` shows as text in a rendered page) and ``|`` kept from splitting the cell."""
    return html.escape(str(text)).replace("|", "\\|").replace("\n", " ")
