"""Run a function on W local gloo ranks (torch.multiprocessing, 127.0.0.1, a free port)."""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from smft_dist.distributed.env import DistEnv, free_port, init_distributed


def _entry(rank: int, fn: Callable, world: int, port: int, args: tuple) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    env = DistEnv(rank, world, rank, "127.0.0.1", port, "test")
    # DeepSpeed reads the launcher variables; keep them consistent with the group we start.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed("gloo", env, timeout_s=120)
    fn(rank, world, *args)
    dist.destroy_process_group()
    # A normal interpreter exit after TorchRec/FBGEMM CPU work sometimes aborts in a C++ static
    # destructor ("terminate called without an active exception", then SIGABRT/SIGBUS) after all
    # work is done; a clean rank therefore leaves without running destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable, world: int, *args) -> None:
    """Call ``fn(rank, world, *args)`` in ``world`` processes; a failure in any rank fails the caller."""
    mp.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)
