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


ENTRY_POINTS = {"trainer.train", "trainer.evaluate", "trainer.smoke"}


def test_trainer_halves_meet_only_in_base():
    """trainer/fitting (a model fitted) and trainer/judging (a model judged) never import
    each other; trainer/base imports neither; only the entry points at trainer/ and tools/
    see both halves, and nothing inside trainer/ imports an entry point but another one."""
    for module, deps in project_imports().items():
        for dep in deps:
            if module.startswith("trainer.fitting"):
                assert not dep.startswith("trainer.judging"), f"{module} imports {dep}"
            if module.startswith("trainer.judging"):
                assert not dep.startswith("trainer.fitting"), f"{module} imports {dep}"
            if module.startswith("trainer.base"):
                assert not dep.startswith(("trainer.fitting", "trainer.judging")), (
                    f"{module} imports {dep}"
                )
            if module.startswith("trainer.") and module not in ENTRY_POINTS:
                assert dep not in ENTRY_POINTS, f"{module} imports the entry point {dep}"


def test_one_name_per_module_and_small_folders():
    """No two product modules share a file name (a traceback names one thing), and no folder
    holds more than 15 modules."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p.name != "__init__.py"]
    names: dict[str, list[str]] = {}
    for path in files:
        names.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert not {n: ps for n, ps in names.items() if len(ps) > 1}
    folders: dict[Path, int] = {}
    for path in files:
        folders[path.parent] = folders.get(path.parent, 0) + 1
    assert max(folders.values()) <= 15, {
        str(f.relative_to(ROOT)): n for f, n in folders.items() if n > 15
    }


def console_commands() -> list[str]:
    """Every command pyproject.toml installs."""
    import tomllib

    return sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


# In one process started outside the repository: load each installed entry point and call it
# with --help, then with an unknown option (each command's own start-up is its import).
ANSWERS = r"""
import contextlib, io, json, sys
from importlib.metadata import entry_points

names = set(sys.argv[1:])
answers = {}
for entry in entry_points(group="console_scripts"):
    if entry.name not in names:
        continue
    cli = entry.load()
    for option in ("--help", "--no-such-option"):
        out, err = io.StringIO(), io.StringIO()
        sys.argv = [entry.name, option]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli()
                code = 0
            except SystemExit as end:
                code = end.code if isinstance(end.code, int) else (end.code is not None)
        answers[f"{entry.name} {option}"] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(answers))
"""


@pytest.mark.slow
def test_console_commands_work_from_any_folder(tmp_path):
    """After `pip install`, every dr-* command answers --help outside the repository, and an
    unknown option is one line on stderr and exit 2."""
    import json
    import subprocess
    import sys
    from importlib.metadata import entry_points

    commands = console_commands()
    installed = {e.name for e in entry_points(group="console_scripts")}
    assert set(commands) <= installed, "install the project first: pip install -e ."
    bin_dir = Path(sys.executable).parent
    for command in commands:  # pip wrote a launcher for each
        assert (bin_dir / command).is_file(), command
    proc = subprocess.run(
        [sys.executable, "-c", ANSWERS, *commands], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = json.loads(proc.stdout)
    assert len(answers) == 2 * len(commands)
    for command in commands:
        code, out, err = answers[f"{command} --help"]
        assert code == 0 and "usage:" in out, (command, err[-500:])
        code, out, err = answers[f"{command} --no-such-option"]
        assert code == 2 and err.startswith("error: "), (command, err[-500:])
        assert len(err.strip().splitlines()) == 1, (command, err)
    # and one launcher for real, from the same folder: the wrapper pip wrote runs the entry point
    for option, status in (("--help", 0), ("--no-such-option", 2)):
        real = subprocess.run(
            [str(bin_dir / "dr-doctor"), option], cwd=tmp_path, capture_output=True, text=True
        )
        assert real.returncode == status, real.stderr[-500:]
        expected = answers[f"dr-doctor {option}"]
        assert (real.stdout, real.stderr) == (expected[1], expected[2])


# torch alone takes seconds to import: a command answers --help and a wrong option first
HEAVY = ("torch", "torchvision", "accelerate", "sklearn", "nvidia.dali", "matplotlib")
# In a fresh interpreter: a command's console entry point (if it has one) and its file run as
# a script, each with --help and an unknown option; then the heavy modules that got loaded.
BEFORE_TORCH = r"""
import contextlib, io, json, runpy, sys
from importlib.metadata import entry_points

path, command, heavy = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
runs = []
if command:
    (entry,) = [e for e in entry_points(group="console_scripts") if e.name == command]
    runs.append(entry.load())
runs.append(lambda: runpy.run_path(path, run_name="__main__"))
codes = []
for run in runs:
    for option in ("--help", "--no-such-option"):
        sys.argv = [path, option]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                run()
            except SystemExit as end:
                codes.append(end.code)
print(json.dumps({"codes": codes, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def command_files() -> dict[Path, str]:
    """Every file a user or developer runs as a command -> its console command ("" if none)."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    by_module = {target.split(":")[0]: name for name, target in scripts.items()}
    files = [*ROOT.glob("tools/*.py"), *ROOT.glob("tools/bench/*.py"), *ROOT.glob("trainer/*.py")]
    return {
        path: by_module.get(module_name(path), "")
        for path in sorted(files)
        if 'if __name__ == "__main__":' in path.read_text()
    }


def test_commands_answer_before_torch_is_imported():
    """--help and option errors of every dr-* command, of `python tools/X.py` and of
    `python trainer/X.py` are answered before torch, torchvision, Accelerate, scikit-learn,
    DALI or matplotlib is imported (docs/benchmarks.md: the time it saves)."""
    import json
    import subprocess
    import sys

    files = command_files()
    assert set(console_commands()) <= set(files.values())  # every console command is checked
    for path, command in files.items():
        proc = subprocess.run(
            [sys.executable, "-c", BEFORE_TORCH, str(path), command, ",".join(HEAVY)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert proc.returncode == 0, (path, proc.stderr[-2000:])
        answer = json.loads(proc.stdout)
        assert answer["codes"] == [0, 2] * (2 if command else 1), (path, answer)
        assert answer["loaded"] == [], f"{path.relative_to(ROOT)} imports {answer['loaded']}"


def test_an_image_side_is_image_size_everywhere_and_size_still_works(capsys):
    """One name for one thing: every command that takes an image side takes --image-size;
    the shard tools' older --size still works, without a warning."""
    from pipeline.cli import build_parser, parse_config
    from pipeline.writing.packing import PackConfig
    from tools.bench import bench_loader, bench_shards, gpu_train_bench
    from tools.make_synthetic import SynthConfig
    from trainer.fitting.config import TrainConfig

    configs = (PackConfig, SynthConfig, TrainConfig, bench_shards.BenchConfig)
    configs += (bench_loader.BenchConfig, gpu_train_bench.GpuBenchConfig)
    for cls in configs:
        assert "--image-size" in build_parser(cls, "x", "").format_help(), cls.__name__
    for argv in (["--image-size", "64", "data", "shards"], ["data", "shards", "--size", "64"]):
        cfg = parse_config(PackConfig, argv, "make_shards.py", "")
        assert (cfg.size, str(cfg.data_dir), str(cfg.out_dir)) == (64, "data", "shards")
    synth = parse_config(SynthConfig, ["--out", "d", "--n", "5", "--image-size", "96"], "x", "")
    assert synth.size == 96
    assert capsys.readouterr().err == ""
