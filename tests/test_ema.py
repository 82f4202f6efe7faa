"""trainer.fitting.ema: the sync-free EMA equals AveragedModel under the same warmed-up decay."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from trainer.fitting.ema import EMA, warmed_decay

DECAY = 0.9


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )


def reference_avg(averaged, current, n_averaged):
    """AveragedModel's multi_avg_fn with the warm-up: update t = n_averaged - 1 (the test
    starts AveragedModel at n_averaged 1, past its copy-the-first-model step)."""
    decay = warmed_decay(DECAY, int(n_averaged) - 1)
    for a, c in zip(averaged, current, strict=True):
        if a.is_floating_point():
            a.mul_(decay).add_(c, alpha=1 - decay)
        else:
            a.copy_(c)


def train_steps(model: nn.Module, averages: list, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        images = torch.randn(6, 3, 8, 8, generator=gen)
        labels = torch.randint(0, 5, (6,), generator=gen)
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
        for average in averages:
            average.update_parameters(model)


def test_warmed_decay_schedule():
    assert warmed_decay(0.999, 0) == 0.1
    assert warmed_decay(0.999, 10) == 11 / 20
    assert warmed_decay(0.9, 10_000) == 0.9


def test_ema_equals_averaged_model_with_the_same_schedule():
    model = small_model()
    ema = EMA(model, DECAY)
    reference = AveragedModel(model, multi_avg_fn=reference_avg, use_buffers=True)
    reference.n_averaged.fill_(1)
    train_steps(model, [ema, reference], steps=30)

    assert ema.updates == 30 and int(ema.n_averaged) == 30
    mine, theirs = ema.module.state_dict(), reference.module.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=1e-6, msg=name)
    # the integer buffer is the model's, copied
    assert int(mine["1.num_batches_tracked"]) == 30
    # and the average is not the model itself
    assert not torch.allclose(mine["4.weight"], model.state_dict()["4.weight"])


def test_state_dict_keeps_averaged_models_layout_and_resumes_exactly():
    model = small_model()
    ema = EMA(model, DECAY)
    train_steps(model, [ema], steps=12)
    state = ema.state_dict()
    assert "n_averaged" in state and all(
        k == "n_averaged" or k.startswith("module.") for k in state
    )
    # an AveragedModel reads it (checkpoints written before EMA keep working, and back)
    AveragedModel(small_model(), use_buffers=True).load_state_dict(state)

    resumed = EMA(small_model(), DECAY)
    resumed.load_state_dict(state)
    assert resumed.updates == 12
    straight_model, resumed_model = small_model(), small_model()
    straight_model.load_state_dict(model.state_dict())
    resumed_model.load_state_dict(model.state_dict())
    train_steps(straight_model, [ema], steps=5)
    train_steps(resumed_model, [resumed], steps=5)
    for (name, a), b in zip(ema.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
