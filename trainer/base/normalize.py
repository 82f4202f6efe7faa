"""``--normalize``: which per-channel mean and std the images are normalised with.

``imagenet`` (the default): ImageNet's, which pretrained torchvision weights expect.
``dataset``: the train split's own, measured by make_shards and recorded in the shard
folder's ``manifest.json`` (``pipeline.writing.channelstats``), as Huang et al. 2023 do.
Either way the values go into best.pt (``mean``/``std``), so evaluate, dr-fuse, predict
and export normalise as training did.
"""

from __future__ import annotations

from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.manifest import Manifest, dataset_normalization, read_manifest

NORMALIZE = ("imagenet", "dataset")


def normalization_for(
    normalize: str, shards=None, manifest: Manifest | None = None
) -> tuple[list[float], list[float]]:
    """(mean, std), 0-255 scale, for ``--normalize normalize`` on the shard folder ``shards``
    (or its already-read ``manifest``); a UserError telling to repack when the folder was
    packed before make_shards measured its statistics."""
    if normalize == "imagenet":
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return dataset_normalization(manifest or read_manifest(shards))
