"""trainer/base/model.py: the registry, --weights files of every kind, --pretrained from the cache."""

import pytest
import torch
from torchvision import models

from pipeline.errors import UserError
from trainer.base.model import MODELS, build_model, hub_checkpoint_path, load_weights
from trainer.fitting.config import ARCHS


def same_state(a: dict, b: dict, skip=()) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a if k not in skip)


def test_registry_matches_the_cli_choices():
    assert tuple(MODELS) == ARCHS


def test_five_way_head_and_forward():
    model = build_model("resnet18").eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)
    with pytest.raises(UserError, match="resnet18, resnet50"):
        build_model("vgg16")


def test_weights_full_model_round_trip(tmp_path):
    torch.manual_seed(1)
    source = build_model("resnet18")
    torch.save(source.state_dict(), tmp_path / "full.pt")
    loaded = build_model("resnet18", weights=str(tmp_path / "full.pt"))
    assert same_state(source.state_dict(), loaded.state_dict())
    # a trainer checkpoint ({"model": ...}) and a DDP state dict ("module." keys) load too
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    assert same_state(
        source.state_dict(), build_model("resnet18", weights=tmp_path / "ckpt.pt").state_dict()
    )
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ddp.pt")
    assert same_state(
        source.state_dict(), build_model("resnet18", weights=tmp_path / "ddp.pt").state_dict()
    )


def test_weights_imagenet_backbone_drops_the_1000_way_head(tmp_path):
    torch.manual_seed(2)
    imagenet = models.resnet18(num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "backbone.pt")
    model = build_model("resnet18", weights=str(tmp_path / "backbone.pt"))
    assert model.fc.out_features == 5
    assert same_state(model.state_dict(), imagenet.state_dict(), skip=("fc.weight", "fc.bias"))
    headless = {k: v for k, v in imagenet.state_dict().items() if not k.startswith("fc.")}
    torch.save(headless, tmp_path / "headless.pt")
    model = build_model("resnet18", weights=str(tmp_path / "headless.pt"))
    assert same_state(model.state_dict(), imagenet.state_dict(), skip=("fc.weight", "fc.bias"))


def test_weights_that_do_not_fit_name_a_key(tmp_path):
    torch.save(models.resnet50(num_classes=5).state_dict(), tmp_path / "r50.pt")
    with pytest.raises(UserError, match=r"--weights .*r50.pt does not fit .*conv1\.weight|layer1"):
        build_model("resnet18", weights=str(tmp_path / "r50.pt"))
    state = build_model("resnet18").state_dict()
    del state["layer4.1.bn2.running_var"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(UserError, match="missing, e.g. layer4.1.bn2.running_var"):
        load_weights(build_model("resnet18"), tmp_path / "missing.pt")


def test_weights_file_problems_are_one_sentence(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_model("resnet18", weights=str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a loadable state dict"):
        build_model("resnet18", weights=str(tmp_path / "junk.pt"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="does not hold a state dict"):
        build_model("resnet18", weights=str(tmp_path / "list.pt"))


def test_pretrained_loads_from_the_hub_cache_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = hub_checkpoint_path("resnet18")
    assert cached.is_relative_to(tmp_path / "torch") and cached.name.startswith("resnet18-")
    cached.parent.mkdir(parents=True)
    torch.manual_seed(3)
    imagenet = models.resnet18(num_classes=1000)
    torch.save(imagenet.state_dict(), cached)
    model = build_model("resnet18", pretrained=True)
    assert model.fc.out_features == 5
    assert same_state(model.state_dict(), imagenet.state_dict(), skip=("fc.weight", "fc.bias"))


def test_pretrained_offline_names_weights_and_the_cache(tmp_path, monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as err:
        build_model("resnet50", pretrained=True)
    message = str(err.value)
    assert "--weights" in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "name resolution" in message
