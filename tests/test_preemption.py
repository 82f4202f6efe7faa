"""Runs that survive preemption and restarts: a signal stops every rank at the same step,
--resume (or --resume auto) continues to the weights of an uninterrupted run, and the
SLURM script and torchrun's restarts get there too. Only 127.0.0.1 is used."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, STRAIGHT_RECIPE, TRAIN, free_port, launch, python, run_env, shared

from pipeline.errors import UserError
from trainer.fitting.checkpoint import load_last
from trainer.fitting.preemption import PREEMPTED_EXIT, TEST_HOOK, StopFlag

TIMING = ("images_per_s", "epoch_s", "first_batch_s")


def checksums(run: Path) -> list[str]:
    return json.loads((run / "summary.json").read_text())["weights_sha256_per_rank"]


def rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def wait_for(path: Path, proc: subprocess.Popen, limit_s: float = 300) -> None:
    """Until ``path`` exists (the process must still run); bounded."""
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert proc.poll() is None, "the run ended before the moment the test waits for"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.fixture(scope="session")
def ddp_reference(tiny_shards, tmp_path_factory) -> Path:
    """Two CPU ranks, STRAIGHT_RECIPE, uninterrupted: the weights every test here must reach."""

    def build(tmp: Path) -> Path:
        launch(TRAIN, "--shards", tiny_shards, "--out", tmp / "run", *STRAIGHT_RECIPE, tmp=tmp,
               processes=2)  # fmt: skip
        return tmp / "run"

    return shared(tmp_path_factory, "ddp_reference", build)


def test_a_signal_flag_is_raised_and_the_handlers_put_back():
    before = signal.getsignal(signal.SIGTERM)
    flag = StopFlag(world_size=1, rank=0)
    try:
        assert not flag.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.agreed() and flag.name == "SIGUSR1"
    finally:
        flag.close()
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_both_mid_epoch_and_resume_ends_alike(
    ddp_reference, tiny_shards, tmp_path
):
    """SIGTERM reaches rank 0 alone after step 1 of epoch 2: both ranks stop there (they
    agree on it), last/ records the place, and --resume ends with the reference's weights."""
    run = tmp_path / "run"
    args = ["--shards", tiny_shards, "--out", run, *STRAIGHT_RECIPE]
    proc = launch(TRAIN, *args, tmp=tmp_path, processes=2, check=False,
                  env=run_env(tmp_path, **{TEST_HOOK: "2:1"}))  # fmt: skip
    assert f"exitcode  : {PREEMPTED_EXIT}" in proc.stderr  # the ranks' status (docs/cluster.md)
    assert "stopped by SIGTERM after step 1 of epoch 2" in proc.stdout
    state = load_last(run)
    assert (state["epoch"], state["step"], len(state["partial"])) == (1, 1, 2)
    assert not (run / "summary.json").exists() and len(rows(run)) == 1
    proc = launch(TRAIN, "--out", run, "--resume", "--quiet", tmp=tmp_path, processes=2)
    assert "resuming" in proc.stdout and "step 1 of epoch 2" in proc.stdout
    assert checksums(run) == checksums(ddp_reference)
    assert rows(run) == rows(ddp_reference)


@pytest.mark.slow
def test_sigterm_to_the_launcher_then_resume_auto(straight_run, tiny_shards, tmp_path):
    """`kill` to `accelerate launch` (one process) once epoch 1 is saved: the rank stops with
    a checkpoint, and `--resume auto` continues to the uninterrupted run's weights."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
           "--mixed_precision", "no", TRAIN, "--shards", str(tiny_shards), "--out", str(run),
           *STRAIGHT_RECIPE]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(run / "checkpoints" / "last" / "state.pt", proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    if (run / "summary.json").exists():
        pytest.skip("the run finished before the signal reached it (a very fast machine)")
    assert "stopped by SIGTERM" in out, err[-2000:]
    python(TRAIN, "--out", run, "--resume", "auto", "--quiet", tmp=tmp_path)
    assert checksums(run) == checksums(straight_run)
    assert rows(run) == rows(straight_run)


SRUN = r"""#!/bin/bash
# srun for one machine: each "node" is a process with its own SLURM_NODEID.
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "${@:3}" > "$FAKE_LOG.$node" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
SCONTROL = r"""#!/bin/bash
# scontrol for one machine: every host of the job is 127.0.0.1; a requeue is recorded.
case "$1 $2" in
    "show hostnames") for ((i = 0; i < SLURM_NNODES; i++)); do echo 127.0.0.1; done ;;
    requeue*) echo "$2" >> "$FAKE_LOG.requeued" ;;
esac
"""


