"""Every command block of README.md and docs/*.md, run as written.

A block is a fenced one whose lines are commands (they start with python, accelerate,
make, source, pip, bash or a dr-* console command); blocks of file trees, JSON or printed
output are not. Each block runs in its own folder, its commands in order, exactly as the
page shows them (``\\`` continuations joined, trailing ``# ...`` comments cut), with the
project's folders linked in so that ``python tools/...`` resolves. ``python FILE.py ARGS``
and ``dr-NAME ARGS`` run in this process, as the module's ``main(ARGS)`` with the folder
as the working directory (what the script and the console command call; a new Python
per command would cost the suite a torch import each); any other runs through bash. The
inputs a command names are made there first, small: a synthetic data folder in the layout
its section is about, a few photographs, the shared tiny run as ``runs/<name>/best.pt``
and its shards as ``shards``. A command that cannot run cheaply here is in ``SKIPS``, word
for word, with the reason; any other command must exit 0. So a page whose command drifts
(an option renamed, a required one left out, a synopsis in brackets) fails here, and a
skip whose command left the docs fails too.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tools.make_synthetic import generate

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"(python3?|accelerate|make|source|pip|bash|dr-[a-z-]+)(\s|$)")
LINKED = ("tools", "trainer", "pipeline", "accelerate_config.yaml", "pyproject.toml")
LAYOUT_SECTIONS = ("eyepacs", "aptos", "messidor2", "idrid", "ddr")

HEAVY = "trains the reference recipe (10 epochs at 512 px): hours on a CPU"
BUCKET = "a bucket with credentials; tests/test_remote.py runs these against moto's S3 on 127.0.0.1"
GPU = "needs GPUs (tests/test_gpu_check.py and docs/gpu.md cover them where there are any)"
SKIPS = {
    "make demo": "trains two runs and fuses one: about 9 minutes on 2 free cores; CI runs it",
    "make test": "is this test suite",
    "make install": "creates .venv/, which this suite runs in",
    "source .venv/bin/activate": "changes the calling shell only",
    "dr-doctor": "runs the smoke test per backend (a minute or more); tests/test_doctor.py",
    "accelerate launch trainer/train.py --arch resnet18 --pretrained --out runs/resnet18-pretrained": (
        "downloads ImageNet weights (no internet here) and " + HEAVY
    ),
    "accelerate launch trainer/train.py --arch resnet18 --smoke": (
        "two epochs on two ranks; tests/test_smoke.py runs it from an installed wheel"
    ),
    "accelerate launch trainer/train.py --arch resnet18": HEAVY,
    "accelerate launch --config_file accelerate_config.yaml --num_processes 8 trainer/train.py "
    "--arch resnet50 --pretrained": GPU,
    "python trainer/train.py --arch resnet18 --image-size 128": HEAVY,
    "accelerate launch --multi_gpu --num_processes 2 trainer/train.py ...": (
        "'...' stands for the options of the commands above; tests/test_train.py runs two CPU ranks"
    ),
    "accelerate launch --config_file accelerate_config.yaml --num_machines M --machine_rank R "
    "--main_process_ip HOST0 --main_process_port 29500 --num_processes TOTAL_GPUS trainer/train.py "
    "--shards /shared/shards --out /shared/runs/resnet50": "several GPU machines: " + GPU,
    "python trainer/evaluate.py --checkpoint runs/resnet50/best.pt --shards shards/messidor2 "
    "shards/aptos shards/idrid --out runs/resnet50/external": (
        "three external sets packed alike and a checkpoint trained on their preparation; "
        "tests/test_external.py runs evaluate --shards A B C"
    ),
    "dr-compare runs/classify-s{0..4} runs/regress-s{0..4} --seeds --baseline runs/classify-s0 "
    "--out runs/cmp": "ten trained runs (two heads, five seeds); tests/test_compare_seeds.py",
    "accelerate launch trainer/train.py --recipe huang2023 --shards shards": (
        "resnet50 from ImageNet weights (a download) for 20 epochs at 512 px; "
        "tests/test_recipe_huang.py runs the recipe small"
    ),
    "dr-fuse --checkpoint runs/resnet50-*/best.pt --shards shards": (
        "the run of the command before it; tests/test_recipe_huang.py runs dr-fuse"
    ),
    "accelerate launch trainer/train.py --arch resnet18 --out runs/resnet18-scratch": HEAVY,
    "accelerate launch trainer/train.py --arch resnet50 --out runs/resnet50-scratch": HEAVY,
    "accelerate launch trainer/train.py --arch resnet50 --pretrained --out runs/resnet50-pretrained": (
        "downloads ImageNet weights (no internet here) and " + HEAVY
    ),
    "python tools/compare_runs.py runs/resnet18-* runs/resnet50-* --out runs/compare": (
        "compares the four runs above; tests/test_compare_runs.py runs it on made runs"
    ),
    "dr-fuse --checkpoint runs/r50/best.pt --shards shards": (
        "needs shards with both eyes of patients and a val split, and a run trained on them; "
        "tests/test_recipe_huang.py runs dr-fuse"
    ),
    'pip install -e ".[cloud]"': "installs packages; the dev extra has them for tests/test_remote.py",
    "python tools/make_shards.py data/ s3://my-bucket/eyepacs-512": BUCKET,
    "accelerate launch trainer/train.py --shards s3://my-bucket/eyepacs-512 --out runs/r50": BUCKET,
    "python trainer/evaluate.py --checkpoint runs/r50/best.pt --shards s3://my-bucket/eyepacs-512": (
        BUCKET
    ),
    "dr-report runs/resnet18 --shards /new/place/shards --gallery 24": (
        "/new/place stands for wherever the shards moved to"
    ),
}


def command_blocks() -> list[tuple[str, list[str]]]:
    """(page:line, commands) of every command block, in page order."""
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"^ *```[^\n]*\n(.*?)^ *```", text, re.S | re.M):
            commands = commands_of(match.group(1))
            if commands:
                line = text[: match.start()].count("\n") + 1
                blocks.append((f"{page.relative_to(ROOT)}:{line}", commands))
    return blocks


def commands_of(body: str) -> list[str]:
    """The block's commands, or [] for a block that is not one (its first line is none)."""
    lines = [line.strip() for line in body.replace("\\\n", " ").splitlines() if line.strip()]
    if not lines or not COMMAND.match(lines[0]):
        return []
    commands = []
    for line in lines:
        assert COMMAND.match(line), f"a command block with a line that is no command: {line}"
        commands.append(" ".join(re.sub(r"\s#\s.*$", "", line).split()))
    return commands


