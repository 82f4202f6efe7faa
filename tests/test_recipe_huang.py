"""Issue 18: the regress head made right (MSE, its clipping, no class weights, fp32 outputs),
both eyes (joint blend and cut-points, feature fusion through dr-fuse), small-val epoch
selection, the EMA's warm-up, the full-ROC operating point, and the huang2023 recipe; one
end-to-end run of that recipe (resnet50 at 32 px) shared by the tests at the end."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from tests.conftest import build_shard_dir, shared
from trainer.base.heads import build_head
from trainer.base.metrics import kappa_of, operating_threshold
from trainer.base.model import backbone_features, build_model
from trainer.fitting.config import RECIPE_NAMES, TrainConfig, parse_args
from trainer.fitting.ema import warmed_decay
from trainer.fitting.engine import build_optimizer, build_scheduler, train_step
from trainer.fitting.recipes import HUANG2023, RECIPES, REGRESS_MSE_CLIP, resolve
from trainer.judging.evaluation import EvalResult
from trainer.judging.pairing import blend_partners, choose_blend, choose_blend_and_cuts
from trainer.judging.selection import SMALL_VAL, selection_for

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the regress head


def test_class_weights_are_refused_for_the_regress_head():
    with pytest.raises(UserError, match="--class-weights applies to the classify and ordinal"):
        TrainConfig(head="regress", class_weights="sqrt")
    with pytest.raises(UserError, match="--class-weights"):
        parse_args(["--recipe", "huang2023", "--class-weights", "inverse"])
    TrainConfig(head="ordinal", class_weights="sqrt")  # still fine where it means something


def test_mse_is_the_regress_default_and_brings_its_clipping(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg, _ = parse_args(["--head", "regress"])
    assert (cfg.regress_loss, cfg.clip_grad) == ("mse", REGRESS_MSE_CLIP)
    assert build_head("regress").loss == "mse"
    assert parse_args(["--head", "regress", "--clip-grad", "5"])[0].clip_grad == 5.0
    assert parse_args(["--head", "regress", "--regress-loss", "smoothl1"])[0].clip_grad is None
    assert parse_args([])[0].clip_grad is None  # classify: as before


def _mse_losses(clip: float | None, steps: int = 10) -> list[float]:
    """A fresh resnet18 regress head trained with MSE at the reference lr 0.01 on 16 px
    images whose grade shows in the red channel, through the trainer's own train_step."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = build_model("resnet18", 1)
    optimizer = build_optimizer(model, 0.01, 0.9, 5e-4)
    scheduler = build_scheduler(optimizer, "constant", 0, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    rng = torch.Generator().manual_seed(0)
    mix = torch.tensor([0.735, 0.07, 0.15, 0.025, 0.02])  # EyePACS' grades
    losses = []
    for _ in range(steps):
        labels = torch.multinomial(mix, 8, replacement=True, generator=rng)
        images = torch.randn(8, 3, 16, 16, generator=rng) * 0.5
        images[:, 0] += labels[:, None, None] * 0.3
        _, loss_sum, weight_sum = train_step(
            model,
            images,
            labels,
            optimizer,
            scheduler,
            accelerator,
            build_head("regress"),
            clip_grad=clip,
        )
        losses.append(float(loss_sum / weight_sum))
    return losses


def test_mse_at_lr_001_stays_finite_with_the_regress_default_and_blows_up_without():
    clip = parse_args(["--head", "regress"])[0].clip_grad
    assert all(math.isfinite(loss) and loss < 100 for loss in _mse_losses(clip))
    unclipped = _mse_losses(None)
    assert not all(math.isfinite(loss) and loss < 1e6 for loss in unclipped), unclipped


def test_the_last_layer_is_fp32_under_bf16_autocast():
    model = build_model("resnet18", 1).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.float32
        assert backbone_features(model, x).dtype == torch.bfloat16  # the rest is bf16
    with torch.inference_mode():
        assert torch.equal(model(x), model.fc(backbone_features(model, x)))
    assert set(model.state_dict()) == set(
        __import__("torchvision").models.resnet18(num_classes=1).state_dict()
    )


# ---------------------------------------------------------------- both eyes


def _paired_val(seed: int, n: int = 300, noise: float = 0.8):
    rng = np.random.default_rng(seed)
    patients = rng.choice(5, size=n, p=[0.6, 0.1, 0.2, 0.05, 0.05])
    keys = [f"{p}_{eye}" for p in range(n) for eye in ("left", "right")]
    labels = np.repeat(patients, 2)
    scores = (0.7 * labels + 0.2 + rng.normal(0, noise, 2 * n)).astype(np.float32)[:, None]
    return keys, labels, scores


@pytest.mark.parametrize("seed", range(4))
def test_joint_blend_and_cuts_never_score_below_a_blend_with_fixed_cuts(seed):
    from trainer.base.heads import tune_cuts

    keys, labels, scores = _paired_val(seed)
    head = build_head("regress")
    cuts = tune_cuts(scores[:, 0], labels)
    fixed_weight = choose_blend(keys, scores, lambda o: kappa_of(labels, head.grades(o, cuts)))
    fixed = kappa_of(labels, head.grades(blend_partners(keys, scores, fixed_weight), cuts))
    weight, joint_cuts = choose_blend_and_cuts(keys, scores, labels, cuts)
    joint = kappa_of(labels, head.grades(blend_partners(keys, scores, weight), joint_cuts))
    assert joint >= fixed - 1e-12 and list(joint_cuts) == sorted(joint_cuts)
    # without partners there is nothing to blend, and the cuts stay those of each eye
    assert choose_blend_and_cuts([f"{i}_left" for i in range(4)], scores[:4], labels[:4], cuts) == (
        0.0,
        cuts,
    )


def test_fusion_head_learns_from_the_partner_and_is_applied_as_stored(tmp_path):
    """Both eyes share the grade and each eye's own score is noisy: the partner's features
    tell the fusion head what the eye alone cannot."""
    from trainer.judging.fusion import (
        FusionSettings,
        fused_outputs,
        fused_result,
        pair_features,
        train_fusion,
    )

    rng = np.random.default_rng(0)

    def split(n):
        keys, labels, scores = _paired_val(int(rng.integers(1000)), n)
        features = rng.normal(0, 1, (len(keys), 8)).astype(np.float32)
        features[:, 0] = scores[:, 0]  # what the single-eye head reads
        return EvalResult(
            loss=0.0, keys=keys, labels=labels, outputs=scores, head=build_head("regress"),
            features=features,
        )  # fmt: skip

    train, val = split(200), split(60)
    assert pair_features(["1_left", "2_left"], np.eye(2, dtype=np.float32)).tolist() == [
        [1, 0, 1, 0],  # no partner: the eye's own features twice
        [0, 1, 0, 1],
    ]
    fusion = train_fusion(train, val, build_head("regress"), FusionSettings(epochs=15, hidden=16))
    assert fusion["selected_by"] == "val_mse" and len(fusion["history"]) == 15
    cuts = fusion["cut_points"]
    assert len(cuts) == 4 and cuts == sorted(cuts)
    torch.save(fusion, tmp_path / "f.pt")  # what best.pt holds must load with weights_only
    stored = torch.load(tmp_path / "f.pt", weights_only=True)
    outputs = fused_outputs(stored, val.keys, val.features, val.outputs)
    kappa = kappa_of(val.labels, build_head("regress").grades(outputs, cuts))
    assert kappa == pytest.approx(
        max(r["val_qwk"] for r in fusion["history"] if r["epoch"] == fusion["epoch"])
    )
    alone = kappa_of(val.labels, build_head("regress").grades(val.outputs, cuts))
    assert kappa > alone + 0.02
    assert fused_result(stored, val).kappa == pytest.approx(kappa)
    with pytest.raises(UserError, match="run dr-fuse on it again"):  # an older head
        fused_outputs(
            {k: v for k, v in stored.items() if k != "residual"},
            val.keys,
            val.features,
            val.outputs,
        )


# ---------------------------------------------------------------- choosing on val


def test_small_val_chooses_the_regress_epoch_by_mse():
    small, large = (
        selection_for("regress", "val", SMALL_VAL - 1),
        selection_for("regress", "val", SMALL_VAL),
    )
    assert (small.key, small.higher_is_better) == ("val_mse", False)
    assert (large.key, large.higher_is_better) == ("val_qwk", True)
    assert selection_for("classify", "val", 10).key == "val_qwk"  # nothing tuned in it
    first = {"val_mse": 1.0, "val_qwk": 0.2}
    assert small.better({"val_mse": 0.9, "val_qwk": 0.1}, first)  # lower MSE wins, kappa aside
    assert not small.better({"val_mse": 1.0, "val_qwk": 0.9}, first)  # the first of equals stays


def test_operating_point_is_the_highest_threshold_reaching_the_sensitivity():
    # ten positives above every negative: sklearn's thinned ROC keeps only the last of them
    scores = np.array([10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0.5, 0.4, 0.3, 0.2], dtype=float)
    positive = np.arange(14) < 10
    assert operating_threshold(positive, scores, 0.9) == 2.0  # 9 of 10 at >= 2


def test_ema_decay_warms_up():
    # the update rule itself is checked against AveragedModel in tests/test_ema.py
    assert warmed_decay(0.999, 0) == pytest.approx(0.1)
    assert warmed_decay(0.999, 1) == pytest.approx(2 / 11)
    assert warmed_decay(0.999, 100) == pytest.approx(101 / 110)
    assert warmed_decay(0.9, 100) == 0.9 and warmed_decay(0.999, 10**6) == 0.999


# ---------------------------------------------------------------- the recipe


def test_huang2023_resolves_to_its_specification(monkeypatch):
    assert set(RECIPE_NAMES) == set(RECIPES)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg, given = parse_args(["--recipe", "huang2023"])
    assert {k: getattr(cfg, k) for k in HUANG2023} == HUANG2023
    assert cfg.batch_size == 16 and given == {"recipe"}
    augment = cfg.augment_config()
    assert (augment.hflip, augment.vflip, augment.rotate, augment.scale, augment.color) == (
        True,
        True,
        180.0,
        0.0,
        0.2,
    )
    monkeypatch.setenv("WORLD_SIZE", "2")  # a global batch of 16: 8 per process
    assert parse_args(["--recipe", "huang2023"])[0].batch_size == 8
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match="does not divide among 3"):
        parse_args(["--recipe", "huang2023"])
    assert parse_args(["--recipe", "huang2023", "--batch-size", "5"])[0].batch_size == 5
    monkeypatch.delenv("WORLD_SIZE")
    mine = parse_args(
        ["--recipe", "huang2023", "--lr", "0.003", "--clip-grad", "2", "--head", "classify"]
    )[0]
    assert (mine.lr, mine.clip_grad, mine.head, mine.epochs) == (0.003, 2.0, "classify", 25)
    assert parse_args(["--recipe", "reference"])[0] == parse_args([])[0]
    weights = resolve(TrainConfig(recipe="huang2023", weights="w.pt"), {"recipe", "weights"})
    assert not weights.pretrained and weights.weights == "w.pt"


