"""tools/export.py: a checkpoint to ONNX, run by onnxruntime, with its metadata."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import UserError
from tests.conftest import shared, untrained_best
from trainer.base.bestfile import load_best
from trainer.base.model import build_model

onnx = pytest.importorskip("onnx", reason="the export extra is not installed")
onnxruntime = pytest.importorskip("onnxruntime", reason="the export extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "export.py"
# float32 on both sides, different kernels and summation orders: they differ by about 1e-6 of
# the outputs' scale (measured), a wrong graph or wrong weights by the whole of it.
TOLERANCE = 1e-4


def export(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny best.pt that also carries the thresholds later trainers may write."""
    return shared(tmp_path_factory, "export_checkpoint", lambda tmp: _checkpoint(tmp / "best.pt"))


def _checkpoint(path: Path) -> Path:
    untrained_best(path, preprocess={"size": 128, "graham": True})
    best = torch.load(path, weights_only=True)
    best.update(head="classify", cut_points=[0.5, 1.4, 2.6, 3.5], referable_threshold=0.3)
    torch.save(best, path)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    return shared(tmp_path_factory, "exported", lambda out: _exported(checkpoint, out))


def _exported(checkpoint: Path, out: Path) -> Path:
    run = export("--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert f"wrote {out / 'model.onnx'}" in run.stdout
    return out / "model.onnx"


@pytest.mark.parametrize("batch", [3, 1])
def test_onnxruntime_matches_torch(checkpoint, exported, batch):
    model, _ = load_best(checkpoint)
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == "image" and image.shape[1:] == [3, 64, 64]
    assert isinstance(image.shape[0], str)  # a named, free batch dimension

    images = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    (got,) = session.run(["output"], {"image": images.numpy()})
    with torch.no_grad():
        want = model(images).numpy()
    assert got.shape == (batch, 5)
    scale = max(1.0, np.abs(want).max())
    assert np.abs(got - want).max() <= TOLERANCE * scale
    assert (got.argmax(1) == want.argmax(1)).all()


def test_metadata(exported):
    props = {p.key: json.loads(p.value) for p in onnx.load(str(exported)).metadata_props}
    assert props == {
        "arch": "resnet18",
        "image_size": 64,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "preprocess": {"size": 128, "graham": True},
        "head": "classify",
        "cut_points": [0.5, 1.4, 2.6, 3.5],
        "pair_blend": 0.0,  # best.pt always says how both eyes are blended: 0, each eye alone
        "referable_threshold": 0.3,
    }
    assert all(v > 1 for v in props["mean"] + props["std"])  # the 0-255 scale


def test_head_defaults_to_classify(tmp_path, checkpoint):
    from tools.export import metadata

    _, info = load_best(checkpoint)
    for key in ("head", "cut_points", "referable_threshold"):
        del info[key]
    info["pair_blend"] = 0.25
    props = metadata(info)
    assert json.loads(props["head"]) == "classify" and json.loads(props["pair_blend"]) == 0.25
    assert not {"cut_points", "referable_threshold"} & set(props)


def test_missing_onnx_names_the_extra(tmp_path, checkpoint):
    blocked = tmp_path / "blocked" / "onnx"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text(
        "raise ImportError('blocked for this test', name='onnx')\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{blocked.parent}{os.pathsep}{ROOT}"}
    run = export("--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), env=env)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: exporting to ONNX needs the export extra (onnx is missing): "
        "pip install 'dr-grader[export]', or pip install -e '.[export]' in a checkout"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "tflite"], "argument --format: invalid choice: 'tflite'"),
        (["--checkpoint", "missing.pt"], "checkpoint missing.pt does not exist"),
        (["--out"], "argument --out: expected one argument"),
    ],
)
def test_bad_options(tmp_path, checkpoint, args, message):
    from tools.export import main

    with pytest.raises(UserError, match=re.escape(message)):
        main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), *args])
    assert not (tmp_path / "out").exists()


def test_the_export_check_catches_other_weights(checkpoint, exported):
    from tools.export import TOLERANCE as TOOL_TOLERANCE
    from tools.export import max_difference

    model, _ = load_best(checkpoint)
    proto = onnx.load(str(exported))
    images = torch.randn(2, 3, 64, 64)
    assert max_difference(proto, model, images, onnxruntime) <= TOOL_TOLERANCE
    torch.manual_seed(1)
    other = build_model("resnet18").eval()
    assert max_difference(proto, other, images, onnxruntime) > 100 * TOOL_TOLERANCE
