"""Export a trained checkpoint for deployment: ONNX with everything needed to use it.

    python tools/export.py --checkpoint runs/resnet18/best.pt --format onnx --out export/

Writes ``OUT/model.onnx``: one input ``image``, float32 (N, 3, S, S) with S the training
image size and N free (any batch size), and one output ``output``, the head's raw values
(N, 5) for the ``classify`` head. The model's ``metadata_props`` hold, each value as JSON:
``arch``, ``image_size``, ``mean`` and ``std`` (RGB, on the 0-255 pixel scale),
``preprocess`` (how the shards were made: size, graham, ...), ``head`` (``classify`` unless
best.pt says otherwise) and, when best.pt has them, ``cut_points``, ``referable_threshold``,
``pair_blend`` and ``pair_cut_points`` (the cut-points for blended scores) and
``temperature``, copied as they are; and ``fusion`` when ``dr-fuse`` stored a fusion head: its
sizes, cut-points, operating point, epoch and kappa figures. Its weights are not exported:
model.onnx is the single-eye network, and a deployment that fuses both eyes uses
tools/predict.py --pair-eyes.

How a deployment gets from a photograph to a grade:

1. prepare it as ``tools/predict.py`` does: crop the black border, pad to a square, resize
   to ``preprocess["size"]`` (then to ``image_size`` if that differs), Graham's
   normalisation if ``preprocess["graham"]``;
2. ``x = (rgb - mean) / std`` per channel, on the 0-255 scale, laid out as N, 3, S, S;
3. ``classify``: the grade is the argmax of the five outputs, the softmax of the outputs
   divided by ``temperature`` (fitted on val; 1 when absent) the calibrated probabilities,
   and the referable score p2 + p3 + p4 of those is what ``referable_threshold`` applies
   to; ``ordinal``: four "grade > k" logits, divided by ``temperature`` before the sigmoid;
   ``regress``: one output per image, and the grade is the number of
   ``cut_points`` (four increasing thresholds) it exceeds.

The export is checked before it is kept: onnxruntime and torch must agree on a random
batch. ONNX support is an optional extra: ``pip install 'dr-grader[export]'``.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.cli import arg, parse_config, run_cli
from pipeline.errors import RunError, UserError
from pipeline.fileio import atomic_write, make_writable_dir

# torch loads where used, after the command line is parsed
if TYPE_CHECKING:
    import torch

FORMATS = ("onnx",)
MODEL_FILE = "model.onnx"
INPUT, OUTPUT = "image", "output"
THRESHOLDS = ("cut_points", "referable_threshold", "pair_blend", "pair_cut_points", "temperature")
# what dr-fuse stored, less its weights (model.onnx is the single-eye network; see the docstring)
FUSION_FIELDS = (
    "features",
    "hidden",
    "outputs",
    "cut_points",
    "referable_threshold",
    "epoch",
    "selected_by",
    "kappa",
)
# Both sides compute in float32 with different kernels and summation orders; over a ResNet's
# layers that differs by about 1e-6 of the output's scale, a wrong export by its whole scale.
TOLERANCE = 1e-4


@dataclass
class ExportConfig:
    checkpoint: Path = arg(help="best.pt written by trainer/train.py", metavar="FILE")
    out: Path = arg(help="folder to write model.onnx into (created)", metavar="DIR")
    format: str = arg("onnx", "what to write", choices=FORMATS)


def _require_onnx():
    """onnx and onnxruntime, or one sentence on how to install them."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as err:
        raise UserError(
            f"exporting to ONNX needs the export extra ({err.name} is missing): "
            "pip install 'dr-grader[export]', or pip install -e '.[export]' in a checkout"
        ) from None
    return onnx, onnxruntime


def metadata(info: dict) -> dict[str, str]:
    """The ``metadata_props`` of the exported model, from best.pt's keys; values are JSON."""
    props = {
        "arch": info["arch"],
        "image_size": int(info["image_size"]),
        "mean": [float(v) for v in info["mean"]],
        "std": [float(v) for v in info["std"]],
        "preprocess": info.get("preprocess") or {},
        "head": info.get("head", "classify"),
    }
    props.update({key: info[key] for key in THRESHOLDS if info.get(key) is not None})
    if info.get("fusion"):
        props["fusion"] = {k: info["fusion"][k] for k in FUSION_FIELDS if k in info["fusion"]}
    return {key: json.dumps(value) for key, value in props.items()}


def to_onnx(model: torch.nn.Module, image_size: int):
    """The ONNX ModelProto of ``model`` for (N, 3, image_size, image_size) float32 input."""
    import torch

    example = torch.randn(2, 3, image_size, image_size)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter reports its steps
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            verbose=False,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    return program.model_proto


def max_difference(proto, model: torch.nn.Module, images: torch.Tensor, onnxruntime) -> float:
    """The largest |onnxruntime - torch| over the outputs for ``images``, relative to their scale."""
    import torch

    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (got,) = session.run([OUTPUT], {INPUT: images.numpy()})
    with torch.no_grad():
        want = model(images).numpy()
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def main(argv: list[str] | None = None) -> int:
    args = parse_config(ExportConfig, argv, prog="export.py", description=__doc__.splitlines()[0])
    onnx, onnxruntime = _require_onnx()
    import torch

    from trainer.base.bestfile import load_best

    model, info = load_best(args.checkpoint)
    try:
        make_writable_dir(args.out)
    except OSError as err:
        raise UserError(f"cannot write to {args.out}: {err.strerror or err}") from None

    image_size = int(info["image_size"])
    proto = to_onnx(model, image_size)
    onnx.helper.set_model_props(proto, metadata(info))
    difference = max_difference(
        proto, model, torch.randn(3, 3, image_size, image_size), onnxruntime
    )
    if difference > TOLERANCE:
        raise RunError(
            f"the ONNX model disagrees with torch by {difference:.1e} of the output scale "
            f"(more than {TOLERANCE:.0e}); nothing was written"
        )
    path = atomic_write(args.out / MODEL_FILE, lambda tmp: onnx.save_model(proto, tmp, "protobuf"))
    print(
        f"wrote {path} ({info['arch']}, {image_size} px, head {info.get('head', 'classify')}, "
        f"{path.stat().st_size / 1e6:.1f} MB); onnxruntime matches torch within {difference:.1e}"
    )
    return 0


def cli() -> None:
    """The ``dr-export`` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
