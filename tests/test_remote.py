"""Shards in a bucket or on a web server (pipeline/remote.py): a real S3-compatible server
(moto's) and a plain http.server, both on 127.0.0.1 only, started and stopped here."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import STRAIGHT_RECIPE, TRAIN, free_port, launch, python, run_env

from pipeline.constants import MANIFEST_NAME
from pipeline.errors import UserError
from pipeline.fileio import file_sha256
from pipeline.remote import Mirror, cache_folder, local_shards, shown, upload_shards

pytest.importorskip("s3fs", reason="the cloud extra (s3fs) is not installed")
SECRET = "not-a-real-secret-4b1d"  # must never appear in any output or file
BUCKET = "dr-shards"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port, and the environment that points at it."""
    server = Path(sys.executable).parent / "moto_server"
    if not server.exists():
        pytest.skip("moto[server] is not installed (the dev extra has it)")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out
        )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        deadline = time.monotonic() + 30
        while True:  # bounded wait for the server to answer
            try:
                s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.skip(f"moto_server did not start: {log.read_text()[-500:]}")
                time.sleep(0.3)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def uploaded(s3, tiny_shards) -> str:
    """tiny_shards uploaded to the bucket by make_shards' own uploader."""
    url = f"s3://{BUCKET}/tiny"
    upload_shards(tiny_shards, url, quiet=True)
    return url


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".tar", ".idx"))
    assert names == sorted(p.name for p in b.iterdir() if p.suffix in (".tar", ".idx"))
    for name in [*names, MANIFEST_NAME]:
        assert file_sha256(a / name) == file_sha256(b / name), name