def test_clipped_cosine_and_nesterov():
    model = torch.nn.Linear(2, 1)
    optimizer = build_optimizer(model, 1e-3, 0.9, 5e-4, nesterov=True)
    assert optimizer.param_groups[0]["nesterov"]
    scheduler = build_scheduler(optimizer, "cosine", 0, 100, floor=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-3) and min(lrs) == pytest.approx(1e-4)
    assert lrs[40] > 1e-4 and lrs[90] == pytest.approx(1e-4)  # clipped, not cosine's ~6e-6


# ---------------------------------------------------------------- one run of the recipe


def _env(tmp: Path) -> dict:
    return dict(
        os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1", TORCH_HOME=str(tmp / "torch")
    )


def _run(args: list, tmp: Path, launcher: list | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*(launcher or [sys.executable]), *map(str, args)],
        cwd=ROOT,
        env=_env(tmp),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def huang_run(tmp_path_factory) -> dict:
    """``accelerate launch trainer/train.py --arch resnet50 --recipe huang2023`` on paired
    shards (a random resnet50 as --weights: no download), 1 epoch at 32 px, then dr-fuse."""
    return shared(tmp_path_factory, "huang_run", _huang_run)


def _huang_run(tmp: Path) -> dict:
    shards = build_shard_dir(
        tmp / "shards", {"train": 32, "val": 16, "test": 16}, pairs=True, seed=5
    )
    torch.manual_seed(0)
    torch.save(build_model("resnet50", 1).state_dict(), tmp / "resnet50.pt")
    run = tmp / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    train = _run(
        [
            "trainer/train.py",
            "--arch",
            "resnet50",
            "--recipe",
            "huang2023",
            "--weights",
            tmp / "resnet50.pt",
            "--shards",
            shards,
            "--out",
            run,
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--backend",
            "torch",
            "--workers",
            "0",
            "--quiet",
        ],
        tmp,
        launch,
    )
    fuse = [*("tools/fuse.py", "--checkpoint", run / "best.pt", "--shards", shards)]
    fuse += ["--epochs", "3", "--hidden", "16", "--backend", "torch", "--workers", "0"]
    fused = _run([*fuse, "--out", tmp / "fuse"], tmp)
    return {"tmp": tmp, "shards": shards, "run": run, "train": train, "fuse": fused}


