"""Shard folders in a bucket or on a web server, read through a node-local cache.

    --shards s3://bucket/prefix     (s3fs: AWS_ENDPOINT_URL, AWS_PROFILE, instance roles)
    --shards gs://bucket/prefix     (gcsfs: Google's application-default credentials)
    --shards https://host/path      (plain HTTP(S), e.g. a folder served by any web server)

``local_shards(spec, cache)`` returns a local folder for a ``--shards`` value: a local path
as it is, a URL as its copy under the cache (``--cache``, else ``$DR_SHARD_CACHE``, else
``~/.cache/dr-grader/shards``). The copy is made once per node: the processes of one node
take a file lock on it, the first downloads while the others wait, and each file is
checked against the remote ``manifest.json`` (size and sha256 for every tar; each index's
sample count) before it is renamed into place, so the loaders of both backends read the
same verified bytes a local folder would give them. The manifest is written last; a later
run finds every file already verified (``.verified.json``: name, size, sha256, mtime) and
downloads nothing. Endpoint and credentials come from the filesystem's own chain: no option
of ours carries them, and a URL is never printed with a user or password in it.

``upload_shards(folder, url)`` is the other direction (``make_shards DATA s3://...``):
every tar and index uploaded and read back to check its size and sha256, the manifest last,
so a half-uploaded prefix never holds a manifest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipeline.constants import MANIFEST_NAME, REJECTS_NAME
from pipeline.errors import UserError
from pipeline.fileio import HOST, atomic_write_bytes, file_sha256
from pipeline.samplelist import SAMPLES_NAME

SCHEMES = ("s3", "gs", "http", "https")
CACHE_ENV = "DR_SHARD_CACHE"
CACHE_HELP = (
    "node-local cache for s3://, gs:// and http(s):// shard folders "
    "(default: $DR_SHARD_CACHE, else ~/.cache/dr-grader/shards)"
)
DEFAULT_CACHE = Path("~/.cache/dr-grader/shards")
VERIFIED_NAME = ".verified.json"
OPTIONAL = (SAMPLES_NAME, REJECTS_NAME)  # copied when the remote folder has them
RETRIES = 4  # tries per file after the first, on connection errors
BACKOFF_S = 1.0  # the first wait; doubled after each failed try
CHUNK = 1 << 22


def is_remote(spec: str | os.PathLike) -> bool:
    """Whether a --shards value names a bucket or a web server rather than a local folder."""
    return isinstance(spec, str) and urlsplit(spec).scheme in SCHEMES and "://" in spec


def shown(url: str) -> str:
    """``url`` as it may be printed or stored: without a user or password."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))


def cache_root(cache: str | os.PathLike | None) -> Path:
    """--cache, else $DR_SHARD_CACHE, else ~/.cache/dr-grader/shards."""
    chosen = cache or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(chosen).expanduser()


def cache_folder(url: str, cache: str | os.PathLike | None) -> Path:
    """The cache's folder for ``url``: readable, and distinct for distinct URLs."""
    parts = urlsplit(shown(url))
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in parts.netloc + parts.path)
    digest = hashlib.sha256(shown(url).encode()).hexdigest()[:12]
    return cache_root(cache) / f"{parts.scheme}_{readable.strip('_.')[:80]}_{digest}"


def local_shards(
    spec: str | os.PathLike, cache: str | os.PathLike | None = None, quiet: bool = False
) -> Path:
    """A local folder holding the shards ``spec`` names (see the module's docstring)."""
    if not is_remote(spec):
        return Path(spec)
    folder = cache_folder(str(spec), cache)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"cannot create the shard cache {folder} ({err.strerror}); set --cache"
        ) from None
    with node_lock(folder):
        Mirror(str(spec), folder, quiet).sync()
    return folder