def test_a_bucket_is_copied_once_and_verified(uploaded, tiny_shards, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    folder = local_shards(uploaded, cache, quiet=True)
    assert folder == cache_folder(uploaded, cache) and folder.is_relative_to(cache)
    same_files(folder, tiny_shards)
    fetched = []
    original = Mirror._fetch
    monkeypatch.setattr(Mirror, "_fetch", lambda self, w: fetched.append(w) or original(self, w))
    assert local_shards(uploaded, cache, quiet=True) == folder
    assert fetched == []  # the second run downloads nothing
    (folder / "train-000000.tar").write_bytes(b"damaged")  # a damaged copy is fetched again
    local_shards(uploaded, cache, quiet=True)
    assert [w["name"] for w in fetched] == ["train-000000.tar"]
    same_files(folder, tiny_shards)


def test_a_flipped_byte_names_the_shard(s3, tiny_shards, tmp_path):
    import s3fs

    url = f"s3://{BUCKET}/flipped"
    upload_shards(tiny_shards, url, quiet=True)
    data = bytearray((tiny_shards / "test-000000.tar").read_bytes())
    data[1000] ^= 0xFF
    s3fs.S3FileSystem(skip_instance_cache=True).pipe_file(
        f"{BUCKET}/flipped/test-000000.tar", bytes(data)
    )
    with pytest.raises(UserError) as err:
        local_shards(url, tmp_path / "cache", quiet=True)
    message = str(err.value)
    assert "test-000000.tar" in message and "sha256" in message and "\n" not in message
    # nothing unverified is left where a reader would take it
    folder = cache_folder(url, tmp_path / "cache")
    assert not (folder / "test-000000.tar").exists() and not (folder / MANIFEST_NAME).exists()


def test_the_manifest_is_uploaded_last(s3, tiny_shards, monkeypatch):
    import s3fs

    order = []
    real_put, real_pipe = s3fs.S3FileSystem._put_file, s3fs.S3FileSystem._pipe_file

    async def put(self, lpath, rpath, *a, **k):  # the async methods the sync ones wrap
        order.append(Path(rpath).name)
        return await real_put(self, lpath, rpath, *a, **k)

    async def pipe(self, path, value, *a, **k):
        order.append(Path(path).name)
        return await real_pipe(self, path, value, *a, **k)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", put)
    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", pipe)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached instance holds the methods it began with
    upload_shards(tiny_shards, f"s3://{BUCKET}/order", quiet=True)
    assert order[-1] == MANIFEST_NAME and order.count(MANIFEST_NAME) == 1
    assert {n for n in order if n.endswith(".tar")} == {p.name for p in tiny_shards.glob("*.tar")}


def test_make_shards_uploads_to_a_bucket(s3, tmp_path):
    """make_shards DATA s3://... packs locally, uploads, and --verify checks the bucket."""
    import s3fs

    data = tmp_path / "data"
    python("tools/make_synthetic.py", "--out", data, "--n", "24", "--size", "96", tmp=tmp_path)
    url = f"s3://{BUCKET}/packed"
    env = {**s3, "DR_SHARD_CACHE": str(tmp_path / "cache")}
    python("tools/make_shards.py", data, url, "--size", "64", "--quiet", tmp=tmp_path, **env)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    manifest = json.loads(fs.cat_file(f"{BUCKET}/packed/{MANIFEST_NAME}"))
    assert sum(s["samples"] for s in manifest["splits"].values()) > 0
    proc = python("tools/make_shards.py", "--verify", url, tmp=tmp_path, **env)
    assert "verified" in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr


def test_training_from_a_bucket_matches_the_local_folder(uploaded, straight_run, tmp_path, s3):
    """The same run from s3:// ends with the weights of the run from the folder it was
    uploaded from; no credential is printed or stored."""
    out = tmp_path / "run"
    proc = launch(
        TRAIN, "--shards", uploaded, "--cache", tmp_path / "cache", "--out", out,
        *STRAIGHT_RECIPE, tmp=tmp_path, env=run_env(tmp_path, **s3),
    )  # fmt: skip
    remote = json.loads((out / "summary.json").read_text())
    local = json.loads((straight_run / "summary.json").read_text())
    assert remote["weights_sha256_per_rank"] == local["weights_sha256_per_rank"]
    assert remote["test_at_best_epoch"] == local["test_at_best_epoch"]
    config = (out / "config.json").read_text()
    assert json.loads(config)["shards_source"] == uploaded
    for text in (config, proc.stdout, proc.stderr):
        assert SECRET not in text


@contextmanager
def serving(folder: Path):
    """http.server serving ``folder`` on a free loopback port, stopped on the way out."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def web_server(tiny_shards):
    pytest.importorskip("aiohttp", reason="fsspec's http filesystem needs aiohttp")
    with serving(tiny_shards) as url:
        yield url


def test_a_run_from_a_web_server_trains(web_server, tiny_shards, tmp_path):
    out = tmp_path / "run"
    launch(
        TRAIN, "--shards", web_server, "--cache", tmp_path / "cache", "--out", out,
        *STRAIGHT_RECIPE, "--epochs", "1", tmp=tmp_path,
    )  # fmt: skip
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    same_files(cache_folder(web_server, tmp_path / "cache"), tiny_shards)


def test_a_url_is_shown_without_its_password():
    assert shown("https://user:pw@host:8443/a/b") == "https://host:8443/a/b"
    assert shown("s3://bucket/prefix") == "s3://bucket/prefix"


def test_a_remote_manifest_cannot_name_files_outside_its_folder(tmp_path, tiny_shards):
    """A hostile manifest (`../x.tar`) is refused before anything is written."""
    served = tmp_path / "served"
    shutil.copytree(tiny_shards, served)
    manifest = json.loads((served / MANIFEST_NAME).read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = "../escaped.tar"
    (served / MANIFEST_NAME).write_text(json.dumps(manifest))
    pytest.importorskip("aiohttp", reason="fsspec's http filesystem needs aiohttp")
    with serving(served) as url, pytest.raises(UserError, match="outside its folder"):
        local_shards(url, tmp_path / "cache", quiet=True)
    assert not (tmp_path / "escaped.tar").exists()