@pytest.fixture(scope="session")
def huang_eval(huang_run, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """evaluate.py --pair-eyes of the recipe run's best.pt on test (the fused one)."""
    return shared(tmp_path_factory, "huang_eval", lambda tmp: _huang_eval(huang_run, tmp))


def _huang_eval(huang_run: dict, tmp: Path) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp / "eval"
    args = ["--checkpoint", huang_run["run"] / "best.pt", "--shards", huang_run["shards"]]
    proc = _run(
        ["trainer/evaluate.py", *args, "--out", out, "--pair-eyes", "--backend", "torch"],
        tmp,
    )
    return proc, out


@pytest.mark.slow
def test_the_recipe_run_records_every_resolved_value(huang_run):
    saved = json.loads((huang_run["run"] / "config.json").read_text())["config"]
    overridden = {"image_size": 32, "epochs": 1, "pretrained": False}  # given, or by --weights
    assert saved["recipe"] == "huang2023" and saved["batch_size"] == 16
    assert {k: saved[k] for k in HUANG2023} == HUANG2023 | overridden
    row = json.loads((huang_run["run"] / "metrics.jsonl").read_text().splitlines()[0])
    assert row["selected_by"] == "val_mse" and "val_mse" in row
    # 16 val images and no --tune-cuts: the fixed cut-points, said in the log
    assert row["cut_points"] == [0.5, 1.5, 2.5, 3.5] and row["pair_cut_points"] is None
    assert "keeps the cut-points 0.5/1.5/2.5/3.5" in huang_run["train"].stdout
    assert "lowest val MSE" in huang_run["train"].stdout.strip().splitlines()[-1]
    # --normalize dataset: best.pt carries the train split's own statistics
    best = torch.load(huang_run["run"] / "best.pt", map_location="cpu", weights_only=False)
    stats = json.loads((huang_run["shards"] / "manifest.json").read_text())["channel_stats"]
    assert (best["mean"], best["std"]) == (stats["mean"], stats["std"])


@pytest.mark.slow
def test_fusion_is_stored_and_evaluate_applies_it(huang_run, huang_eval):
    from trainer.base.bestfile import load_best

    info = load_best(huang_run["run"] / "best.pt")[1]
    fusion = info["fusion"]
    assert fusion["features"] == 2048 and fusion["outputs"] == 1 and 1 <= fusion["epoch"] <= 3
    report = json.loads((huang_run["tmp"] / "fuse" / "fusion.json").read_text())
    assert report["kappa"] == fusion["kappa"] and "state" not in report
    assert "both eyes fused" in huang_run["fuse"].stdout
    proc, out = huang_eval
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pair_method"] == "fusion"
    assert metrics["qwk"] == metrics["qwk_fused"] == pytest.approx(fusion["kappa"]["test"]["fused"])
    assert metrics["qwk_both_eyes"] == pytest.approx(fusion["kappa"]["test"]["blend"])
    assert metrics["qwk_eye_alone"] == pytest.approx(fusion["kappa"]["test"]["eye_alone"])
    assert "both eyes fused" in proc.stdout


@pytest.mark.slow
def test_predict_pair_eyes_gives_the_fused_outputs_evaluate_gives(huang_run, huang_eval, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for tar_path in sorted(huang_run["shards"].glob("test-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    data = tar.extractfile(member).read()
                    (photos / member.name.replace(".jpg", ".jpeg")).write_bytes(data)
    best = huang_run["run"] / "best.pt"
    _run(
        ["tools/predict.py", "--checkpoint", best, photos, "--out", tmp_path, "--pair-eyes"],
        tmp_path,
    )
    evaluated = {r["key"]: r for r in csv.DictReader((huang_eval[1] / "predictions.csv").open())}
    predicted = {
        Path(r["image"]).stem: r for r in csv.DictReader((tmp_path / "predictions.csv").open())
    }
    assert set(evaluated) == set(predicted) and len(predicted) == 16
    for key, row in evaluated.items():
        assert int(row["pred"]) == int(predicted[key]["grade"]), key
        for g in range(5):
            assert abs(float(row[f"p{g}"]) - float(predicted[key][f"p{g}"])) <= 1e-5, (key, g)


@pytest.mark.slow
def test_export_metadata_names_the_fusion_head(huang_run):
    from tools.export import metadata
    from trainer.base.bestfile import load_best

    info = load_best(huang_run["run"] / "best.pt")[1]
    meta = {k: json.loads(v) for k, v in metadata(info).items()}
    assert meta["cut_points"] == info["cut_points"]
    # fixed cut-points on its 16 val images: none for blends either, and so none exported
    assert meta.get("pair_cut_points") == info["pair_cut_points"]
    assert meta["fusion"]["cut_points"] == info["fusion"]["cut_points"]
    assert meta["fusion"]["features"] == 2048 and "state" not in meta["fusion"]
