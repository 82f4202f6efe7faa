"""Test-time augmentation: a network's outputs averaged over the eight symmetries of the
square (the four 90-degree rotations, each as it is and mirrored), which include the two
flips and the half turn. A fundus photograph has no "up", so each is an image the network
could have been shown; ``evaluate.py --tta`` and ``predict.py --tta`` both use this one
function, so a checkpoint evaluated with TTA predicts the same way.

A square batch stays square under every view (the loaders and predict.py make them so).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.base.model import backbone_features


def views(x: Tensor) -> list[Tensor]:
    """The eight dihedral views of an (N, C, S, S) batch: rotations by 0, 90, 180 and 270
    degrees, each also flipped left-right (the identity first)."""
    turned = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return [v for t in turned for v in (t, t.flip(-1))]


def tta_outputs_and_features(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The head's raw outputs (N, k) and the backbone features (N, D), each averaged over the
    eight views, in float32 (``model.fc`` is linear, so the averaged outputs are ``fc`` of
    the averaged features)."""
    features = [backbone_features(model, v).float() for v in views(x)]
    outputs = [model.fc(f).float() for f in features]
    return torch.stack(outputs).mean(0), torch.stack(features).mean(0)
