"""--normalize dataset (issue 18): make_shards measures the train split's channel mean and
std while packing, the manifest records them, the loaders and best.pt use them."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import UserError
from pipeline.manifest import read_manifest
from pipeline.writing import channelstats
from tests.test_loader import BACKENDS, epoch, loader
from tests.test_make_shards import lab_folder, read_webdataset, run_pack
from trainer.base.normalize import normalization_for
from trainer.fitting.config import parse_args


def png(pixels: list[list[tuple[int, int, int]]]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.array(pixels, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_sums_and_statistics_by_hand():
    a = channelstats.image_sums(png([[(0, 10, 20), (2, 30, 20)]]))
    assert a == [2, 2, 40, 40, 4, 1000, 800]
    b = channelstats.image_sums(png([[(4, 20, 20)]]))
    total = channelstats.add(a, b)  # R 0, 2, 4; G 10, 30, 20; B 20, 20, 20
    got = channelstats.stats(total, 2)
    assert got["mean"] == [2.0, 20.0, 20.0] and got["images"] == 2
    assert got["std"] == pytest.approx([np.sqrt(8 / 3), np.sqrt(200 / 3), 0.0], abs=1e-4)
    assert channelstats.stats(channelstats.ZERO, 0) is None


@pytest.mark.parametrize("square", [False, True], ids=["decoded-in-workers", "pass-through"])
def test_make_shards_records_the_train_statistics_of_the_stored_jpegs(tmp_path, square):
    data = lab_folder(tmp_path / "data", square=square)
    result = run_pack(data, tmp_path / "out", workers=2)
    stored = [jpeg for _, _, jpeg in read_webdataset(tmp_path / "out", "train")]
    pixels = np.concatenate(
        [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")).reshape(-1, 3) for j in stored]
    ).astype(np.float64)
    recorded = read_manifest(tmp_path / "out").channel_stats
    assert result.manifest.channel_stats == recorded
    assert recorded["images"] == len(stored) == 4 and recorded["split"] == "train"
    assert recorded["mean"] == pytest.approx(pixels.mean(0).tolist(), abs=1e-3)
    assert recorded["std"] == pytest.approx(pixels.std(0).tolist(), abs=1e-3)
    # a rerun reuses every shard and keeps the same statistics without decoding again
    again = run_pack(data, tmp_path / "out", workers=2)
    assert again.reused_shards > 0 and again.manifest.channel_stats == recorded


def test_an_old_manifest_reads_and_dataset_normalisation_says_repack(tiny_shards, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_shards, old)
    raw = json.loads((old / "manifest.json").read_text())
    del raw["channel_stats"]
    (old / "manifest.json").write_text(json.dumps(raw))
    assert read_manifest(old).channel_stats is None
    assert normalization_for("imagenet", old)[0][0] == pytest.approx(0.485 * 255)
    with pytest.raises(UserError, match="repack it with tools/make_shards.py"):
        normalization_for("dataset", old)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaders_normalise_with_the_given_statistics(tiny_shards, backend):
    mean, std = normalization_for("dataset", tiny_shards)
    imagenet = normalization_for("imagenet", tiny_shards)
    own = epoch(loader(tiny_shards, backend=backend, normalize=(mean, std)))
    ref = epoch(loader(tiny_shards, backend=backend))

    def pixels(images, stats):
        return images * torch.tensor(stats[1]).view(1, 3, 1, 1) + torch.tensor(stats[0]).view(
            1, 3, 1, 1
        )

    for (a, _, ka), (b, _, kb) in zip(own, ref, strict=True):
        assert ka == kb
        assert torch.allclose(pixels(a, (mean, std)), pixels(b, imagenet), atol=1e-3)
    everything = torch.cat(
        [
            a
            for a, _, _ in epoch(
                loader(tiny_shards, "train", backend=backend, train=False, normalize=(mean, std))
            )
        ]
    )
    # the train split normalised with its own statistics: mean 0 and std 1 per channel
    assert everything.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (everything.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3


def test_the_recipe_and_the_option(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parse_args(["--recipe", "huang2023"])[0].normalize == "dataset"
    assert parse_args([])[0].normalize == "imagenet"
    assert parse_args(["--recipe", "huang2023", "--normalize", "imagenet"])[0].normalize == (
        "imagenet"
    )


def test_best_pt_rebuilt_after_a_kill_keeps_the_dataset_statistics(tiny_shards, tmp_path):
    from trainer.base.bestfile import BEST_FILE, load_best
    from trainer.base.model import build_model
    from trainer.fitting.checkpoint import repair_best

    config = {"arch": "resnet18", "image_size": 64, "normalize": "dataset"}
    config["shards"] = str(tiny_shards)
    state = {"epoch": 1, "model": build_model("resnet18").state_dict(), "config": config}
    repair_best(tmp_path, {**state, "best": {"epoch": 1, "test_qwk": 0.5}})
    info = load_best(tmp_path / BEST_FILE)[1]
    assert (info["mean"], info["std"]) == tuple(normalization_for("dataset", tiny_shards))
    assert info["mean"] != normalization_for("imagenet")[0]
