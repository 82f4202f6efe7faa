"""Where the model looks (trainer/judging/explain.py): Grad-CAM finds the evidence a model was trained
on, lesion masks follow the photograph's preparation, make_synthetic --masks."""

from __future__ import annotations

import io
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.errors import UserError
from pipeline.writing.preprocess import fundus_circle, prepare
from tools.lesion_heat import others_ratio
from tools.make_synthetic import DRAWN_GRADES, MASKS_DIR, generate
from trainer.judging.explain import (
    SCALE_WIDTH,
    fundus_of,
    grad_cam,
    heat_colours,
    lesion_heat,
    mask_as_model_saw,
    overlay,
    target_score,
)

SIZE = 32


def spot_images(n: int, rng: np.random.Generator):
    """Orange noisy discs; half hold one dark-red spot (label 2, "referable"), the others
    none (label 0). The spot is the only evidence, and its mask is known."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = np.hypot(xx - SIZE / 2, yy - SIZE / 2) < SIZE * 0.47
    images, masks, labels = [], [], []
    for i in range(n):
        img = np.zeros((SIZE, SIZE, 3), np.float32)
        img[disc] = (200, 92, 42)
        img += rng.normal(0, 12, img.shape) * disc[..., None]
        mask = np.zeros((SIZE, SIZE), bool)
        if i % 2:
            cy, cx = rng.integers(9, SIZE - 9, 2)
            mask = np.hypot(xx - cx, yy - cy) <= 2.5
            img[mask] = (88, 10, 8)
        images.append(img.clip(0, 255).astype(np.uint8))
        masks.append(mask)
        labels.append(2 * (i % 2))
    return np.stack(images), np.stack(masks), np.array(labels)


def as_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5


def tiny_cnn() -> nn.Module:
    """Two convolutions, a global average and a 5-way layer; ``layer3`` for the map."""
    return nn.Sequential(
        OrderedDict(
            layer1=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
            layer3=nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(16, 5),
        )
    )


def test_the_map_points_at_the_evidence_a_trained_model_uses():
    """A model trained until it tells spot from no spot puts most of its heat on the spot,
    which covers a few per cent of the disc."""
    rng = np.random.default_rng(0)
    train, _, labels = spot_images(96, rng)
    test, masks, test_labels = spot_images(16, rng)
    torch.manual_seed(0)
    model = tiny_cnn()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    x, y = as_input(train), torch.from_numpy(labels)
    for _ in range(240):  # until the loss is small: ~7x the area share by then (2 seeds)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    cams, outputs = grad_cam(model, as_input(test), "classify")
    assert (outputs.argmax(1) == test_labels).mean() >= 0.9, "the model did not learn the spot"
    assert cams.shape == (16, SIZE, SIZE) and cams.min() >= 0 and cams.max() <= 1
    shares = [
        lesion_heat(cam, mask, fundus_of(img))
        for cam, mask, img, label in zip(cams, masks, test, test_labels, strict=True)
        if label == 2
    ]
    heat, area = np.mean(shares, axis=0)
    assert area < 0.06
    assert heat > 4 * area, f"heat share {heat:.3f} against area share {area:.3f}"


def test_target_score_per_head():
    out = torch.tensor([[0.1, 2.0, -1.0, 0.0, 0.5], [3.0, 0.0, 0.0, 0.0, 0.0]])
    referable = torch.logsumexp(out[:, 2:], 1) - torch.logsumexp(out[:, :2], 1)
    assert target_score("classify", out).tolist() == pytest.approx(referable.tolist())
    p = out.softmax(1)  # the default is the log-odds of P(grade >= 2)
    assert referable.tolist() == pytest.approx(
        torch.log(p[:, 2:].sum(1) / p[:, :2].sum(1)).tolist()
    )
    assert target_score("classify", out, "predicted").tolist() == [2.0, 3.0]
    expected = (p * torch.arange(5.0)).sum(1)
    assert target_score("classify", out, "expected").tolist() == pytest.approx(expected.tolist())
    assert target_score("regress", out[:, :1]).tolist() == pytest.approx([0.1, 3.0])
    assert target_score("regress", out[:, :1], "expected").tolist() == pytest.approx([0.1, 3.0])
    ordinal = torch.tensor([[1.0, -0.5, -2.0, -3.0], [-1.0, 2.0, 0.0, 0.0]])
    assert target_score("ordinal", ordinal).tolist() == [-0.5, -1.0]  # min(z0, z1)
    above = torch.sigmoid(torch.tensor([[1.0, -0.5, -2.0, -3.0], [-1.0, -1.0, -1.0, -1.0]]))
    assert target_score("ordinal", ordinal, "expected").tolist() == pytest.approx(
        above.sum(1).tolist()  # sum of the non-increasing P(grade > k)
    )
    with pytest.raises(UserError, match="classify head"):
        target_score("ordinal", ordinal, "predicted")
    with pytest.raises(UserError, match="unknown map target"):
        target_score("classify", out, "lesions")


def test_grad_cam_names_a_missing_stage():
    with pytest.raises(UserError, match="no stage 'layer4'"):
        grad_cam(tiny_cnn(), torch.zeros(1, 3, SIZE, SIZE), "classify", layer="layer4")


def test_others_masks_baseline_separates_following_from_favouring_a_place():
    """Maps that sit on each photograph's own lesion beat the other photographs' masks; one
    fixed map does not, however well its place suits lesions in general."""
    fundus = np.ones((16, 16), bool)
    masks, following = [], []
    for i in range(4):
        mask = np.zeros((16, 16), bool)
        mask[4 * i : 4 * i + 2, 6:8] = True
        masks.append(mask)
        following.append(mask * 1.0 + 0.001)
    fixed = [np.mean(masks, axis=0) + 0.01] * 4
    fundi = [fundus] * 4
    assert others_ratio(following, masks, fundi) < 0.1
    assert others_ratio(fixed, masks, fundi) == pytest.approx(
        np.mean([lesion_heat(c, m, fundus)[0] for c, m in zip(fixed, masks, strict=True)])
        / (4 / 256)
    )
    assert np.isnan(others_ratio(following[:1], masks[:1], fundi[:1]))


def test_lesion_heat_shares():
    fundus = np.zeros((4, 4), bool)
    fundus[:, :2] = True  # 8 pixels
    lesions = np.zeros((4, 4), bool)
    lesions[0, 0] = lesions[0, 3] = True  # one inside the fundus, one outside
    cam = np.zeros((4, 4))
    cam[0, 0], cam[1, 1], cam[0, 3] = 3.0, 1.0, 100.0
    assert lesion_heat(cam, lesions, fundus) == (0.75, 0.125)


def test_mask_follows_the_photographs_preparation(tmp_path):
    """A 3:2 frame with black borders is cropped, padded and resized into the shards; a
    mask carried through the same steps still lies on the painted spot."""
    photo = np.zeros((120, 180, 3), np.uint8)
    yy, xx = np.mgrid[:120, :180]
    eye = np.hypot(xx - 95, yy - 60) < 55
    photo[eye] = (200, 92, 42)
    spot = np.hypot(xx - 120, yy - 40) < 6
    photo[spot] = (40, 200, 40)
    Image.fromarray(photo).save(tmp_path / "p.jpeg", quality=95)
    Image.fromarray(spot.astype(np.uint8) * 255).save(tmp_path / "m.png")
    prepared = np.asarray(Image.open(io.BytesIO(prepare(tmp_path / "p.jpeg", 64))))
    mask = mask_as_model_saw(tmp_path / "p.jpeg", tmp_path / "m.png", 64, 64)
    green = (prepared[..., 1] > 120) & (prepared[..., 0] < 120)
    assert green.sum() > 5
    assert (green & mask).sum() / green.sum() > 0.9  # the spot's pixels are in the mask
    assert mask.sum() < 3 * green.sum()  # and the mask is not much more than the spot


def test_masks_leave_the_pictures_as_they_were(tmp_path):
    generate(tmp_path / "plain", n=10, size=48, layout="kaggle", seed=4)
    generate(tmp_path / "masked", n=10, size=48, layout="kaggle", seed=4, masks=True)
    for photo in sorted((tmp_path / "plain/train").glob("*.jpeg")):
        assert photo.read_bytes() == (tmp_path / "masked/train" / photo.name).read_bytes()
    rows = (tmp_path / "masked" / MASKS_DIR / DRAWN_GRADES).read_text().splitlines()
    assert rows[0] == "image,drawn" and len(rows) == 11
    for row in rows[1:]:
        name, grade = row.split(",")
        mask = np.asarray(Image.open(tmp_path / "masked" / MASKS_DIR / f"{name}.png"))
        assert mask.shape == (48, 48) and set(np.unique(mask)) <= {0, 255}
        assert (mask.any()) == (int(grade) > 0), name  # lesions from grade 1 on, none at 0


def test_overlay_is_both_pictures_side_by_side_with_a_colour_scale():
    pixels = np.full((32, 32, 3), 100, np.uint8)
    cam = np.zeros((32, 32))
    cam[:16] = 1.0
    image = overlay(pixels, cam, "a\nb")
    assert image.width == 2 * 256 + 16 + SCALE_WIDTH and image.height > 256
    left, right = np.asarray(image)[10, 10], np.asarray(image)[10, 256 + 8 + 10]
    assert tuple(left) == (100, 100, 100) and tuple(right) != (100, 100, 100)
    scale = np.asarray(image)[:256, 2 * 256 + 16 + 4]  # a column of the colour bar
    assert tuple(scale[0]) == tuple(heat_colours(np.ones((1, 1)))[0, 0])  # 1 at the top
    assert tuple(scale[-1]) == tuple(heat_colours(np.zeros((1, 1)))[0, 0])  # 0 at the bottom


def test_no_heat_outside_the_fundus_circle():
    """A model that looks only at the corners gets a map of zeros there, and nothing else."""
    torch.manual_seed(0)
    model = tiny_cnn()
    images = torch.zeros(2, 3, SIZE, SIZE)
    images[:, :, :4, :4] = 3.0  # bright corners, outside the eye's circle
    images[:, :, 12:20, 12:20] = torch.rand(2, 3, 8, 8)  # and something inside it
    raw, _ = grad_cam(model, images, "classify", fundus_only=False)
    cams, _ = grad_cam(model, images, "classify")
    outside = ~fundus_circle(SIZE, SIZE)
    assert raw[:, outside].max() > 0  # the unmasked map does put heat there
    assert cams[:, outside].max() == 0 and cams.max() == pytest.approx(1.0)
    inside = raw[:, ~outside] / raw[:, ~outside].max(axis=1, keepdims=True)
    assert cams[:, ~outside] == pytest.approx(inside, abs=1e-6)