@contextmanager
def node_lock(folder: Path) -> Iterator[None]:
    """One process of this node fills ``folder`` at a time; the others wait their turn."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: the ranks of a node queue here
        yield
    finally:
        os.close(fd)


def filesystem(url: str):
    """The fsspec filesystem and path for ``url``; a clear error where its package is missing."""
    try:
        import fsspec
    except ImportError:
        raise UserError(_install_hint(url)) from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        raise UserError(_install_hint(url)) from None


def _install_hint(url: str) -> str:
    return (
        f"reading {urlsplit(url).scheme}:// shards needs the cloud extra: "
        'pip install -e ".[cloud]" (fsspec, s3fs, gcsfs, aiohttp)'
    )


def retried(what: str, fn: Callable[[], object]) -> object:
    """``fn()``, tried again with a doubling wait when the connection fails."""
    wait = BACKOFF_S
    for attempt in range(RETRIES + 1):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, UserError):
            raise
        except Exception as err:  # the filesystems raise their clients' own connection errors
            if attempt == RETRIES:
                raise UserError(
                    f"could not read {what} after {RETRIES + 1} tries ({err})"
                ) from None
            print(
                f"warning: reading {what} failed ({type(err).__name__}); retrying in {wait:.0f} s",
                file=sys.stderr,
            )
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


class Mirror:
    """The cache folder of one remote shard folder, brought up to date by ``sync``."""

    def __init__(self, url: str, folder: Path, quiet: bool):
        self.url, self.folder, self.quiet = url, folder, quiet
        self.fs, self.root = filesystem(url)
        self.verified = self._read_verified()

    def sync(self) -> None:
        raw = retried(f"{shown(self.url)}/{MANIFEST_NAME}", lambda: self._cat(MANIFEST_NAME))
        manifest = self._parse(raw)
        changed = not self._same_manifest(raw)
        if changed:  # until the new one is whole, the folder has no manifest that could lie
            (self.folder / MANIFEST_NAME).unlink(missing_ok=True)
        missing = [f for f in self._wanted(manifest) if not self._current(f)]
        if missing:
            self._download(missing)
        for name in OPTIONAL:
            if changed or not (self.folder / name).is_file():
                self._copy_optional(name)
        if changed:  # last: a folder with a manifest is a whole one
            atomic_write_bytes(self.folder / MANIFEST_NAME, raw)

    # -- what the manifest asks for

    def _parse(self, raw: bytes) -> dict:
        try:
            manifest = json.loads(raw)
            manifest["splits"].items()
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{shown(self.url)}/{MANIFEST_NAME} is not a shard manifest") from None
        return manifest

    def _wanted(self, manifest: dict) -> list[dict]:
        """Per tar and index: name, and for tars the size and sha256 the manifest gives."""
        files = []
        try:
            for split in manifest["splits"].values():
                for shard in split["shards"]:
                    tar, index = _plain(shard["file"]), _plain(shard["index"])
                    files.append(
                        {"name": tar, "bytes": int(shard["bytes"]), "sha256": shard["sha256"]}
                    )
                    files.append({"name": index, "samples": int(shard["samples"])})
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(
                f"{shown(self.url)}/{MANIFEST_NAME} has a malformed shard entry ({err})"
            ) from None
        return files

    def _current(self, want: dict) -> bool:
        """Whether the cache already holds this file as the manifest describes it."""
        path = self.folder / want["name"]
        seen = self.verified.get(want["name"])
        if not path.is_file() or not seen:
            return False
        stat = path.stat()
        same_file = seen.get("size") == stat.st_size and seen.get("mtime_ns") == stat.st_mtime_ns
        if "sha256" in want:
            return (
                same_file and seen.get("sha256") == want["sha256"] and stat.st_size == want["bytes"]
            )
        return same_file and seen.get("samples") == want["samples"]

    # -- downloading

    def _download(self, files: list[dict]) -> None:
        total = sum(f.get("bytes", 0) for f in files)
        began = time.perf_counter()
        with _progress(self.quiet, len(files), total, shown(self.url)) as advance:
            for want in files:
                got = retried(f"{shown(self.url)}/{want['name']}", lambda w=want: self._fetch(w))
                self._check(want, got)
                os.replace(got, self.folder / want["name"])
                self._remember(want)
                advance(want.get("bytes", 0))
        if not self.quiet:
            seconds = time.perf_counter() - began
            print(
                f"shard cache: {len(files)} file(s), {total / 1e6:.1f} MB from {shown(self.url)} "
                f"in {seconds:.1f} s -> {self.folder}",
                file=sys.stderr,
            )

    def _fetch(self, want: dict) -> Path:
        """Download one file under a temp name of this process; return that path."""
        tmp = self.folder / f".{want['name']}.{HOST}.{os.getpid()}.partial"
        self.fs.get_file(self._remote(want["name"]), str(tmp))
        return tmp

    def _check(self, want: dict, got: Path) -> None:
        """The downloaded file is the one the manifest describes, or one line naming it."""
        problem = None
        if "sha256" in want:
            size = got.stat().st_size
            if size != want["bytes"]:
                problem = f"is {size} bytes, the manifest says {want['bytes']}"
            elif file_sha256(got) != want["sha256"]:
                problem = "does not match the sha256 in its manifest"
        else:
            problem = _index_problem(got, want["samples"])
        if problem:
            got.unlink(missing_ok=True)
            raise UserError(
                f"shard {want['name']} of {shown(self.url)} {problem}: the remote copy is corrupt "
                "or truncated; upload that folder again"
            )

    def _copy_optional(self, name: str) -> None:
        try:
            data = retried(f"{shown(self.url)}/{name}", lambda: self._cat(name))
        except FileNotFoundError:
            return
        tmp = self.folder / f".{name}.{HOST}.{os.getpid()}.partial"
        tmp.write_bytes(data)
        os.replace(tmp, self.folder / name)

    # -- the cache's own record

    def _read_verified(self) -> dict:
        try:
            return json.loads((self.folder / VERIFIED_NAME).read_text())
        except (OSError, ValueError):
            return {}

    def _remember(self, want: dict) -> None:
        stat = (self.folder / want["name"]).stat()
        self.verified[want["name"]] = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            **{k: want[k] for k in ("sha256", "samples") if k in want},
        }
        tmp = self.folder / f"{VERIFIED_NAME}.{os.getpid()}.partial"
        tmp.write_text(json.dumps(self.verified, indent=1))
        os.replace(tmp, self.folder / VERIFIED_NAME)

    def _same_manifest(self, raw: bytes) -> bool:
        try:
            return (self.folder / MANIFEST_NAME).read_bytes() == raw
        except OSError:
            return False

    def _remote(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _cat(self, name: str) -> bytes:
        return self.fs.cat_file(self._remote(name))


def _plain(name: object) -> str:
    """A file name from a remote manifest, refused unless it is a plain name in the folder."""
    if not isinstance(name, str) or not name or name != Path(name).name or name.startswith("."):
        raise UserError(f"the remote manifest names a file outside its folder: {name!r}")
    return name


def _index_problem(path: Path, samples: int) -> str | None:
    """Why a downloaded .idx is not the index of a ``samples``-sample shard, or None."""
    try:
        head = path.read_text().split("\n", 1)[0].split()
        count = int(head[1])
    except (OSError, UnicodeDecodeError, IndexError, ValueError):
        return "is not a shard index"
    if count != samples:
        return f"lists {count} samples, the manifest says {samples}"
    return None


@contextmanager
def _progress(quiet: bool, files: int, total: int, source: str) -> Iterator[Callable[[int], None]]:
    """A progress bar over the bytes downloaded (on a terminal); a no-op otherwise."""
    if quiet or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(f"{files} file(s) from {source}", total=total or None)
        yield lambda n: bar.advance(task, n)


# ---------------------------------------------------------------- uploading


def upload_shards(folder: Path, url: str, quiet: bool = False) -> int:
    """Upload a finished local shard folder to ``url``: tars and indexes verified by reading
    them back, rejects/samples tables, and the manifest last. Returns the files uploaded."""
    fs, root = filesystem(url)
    raw = (folder / MANIFEST_NAME).read_bytes()
    manifest = json.loads(raw)
    names = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            names += [(shard["file"], shard["sha256"]), (shard["index"], None)]
    names += [(n, None) for n in OPTIONAL if (folder / n).is_file()]
    root = root.rstrip("/")
    began = time.perf_counter()
    with _progress(
        quiet, len(names), sum((folder / n).stat().st_size for n, _ in names), shown(url)
    ) as advance:
        for name, sha in names:
            local = folder / name
            retried(
                f"{shown(url)}/{name}", lambda n=name, p=local: fs.put_file(str(p), f"{root}/{n}")
            )
            _check_uploaded(fs, f"{root}/{name}", local, sha or file_sha256(local), shown(url))
            advance(local.stat().st_size)
    retried(f"{shown(url)}/{MANIFEST_NAME}", lambda: fs.pipe_file(f"{root}/{MANIFEST_NAME}", raw))
    if not quiet:
        print(
            f"uploaded {len(names) + 1} files to {shown(url)} in {time.perf_counter() - began:.1f} s"
        )
    return len(names) + 1


def _check_uploaded(fs, remote: str, local: Path, sha: str, where: str) -> None:
    """The object now at ``remote`` has ``local``'s size and sha256, or one line saying not."""
    digest = hashlib.sha256()
    with fs.open(remote, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    if fs.size(remote) != local.stat().st_size or digest.hexdigest() != sha:
        raise UserError(f"{local.name} did not arrive whole at {where}; run make_shards again")
