"""Preemption: SIGTERM or SIGUSR1 -> every rank stops at the same step -> checkpoint -> exit 75.

A cluster takes a node back with a signal: SLURM sends SIGUSR1 before the time limit
(``--signal``) and SIGTERM at it, Kubernetes and spot instances SIGTERM. The signal may
reach one rank, all of them, or the launcher (torch elastic passes SIGTERM on to its
workers; tools/slurm/train.sbatch makes it pass SIGUSR1 too). The handler only raises a
flag; at the next step boundary the ranks agree on it with one all-reduce of one integer
(over a gloo group, so a GPU run pays no host synchronisation for it), and every rank stops
after the same step. A signal that arrives during evaluation is seen when the next step
boundary or the end of the epoch comes. The trainer then writes ``checkpoints/last/`` with
the position inside the epoch and ends with ``PREEMPTED_EXIT``; ``--resume`` (or
``--resume auto``) continues from that step.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist

from trainer.fitting.checkpoint import last_dir

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; resume it
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Test hook, not an option: "EPOCH:STEP" makes rank 0 signal itself after that step, so a
# test can stop a run at an exact place (the signal then travels the real path).
TEST_HOOK = "DR_TEST_PREEMPT_AT"


class StopFlag:
    """Raised by a signal on any rank; read by all ranks together with ``agreed()``."""

    def __init__(self, world_size: int, rank: int):
        self.world_size, self.rank = world_size, rank
        self.signal: int | None = None
        self.group = _control_group() if world_size > 1 else None
        self._previous = {sig: signal.signal(sig, self._raise) for sig in SIGNALS}
        self._hook = _hook_position() if rank == 0 else None

    def _raise(self, signum, frame) -> None:
        if self.signal is None:
            print(
                f"{signal.Signals(signum).name} received: stopping at the next step boundary",
                file=sys.stderr,
                flush=True,
            )
        self.signal = signum

    def agreed(self) -> bool:
        """Whether any rank was signalled; a collective: every rank calls it at the same step."""
        if self.world_size == 1:
            return self.signal is not None
        flag = torch.tensor([int(self.signal is not None)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def at_step(self, epoch: int, step: int) -> bool:
        """``agreed()`` at the end of ``step`` of ``epoch`` (the test hook fires here)."""
        if self._hook == (epoch, step):
            os.kill(os.getpid(), signal.SIGTERM)
        return self.agreed()

    def close(self) -> None:
        """Put back the handlers that were there before (run_cli's SIGTERM -> exit 143)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "a signal on another rank"


def _control_group():
    """A gloo group beside the training one: the flag is a CPU integer whatever the device."""
    if dist.get_backend() == "gloo":
        return None  # the default group already is one
    return dist.new_group(backend="gloo")


def _hook_position() -> tuple[int, int] | None:
    value = os.environ.get(TEST_HOOK)
    if not value:
        return None
    epoch, step = value.split(":")
    return int(epoch), int(step)


def stopped_here(accelerator, stop: StopFlag, epoch: int, step: int, out) -> int:
    """The line a preempted run ends with, once every rank is done; its exit status."""
    place = f"after step {step} of epoch {epoch}" if step else f"before epoch {epoch}"
    accelerator.print(
        f"stopped by {stop.name} {place}; checkpoint in {last_dir(out)}; "
        f"continue with --resume --out {out} (exit {PREEMPTED_EXIT})"
    )
    accelerator.wait_for_everyone()  # no rank leaves before rank 0 has written last/
    accelerator.end_training()
    return PREEMPTED_EXIT
