"""Checkpoint-and-exit on SLURM's warning signal (``--signal=B:USR1@120``, forwarded to the tasks)
or SIGTERM (preemption, ``scancel``, torchrun shutting down its workers).

A signal only sets a flag; the trainer asks :meth:`PreemptionHandler.requested` once per step, at
the step boundary. Signals reach ranks at different times, so the flag is max-reduced over all
ranks there (a one-int all-reduce on a gloo group: no device sync): every rank sees the same answer
at the same step, saves the same checkpoint and leaves; the requeued job resumes from it.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionHandler:
    """Catches :data:`SIGNALS` for the life of the process (collective: every rank constructs it)."""

    def __init__(self):
        self.received: int | None = None
        self.group = dist.new_group(backend="gloo")
        for sig in SIGNALS:
            signal.signal(sig, self._note)

    def _note(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        """True on every rank once any rank has received a signal (call on all ranks, once per step)."""
        flag = torch.tensor([int(self.received is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