def section_of(where: str) -> str:
    """The heading above a block, lower case."""
    page, line = where.rsplit(":", 1)
    headings = [
        text for text in (ROOT / page).read_text().splitlines()[: int(line)] if text.startswith("#")
    ]
    return headings[-1].lower() if headings else ""


BLOCKS = command_blocks()
# pyproject.toml's [project.scripts] (tomllib is 3.11+): console command -> "module:function"
SCRIPTS = dict(
    re.findall(r'^(dr-[a-z-]+) = "([\w.:]+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
)


def test_every_skip_is_still_in_the_docs():
    written = {c for _, commands in BLOCKS for c in commands}
    assert sorted(set(SKIPS) - written) == []


# ---------------------------------------------------------------- the inputs a block names


def make_data(folder: Path, layout: str) -> None:
    """A small synthetic data folder; ``generic``: images and a labels.csv only."""
    generate(folder, n=16, size=64, layout="kaggle" if layout == "generic" else layout, seed=1)
    if layout == "generic":
        rows = (folder / "trainLabels.csv").read_text().splitlines()[1:]
        (folder / "trainLabels.csv").unlink()
        (folder / "labels.csv").write_text("image,level\n" + "\n".join(rows) + "\n")


def make_photos(folder: Path) -> None:
    generate(folder, n=4, size=96, layout="kaggle", seed=2)


def prepare_inputs(box: Path, command: str, section: str, run: Path, shards: Path) -> None:
    """Make in ``box`` what ``command`` reads and an earlier command did not write."""
    words = shlex.split(command)
    for i, word in enumerate(words):
        best = re.fullmatch(r"(runs/[^/*]+)/best\.pt", word)
        if best and not (box / word).exists():
            (box / best.group(1)).mkdir(parents=True, exist_ok=True)
            os.symlink(run / "best.pt", box / word)
        if words[0] == "dr-report" and i == 1 and not (box / word).exists():
            shutil.copytree(run, box / word, ignore=shutil.ignore_patterns("checkpoints"))
        after_shards = i > 0 and words[i - 1] == "--shards"
        if after_shards and not (box / word).exists() and "--data" not in words:
            (box / word).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(shards, box / word)
        if word.rstrip("/") == "photos" and not (box / "photos").exists():
            make_photos(box / "photos")
    if "--data" in words:  # lesion heat: photographs with masks, and shards packed from them
        data, packed = words[words.index("--data") + 1], words[words.index("--shards") + 1]
        generate(box / data, n=60, size=64, layout="kaggle", seed=3, masks=True)
        assert run_main(box, f"python tools/make_shards.py {data} {packed} --size 64") == 0
    if "make_shards.py" in command and "--verify" not in words:
        data = box / words[words.index("tools/make_shards.py") + 1]
        if not data.exists():
            named = [n for n in LAYOUT_SECTIONS if n in data.name or section.startswith(f"## {n}")]
            make_data(data, "generic" if "--labels" in words else (named or ["eyepacs"])[0])


def entry_of(words: list[str]):
    """(main, its arguments) of a ``python FILE.py ...`` or ``dr-NAME ...`` command, else None."""
    if words[0] in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
        module, args = words[1].removesuffix(".py").replace("/", "."), words[2:]
    elif words[0] in SCRIPTS:
        module, args = SCRIPTS[words[0]].split(":")[0], words[1:]
    else:
        return None
    return importlib.import_module(module).main, args


def run_main(box: Path, command: str) -> int | None:
    """Run ``command`` in this process with ``box`` as the working directory: its exit
    status, or None when it is no Python entry point."""
    entry = entry_of(shlex.split(command))
    if entry is None:
        return None
    main, args = entry
    here = Path.cwd()
    os.chdir(box)
    try:
        return main(args) or 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    finally:
        os.chdir(here)


def environment(box: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(os.sys.executable).parent}{os.pathsep}{env['PATH']}"
    env |= {"TORCH_HOME": str(box / ".torch"), "MPLCONFIGDIR": str(box / ".mpl")}
    env |= {"MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    return env


@pytest.mark.slow
@pytest.mark.parametrize("where,commands", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_command_block_runs_as_written(where, commands, tmp_path, straight_run, tiny_shards):
    box = tmp_path / "box"
    box.mkdir()
    for name in LINKED:
        os.symlink(ROOT / name, box / name)
    section = section_of(where)
    ran = 0
    for command in commands:
        if command in SKIPS:
            continue
        prepare_inputs(box, command, section, straight_run, tiny_shards)
        status = run_main(box, command)
        if status is not None:
            assert status == 0, f"{where}: {command} exited {status}"
            ran += 1
            continue
        proc = subprocess.run(
            ["bash", "-c", command],
            cwd=box,
            env=environment(box),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, (
            f"{where}: {command}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
        ran += 1
    if ran == 0:
        pytest.skip("; ".join(f"{c}: {SKIPS[c]}" for c in commands))


def test_training_md_names_every_trainer_option():
    """The option list of docs/training.md against ``trainer/train.py --help``."""
    helped = subprocess.run(
        [os.sys.executable, str(ROOT / "trainer/train.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", helped)) - {"--help"}
    written = set(re.findall(r"--[a-z][a-z0-9-]+", (ROOT / "docs/training.md").read_text()))
    assert sorted(options - written) == []
