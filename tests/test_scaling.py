"""trainer.fitting.scaling: the GPU run's batch and learning rate advice, the config line's batch
summary, and the process group's timeout the trainer's Accelerator gets."""

from __future__ import annotations

from datetime import timedelta

import pytest

from trainer.fitting.config import TrainConfig, parse_args
from trainer.fitting.scaling import PROCESS_GROUP_TIMEOUT, batch_line, gpu_advice, scaled_lr


def test_lr_scales_linearly_from_the_reference():
    assert scaled_lr(8, 1) == pytest.approx(0.01)
    assert scaled_lr(64, 1) == pytest.approx(0.08)
    assert scaled_lr(64, 8) == pytest.approx(0.64)


def test_gpu_advice_names_the_flags():
    advice = gpu_advice(4)
    assert advice.startswith("--batch-size 64 --lr 0.32 --warmup-epochs 1")
    assert "4 GPU(s)" in advice


def test_batch_line_counts_processes_and_accumulation():
    line = batch_line(16, 2, 4, 0.01)
    assert "--batch-size 16 per process x 2 process(es) x 4 accumulated = 128 images" in line
    assert "--lr 0.01" in line and "would give 0.16" in line


def test_batch_line_hints_linear_scaling_only_where_it_applies():
    chosen = batch_line(16, 2, 4, 0.05)  # an lr given (--lr, or a recipe's): left alone
    assert "--lr 0.05" in chosen and "linear scaling" not in chosen
    huang, _ = parse_args(["--shards", "unused", "--recipe", "huang2023"])
    line = batch_line(huang.batch_size, 1, huang.grad_accumulation, huang.lr)
    assert f"--lr {huang.lr:g}" in line and "linear scaling" not in line
    assert "linear scaling" not in batch_line(8, 1, 1, 0.01)  # the reference batch itself


def test_the_trainers_accelerator_waits_longer_than_nccls_default():
    from trainer.fitting.building import build_accelerator

    accelerator = build_accelerator(TrainConfig(shards="unused"))
    assert PROCESS_GROUP_TIMEOUT > timedelta(minutes=10)
    assert accelerator.init_handler.to_kwargs()["timeout"] == PROCESS_GROUP_TIMEOUT


def test_doctor_gives_the_gpu_run_flags_for_the_gpus_it_sees(monkeypatch):
    from tools import doctor

    monkeypatch.setattr(doctor, "torch_gpus", lambda: 0)
    assert doctor.check_gpu_run().status == doctor.SKIP
    monkeypatch.setattr(doctor, "torch_gpus", lambda: 8)
    result = doctor.check_gpu_run()
    assert result.status == doctor.OK
    assert result.found.startswith("--batch-size 64 --lr 0.64 ")
