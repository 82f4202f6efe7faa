"""The layout's promises: one direction of imports, no cycle, the two halves of pipeline apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "trainer", "tools")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, set[str]]:
    """Each project module -> the project modules it imports (at any depth of its code)."""
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_no_import_cycle():
    graph = project_imports()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(node) :] + [node])}")
        if node in done:
            return
        for dep in graph[node]:
            visit(dep, [*path, node])
        done.add(node)

    for node in graph:
        visit(node, [])


def test_imports_go_one_way():
    """tools -> trainer -> pipeline; the writing and loading halves share only the format modules."""
    for module, deps in project_imports().items():
        for dep in deps:
            if module.startswith("pipeline"):
                assert not dep.startswith(("trainer", "tools")), f"{module} imports {dep}"
            if module.startswith("trainer"):
                assert not dep.startswith("tools"), f"{module} imports {dep}"
            if module.startswith("pipeline.writing"):
                assert not dep.startswith("pipeline.loading"), f"{module} imports {dep}"
            if module.startswith("pipeline.loading"):
                assert not dep.startswith("pipeline.writing"), f"{module} imports {dep}"
    assert "trainer.train" not in project_imports()["trainer.evaluate"]


COMMANDS = (
    "dr-make-shards",
    "dr-make-synthetic",
    "dr-train",
    "dr-evaluate",
    "dr-predict",
    "dr-compare",
    "dr-bench-loader",
    "dr-bench-shards",
    "dr-export",
    "dr-doctor",
    "dr-make-fixture",
)


@pytest.mark.slow
def test_console_commands_work_from_any_folder(tmp_path):
    """After `pip install`, every dr-* command answers --help outside the repository."""
    import subprocess
    import sys
    from importlib.metadata import entry_points

    installed = {e.name for e in entry_points(group="console_scripts")}
    assert set(COMMANDS) <= installed, "install the project first: pip install -e ."
    bin_dir = Path(sys.executable).parent
    for command in COMMANDS:
        proc = subprocess.run(
            [str(bin_dir / command), "--help"], cwd=tmp_path, capture_output=True, text=True
        )
        assert proc.returncode == 0 and "usage:" in proc.stdout, (command, proc.stderr[-500:])
        bad = subprocess.run(
            [str(bin_dir / command), "--no-such-option"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert bad.returncode == 2 and bad.stderr.startswith("error: "), (
            command,
            bad.stderr[-500:],
        )
        assert len(bad.stderr.strip().splitlines()) == 1, (command, bad.stderr)
