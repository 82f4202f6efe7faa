"""The smoke test's shard fixture, shipped with the package: ``trainer/fixture/``.

40 synthetic photographs at 64 px, built by ``tools/make_fixture.py``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from pipeline.errors import UserError

FIXTURE_PACKAGE, FIXTURE_FOLDER = "trainer", "fixture"
FIXTURE_IMAGES, FIXTURE_SIZE = 40, 64


def fixture_dir(must_exist: bool = True) -> Path:
    """The fixture folder inside the installed package (a wheel or a checkout alike)."""
    path = Path(str(files(FIXTURE_PACKAGE) / FIXTURE_FOLDER))
    if must_exist and not (path / "manifest.json").is_file():
        raise UserError(
            f"the smoke-test fixture is missing from the installed package ({path}); "
            "reinstall dr-grader, or rebuild it with tools/make_fixture.py"
        )
    return path
