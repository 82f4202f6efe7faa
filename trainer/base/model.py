"""The networks: torchvision ResNets with the head's outputs, from scratch, ImageNet or a file.

    model = build_model("resnet50", 5, pretrained=True)                    # torch hub cache
    model = build_model("resnet50", 1, pretrained=True, imagenet="V2")     # regress head, V2 weights
    model = build_model("resnet50", 5, weights="resnet50.pth")             # offline

``--pretrained`` downloads torchvision's ImageNet weights once into the torch hub cache
(``$TORCH_HOME/hub/checkpoints``). A machine without internet gets one sentence naming
the cache path and ``--weights``; ``--weights FILE`` takes a full model (the same head), an
ImageNet backbone (its 1000-way head is dropped) or a checkpoint written by this trainer.
"""

from __future__ import annotations

import http.client
import socket
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from pipeline.constants import NUM_CLASSES
from pipeline.errors import UserError

# V1, the reference recipe's "pretrained=True": torchvision's original ImageNet weights.
# V2: resnet50 retrained with torchvision's newer recipe (80.9 % top-1 against 76.1 %).
MODELS = {
    "resnet18": (models.resnet18, {"V1": models.ResNet18_Weights.IMAGENET1K_V1}),
    "resnet50": (
        models.resnet50,
        {"V1": models.ResNet50_Weights.IMAGENET1K_V1, "V2": models.ResNet50_Weights.IMAGENET1K_V2},
    ),
}
HEAD = ("fc.weight", "fc.bias")
DOWNLOAD_TIMEOUT_S = (
    20  # per socket operation: an offline machine fails fast, a slow one still works
)


def build_model(
    arch: str,
    num_classes: int = NUM_CLASSES,
    pretrained: bool = False,
    weights: str | None = None,
    imagenet: str = "V1",
) -> nn.Module:
    """A ResNet with ``num_classes`` outputs (the head's): random, ImageNet-initialised, or from
    a file."""
    if arch not in MODELS:
        raise UserError(f"unknown architecture '{arch}'; choose one of {', '.join(MODELS)}")
    constructor, versions = MODELS[arch]
    if imagenet not in versions:
        raise UserError(f"no ImageNet weights {imagenet} for {arch}; choose {', '.join(versions)}")
    model = constructor(num_classes=num_classes)
    model.fc = Fp32Linear(model.fc.in_features, num_classes)
    if pretrained:
        load_backbone(
            model,
            imagenet_state_dict(arch, imagenet=imagenet),
            source=f"ImageNet {arch} {imagenet}",
        )
    elif weights:
        load_weights(model, weights)
    return model


class Fp32Linear(nn.Linear):
    """The head's last layer, computed in float32 even under bf16/fp16 autocast: bf16 keeps 8
    bits of mantissa, so a regress score near 2 moves in steps of 1/64 and many images tie,
    which blunts the cut-point search and the ROC. Same parameters (``fc.weight``,
    ``fc.bias``) as ``nn.Linear``, so state dicts load either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def backbone_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision ResNet's pooled features (N, 512 or 2048): its forward without ``fc``,
    so ``model.fc(backbone_features(model, x))`` is ``model(x)``."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(x), 1)


def hub_checkpoint_path(arch: str, imagenet: str = "V1") -> Path:
    """Where torch hub keeps (or would keep) the ImageNet weights of ``arch``."""
    url = MODELS[arch][1][imagenet].url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def imagenet_state_dict(
    arch: str, progress: bool = False, imagenet: str = "V1"
) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for ``arch``, from the cache or downloaded into it."""
    weights = MODELS[arch][1][imagenet]
    cached = hub_checkpoint_path(arch, imagenet)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return weights.get_state_dict(progress=progress, check_hash=True)
    except (OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise UserError(
            f"could not download the ImageNet weights for {arch} ({reason}); on a machine without "
            f"internet copy {cached.name} into {cached.parent}, or pass --weights FILE "
            "with a local state dict instead of --pretrained"
        ) from None
    except RuntimeError as err:  # a bad hash, or a truncated file in the cache
        raise UserError(
            f"the cached ImageNet weights {cached} are damaged ({str(err).splitlines()[0]}); "
            "delete the file and retry, or pass --weights FILE"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def load_failure(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words. Torch's own text
    for a file holding other objects advises ``weights_only=False``, which would run any code
    the file carries: never repeated."""
    text = str(err).strip()
    if "weights_only" in text or "Weights only load failed" in text:
        return "it holds Python objects besides tensors, numbers and strings, which are not loaded"
    return text.splitlines()[0][:200] if text else type(err).__name__


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from FILE: a bare one, or a checkpoint holding it under "model"."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of every kind: it is not a safe state dict
        raise UserError(
            f"--weights {path} is not a loadable state dict ({load_failure(err)})"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # best.pt or checkpoints/last/state.pt of this trainer
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"--weights {path} does not hold a state dict (a dict of tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load FILE into ``model``: all of it, or the backbone when the file's head has another size."""
    load_backbone(model, read_state_dict(path), source=f"--weights {path}")


def load_backbone(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "the weights"
) -> None:
    """Copy ``state`` into ``model``; a head of another width (ImageNet's 1000) is left out.

    Every other tensor must be present with the model's shape: a mismatch is a UserError
    naming the first offending key, so a resnet50 file never half-loads into a resnet18.
    """
    own = model.state_dict()
    in_features = own[HEAD[0]].shape[1]
    fc = state.get(HEAD[0])
    if (
        fc is not None
        and fc.ndim == 2
        and fc.shape[1] == in_features
        and fc.shape[0] != own[HEAD[0]].shape[0]
    ):
        state = {k: v for k, v in state.items() if k not in HEAD}
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state and k not in HEAD]
    unexpected = [k for k in state if k not in own]
    problems = []
    if mismatched:
        k = mismatched[0]
        problems.append(
            f"{len(mismatched)} tensor(s) of another shape, e.g. {k}: "
            f"{tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        )
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    if problems:
        raise UserError(
            f"{source} does not fit this {type(model).__name__} "
            f"({'; '.join(problems)}); is it the same --arch?"
        )
    model.load_state_dict(state, strict=False)  # strict apart from a dropped head
