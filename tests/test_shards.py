"""The shard format: write_shard, the index, the manifest reader and verifier."""

import json
import subprocess

import pytest
import webdataset as wds

from pipeline.errors import UserError
from pipeline.manifest import read_manifest, verify_split
from pipeline.shardformat import write_shard


def test_index_equals_wds2idx(tiny_shards, wds2idx, tmp_path):
    manifest = read_manifest(tiny_shards)
    for tar, idx in zip(manifest.tar_paths("train"), manifest.index_paths("train"), strict=True):
        ref = tmp_path / (tar.stem + ".ref.idx")
        subprocess.run([wds2idx, str(tar), str(ref)], check=True, capture_output=True)
        assert ref.read_text() == idx.read_text()


def test_round_trip_with_webdataset(tiny_shards):
    manifest = read_manifest(tiny_shards)
    for split in ("train", "test"):
        urls = [str(p) for p in manifest.tar_paths(split)]
        samples = list(wds.WebDataset(urls, shardshuffle=False))
        assert len(samples) == manifest.split(split).samples
        labels = [int(s["cls"]) for s in samples]
        counts = [labels.count(c) for c in range(5)]
        assert tuple(counts) == manifest.split(split).class_counts
        assert all(s["jpg"][:2] == b"\xff\xd8" for s in samples)


def test_write_shard_rejects_bad_key(tmp_path):
    with pytest.raises(ValueError, match="key"):
        write_shard(tmp_path / "train-000000.tar", [("a.b", b"x", 0)])
    with pytest.raises(ValueError, match="longer"):
        write_shard(tmp_path / "train-000000.tar", [("k" * 200, b"x", 0)])
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_nothing(tmp_path):
    def samples():
        yield ("a_left", b"\xff\xd8data", 1)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_shard(tmp_path / "train-000000.tar", samples())
    assert list(tmp_path.iterdir()) == []


def test_verify_detects_truncation_and_tampering(tiny_shards, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    manifest = read_manifest(copy)
    verify_split(manifest, "train", full=True)
    tar = manifest.tar_paths("train")[1]
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    verify_split(manifest, "train")  # same size: only the full check sees it
    with pytest.raises(UserError, match="sha256"):
        verify_split(manifest, "train", full=True)
    tar.write_bytes(bytes(data[:1024]))
    with pytest.raises(UserError, match="truncated"):
        verify_split(manifest, "train")
    tar.unlink()
    with pytest.raises(UserError, match="missing"):
        verify_split(manifest, "train")


def test_read_manifest_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(UserError, match="not found"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(UserError, match="format version"):
        read_manifest(tmp_path)


def test_bytes_equal_tarfile_gnu_format(tmp_path):
    """The hand-built headers are what Python's tarfile writes in GNU format."""
    import io
    import tarfile

    samples = [
        ("10_left", b"\xff\xd8" + bytes(range(256)) * 7, 3),
        ("10_right", b"\xff\xd8x", 0),
        ("k" * 90, b"\xff\xd8" + bytes(range(256)) * 300, 4),  # the longest key, a 77 KB payload
    ]
    info = write_shard(tmp_path / "train-000000.tar", samples, fsync=False)
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, data, label in samples:
            for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", str(label).encode())):
                member = tarfile.TarInfo(name)
                member.size, member.mode, member.mtime = len(payload), 0o644, 0
                tar.addfile(member, io.BytesIO(payload))
    written = (tmp_path / "train-000000.tar").read_bytes()
    assert written == ref.getvalue()
    assert info.bytes == len(written)
    import hashlib

    assert info.sha256 == hashlib.sha256(written).hexdigest()
