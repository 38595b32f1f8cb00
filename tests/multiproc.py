"""Run a function on several gloo ranks on this host and collect each rank's return value."""

from __future__ import annotations

import datetime
import faulthandler
import os
import sys
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from smft_dist.distributed.env import free_port

RANKS_TIMEOUT_S = 300.0  # one multi-rank test on tiny shapes takes seconds; a hang fails, it does not stall CI


def _entry(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple, backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      DS_ACCELERATOR="cuda" if backend == "nccl" else "cpu")
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(RANKS_TIMEOUT_S - 10)  # a hung rank says where, before it is killed
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=RANKS_TIMEOUT_S))
    result = fn(rank, world, *args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    # After TorchRec/FBGEMM CPU work a normal interpreter exit sometimes aborts in a C++ static
    # destructor ("terminate called without an active exception", SIGABRT/SIGBUS) once all work is
    # done; a rank that finished cleanly leaves without running destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, backend: str = "gloo") -> list[Any]:
    """Spawn ``world`` processes (gloo, or nccl with one GPU each) running ``fn(rank, world, *args)``;
    return their results. Ranks still running after ``RANKS_TIMEOUT_S`` (or when the caller is
    interrupted, e.g. by pytest-timeout) are killed, so a hang never outlives its test."""
    with tempfile.TemporaryDirectory() as out_dir:
        ranks = mp.start_processes(_entry, args=(world, free_port(), out_dir, fn, args, backend), nprocs=world,
                                   join=False, start_method="spawn")
        deadline = time.monotonic() + RANKS_TIMEOUT_S
        try:
            while not ranks.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish in {RANKS_TIMEOUT_S:.0f} s")
        finally:
            for process in ranks.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
