"""The shard fixture shipped in trainer/fixture/: what tools/make_fixture.py writes today."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import PIL
import pytest

from pipeline.constants import INDEX_SUFFIX, MANIFEST_NAME, REJECTS_NAME
from pipeline.errors import UserError
from pipeline.loading.loader import EvalSpec, build_loader
from pipeline.manifest import read_manifest, verify_split
from tools.make_fixture import build_fixture
from tools.make_fixture import main as make_fixture_main
from trainer.smoke import FIXTURE_IMAGES, FIXTURE_SIZE, fixture_dir

REGENERATE = "rerun `python tools/make_fixture.py` and commit trainer/fixture/"


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fixture")
    build_fixture(out)
    return out


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_committed_fixture_is_what_the_script_writes_today(rebuilt):
    made_with = read_manifest(fixture_dir()).report["fixture"]
    here = {"numpy": np.__version__, "pillow": PIL.__version__}
    if made_with != here:
        pytest.skip(
            f"the fixture was made with {made_with}, this is {here}: the JPEG bytes may "
            "differ; test_the_fixture_format_is_the_writers compares everything else"
        )
    committed, today = files(fixture_dir()), files(rebuilt)
    assert sorted(committed) == sorted(today), REGENERATE
    differ = [name for name in today if committed[name] != today[name]]
    assert not differ, f"{differ} differ from what the script writes; {REGENERATE}"


def layout(folder: Path) -> dict:
    """A shard folder without its pixels: names, labels, member order, manifest, index shape."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest.pop("fixture")
    manifest["preprocess"].pop("pillow")
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            del shard["bytes"], shard["sha256"]
    out = {
        "files": sorted(p.name for p in folder.iterdir()),
        "manifest": manifest,
        "rejects": (folder / REJECTS_NAME).read_bytes(),
    }
    for tar in sorted(folder.glob("*.tar")):
        assert tar.read_bytes()[257:265] == b"ustar  \0"  # a GNU header, not POSIX/PAX
        with tarfile.open(tar) as f:
            out[tar.name] = [
                (m.name, f.extractfile(m).read() if m.name.endswith(".cls") else m.size > 0)
                for m in f.getmembers()
            ]
        lines = tar.with_suffix(INDEX_SUFFIX).read_text().splitlines()
        fields = [line.split() for line in lines[1:]]  # per member: ext offset size name
        out[tar.name + " index"] = [
            lines[0],
            [list(zip(f[0::4], f[3::4], strict=True)) for f in fields],
        ]
    return out


def test_the_fixture_format_is_the_writers(rebuilt):
    assert layout(fixture_dir()) == layout(rebuilt), REGENERATE


def test_the_fixture_is_small_complete_and_loads(tmp_path):
    folder = fixture_dir()
    assert sum(p.stat().st_size for p in folder.iterdir()) < 1 << 20
    manifest = read_manifest(folder)
    assert manifest.image_size == FIXTURE_SIZE
    assert sum(s.samples for s in manifest.splits.values()) == FIXTURE_IMAGES
    assert manifest.report["rejected"] == 0
    for split in manifest.splits:
        verify_split(manifest, split, full=True)
        loader = build_loader(
            folder, EvalSpec(split=split, batch_size=4, image_size=FIXTURE_SIZE, backend="torch")
        )
        seen = sum(len(labels) for _, labels in loader)
        loader.close()
        assert seen == manifest.split(split).samples


def test_the_fixture_is_found_through_the_package():
    import trainer

    assert fixture_dir() == Path(trainer.__file__).parent / "fixture"


def test_make_fixture_into_a_path_under_a_file_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "x"
    with pytest.raises(UserError) as err:
        make_fixture_main(["--out", str(target)])
    assert str(err.value) == f"cannot write to {target}: Not a directory"