def shim(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.slow
def test_the_slurm_script_trains_two_nodes_to_the_end(ddp_reference, tiny_shards, tmp_path):
    """tools/slurm/train.sbatch under a fake SLURM: 2 nodes x 1 CPU rank on localhost,
    machine ranks from each node's own SLURM_NODEID, --resume auto in an empty folder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim(bin_dir, "srun", SRUN)
    shim(bin_dir, "scontrol", SCONTROL)
    run, log = tmp_path / "run", tmp_path / "node"
    env = run_env(
        tmp_path,
        PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="fake[1-2]",
        SLURM_SUBMIT_DIR=str(ROOT),
        DR_MAIN_PORT=str(free_port()),
        DR_PRECISION="no",
        FAKE_LOG=str(log),
    )
    env.pop("SLURM_GPUS_ON_NODE", None)
    proc = subprocess.run(
        ["bash", "tools/slurm/train.sbatch", "--shards", str(tiny_shards), "--out", str(run),
         *STRAIGHT_RECIPE],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    logs = "".join(Path(f"{log}.{n}").read_text() for n in range(2) if Path(f"{log}.{n}").exists())
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs[-3000:]
    assert "finished" in proc.stdout and not Path(f"{log}.requeued").exists()
    config = json.loads((run / "config.json").read_text())
    assert config["environment"]["world_size"] == 2
    assert checksums(run) == checksums(ddp_reference)


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_and_the_run_ends_alike(
    ddp_reference, tiny_shards, tmp_path
):
    """torchrun --max-restarts 1 with c10d rendezvous: one rank SIGKILLed in epoch 2 brings
    both back, they continue from last/ (--resume auto), and end with the reference's weights."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--max-restarts", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", TRAIN, "--resume", "auto",
           "--shards", str(tiny_shards), "--out", str(run), *STRAIGHT_RECIPE]  # fmt: skip
    log = tmp_path / "torchrun.log"
    # torchrun shares its rendezvous store with the workers' process group by default, and a
    # restarted worker can then read the previous attempt's addresses (pytorch#135712)
    env = run_env(tmp_path, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(run / "checkpoints" / "last" / "state.pt", proc)
        ranks = psutil.Process(proc.pid).children()
        assert len(ranks) == 2, ranks
        ranks[1].kill()
        proc.wait(timeout=600)
    finally:
        proc.kill()
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    if "resuming" not in out:
        pytest.skip("epoch 2 ended before the kill reached it (a very fast machine)")
    assert checksums(run) == checksums(ddp_reference)
    assert rows(run) == rows(ddp_reference)


def test_resume_auto_needs_out(tmp_path):
    proc = python(TRAIN, "--resume", "auto", tmp=tmp_path, check=False)
    assert proc.returncode == 2 and "--resume auto needs --out" in proc.stderr


def test_a_mid_epoch_checkpoint_resumes_only_on_its_own_rank_count():
    """Each rank's place in an epoch is its own slice: a checkpoint written inside an epoch by
    2 ranks is refused on 1, in one line; one written at an epoch's end has no place."""
    from trainer.fitting.resume import position_in_epoch

    state = {"epoch": 1, "step": 3, "partial": [[1.0, 2.0, 1.0, 8.0], [3.0, 2.0, 0.0, 8.0]]}
    with pytest.raises(UserError, match="resume it on 2"):
        position_in_epoch(state, world_size=1, rank=0)
    position = position_in_epoch(state, world_size=2, rank=1)
    assert position.step == 3 and position.totals == (3.0, 2.0, 0.0, 8.0)
    assert position_in_epoch({"epoch": 1, "row": {}}, world_size=1, rank=0) is None
