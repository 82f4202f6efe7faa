"""Test-time augmentation (issue 18): one implementation, the eight symmetries of the square,
shared by evaluate.py --tta and predict.py --tta."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from tools.predict import predict_batch
from trainer.base.model import build_model
from trainer.judging.evaluation import evaluate
from trainer.judging.tta import tta_outputs_and_features, views


def test_the_eight_views_are_the_symmetries_of_the_square():
    x = torch.arange(4.0).view(1, 1, 2, 2)  # [[0, 1], [2, 3]]: no symmetry of its own
    got = [v.flatten().tolist() for v in views(x)]
    assert got[0] == [0, 1, 2, 3] and got[1] == [1, 0, 3, 2]  # identity, mirrored
    assert len({tuple(v) for v in got}) == 8  # all 8 arrangements a square allows
    for turn in (torch.rot90(x, 1, dims=(-2, -1)), x.flip(-2), x.flip(-1)):
        assert sorted(v.flatten().tolist() for v in views(turn)) == sorted(got)  # a group


def model_and_images():
    torch.manual_seed(0)
    model = build_model("resnet18", 5).eval()
    return model, torch.randn(3, 3, 32, 32)


@torch.no_grad()
def test_tta_outputs_do_not_change_when_the_image_is_turned_or_flipped():
    model, x = model_and_images()
    plain = model(x)
    tta, features = tta_outputs_and_features(model, x)
    assert tta.shape == (3, 5) and features.shape == (3, 512)
    assert not torch.allclose(tta, plain, atol=1e-4)
    assert torch.allclose(model.fc(features), tta, atol=1e-5)
    for turned in (torch.rot90(x, 1, dims=(-2, -1)), x.flip(-2), x.transpose(-2, -1)):
        assert torch.allclose(tta_outputs_and_features(model, turned)[0], tta, atol=1e-4)


def test_evaluate_and_predict_give_the_same_tta_outputs():
    model, x = model_and_images()
    loader = [(x[:2], torch.tensor([0, 1]), ["a", "b"]), (x[2:], torch.tensor([2]), ["c"])]
    accelerator = Accelerator(cpu=True)
    result = evaluate(model, loader, accelerator, tta=True, with_features=True)
    plain = evaluate(model, loader, accelerator)
    identity = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)  # x is normalised already
    expected = predict_batch(model, x, *identity, tta=True).numpy()
    assert result.keys == ["a", "b", "c"]
    assert abs(result.outputs - expected).max() < 1e-4
    assert abs(plain.outputs - expected).max() > 1e-4  # without --tta: not the same
    assert result.features.shape == (3, 512)


def test_evaluate_cli_tta_matches_the_shared_function(tiny_shards, tmp_path):
    """``evaluate.py --tta`` on a shard folder: each image's probabilities are the softmax of
    the averaged outputs of the same loader images, and metrics.json says TTA was on."""
    import csv
    import json

    from pipeline.loading.loader import EvalSpec, build_loader
    from trainer.evaluate import main
    from trainer.fitting.checkpoint import save_best

    torch.manual_seed(0)
    model = build_model("resnet18", 5).eval()
    config = {"arch": "resnet18", "batch_size": 4, "backend": "torch", "precision": "no"}
    ckpt = tmp_path / "best.pt"
    save_best(
        ckpt, model.state_dict(), arch="resnet18", image_size=64, epoch=1, metrics={}, config=config
    )
    args = ["--checkpoint", str(ckpt), "--shards", str(tiny_shards), "--workers", "0"]
    assert main([*args, "--out", str(tmp_path / "tta"), "--tta"]) == 0
    assert json.loads((tmp_path / "tta" / "metrics.json").read_text())["tta"] is True
    rows = {r["key"]: r for r in csv.DictReader((tmp_path / "tta" / "predictions.csv").open())}
    loader = build_loader(
        tiny_shards,
        EvalSpec(
            split="test", batch_size=13, image_size=64, backend="torch", workers=0, with_keys=True
        ),
    )
    ((images, _, keys),) = list(loader)
    with torch.no_grad():
        probs = torch.softmax(tta_outputs_and_features(model, images)[0], 1)
    for key, p in zip(keys, probs, strict=True):
        got = [float(rows[key][f"p{g}"]) for g in range(5)]
        assert max(abs(a - b) for a, b in zip(got, p.tolist(), strict=True)) < 1e-5, key
