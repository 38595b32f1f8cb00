"""Process-group setup from the launch environment: torchrun, the deepspeed launcher, or SLURM.

One place reads the environment (:func:`detect_env`) and one function starts the process group
(:func:`init_distributed`). torchrun and the deepspeed launcher both export ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; under a plain ``srun`` we read ``SLURM_PROCID``/
``SLURM_NTASKS``/``SLURM_LOCALID`` and take the head node from ``MASTER_ADDR`` or the first host of
``SLURM_NODELIST``. No launcher at all means a single process.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


class LaunchError(RuntimeError):
    """The launch environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str, launcher: str) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        raise LaunchError(f"{launcher} launch environment: {name} is not set")
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{launcher} launch environment: {name}={raw!r} is not an integer") from None


def _slurm_head_node(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise LaunchError(f"slurm launch environment: MASTER_ADDR is not set and `scontrol show hostnames` failed ({e})") from None
    return out.split()[0]


def detect_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank, world size, local rank and the rendezvous address from the environment."""
    env = os.environ if env is None else env
    if any(v in env for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        rank, world, local = (_int(env, v, "torchrun/deepspeed") for v in _TORCHRUN_VARS[:3])
        addr = env.get("MASTER_ADDR") or ""
        if not addr:
            raise LaunchError("torchrun/deepspeed launch environment: MASTER_ADDR is not set")
        port, launcher = _int(env, "MASTER_PORT", "torchrun/deepspeed"), "torchrun"
    elif "SLURM_PROCID" in env:
        rank, world, local = (_int(env, v, "slurm") for v in _SLURM_VARS)
        addr = env.get("MASTER_ADDR") or ""
        if not addr:
            if not env.get("SLURM_NODELIST"):
                raise LaunchError("slurm launch environment: neither MASTER_ADDR nor SLURM_NODELIST is set")
            addr = _slurm_head_node(env["SLURM_NODELIST"])
        # Same port on every task of a job, different across jobs sharing a node.
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        launcher = "slurm"
    else:
        return DistEnv(0, 1, 0, "127.0.0.1", free_port(), "single")
    if not 0 <= rank < world:
        raise LaunchError(f"{launcher} launch environment: rank {rank} is outside world size {world}")
    return DistEnv(rank, world, local, addr, port, launcher)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for single-process runs and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto", env: DistEnv | None = None, timeout_s: float = 600) -> tuple[DistEnv, torch.device]:
    """Start the default process group (NCCL on CUDA, gloo on CPU); return the env and device.

    Idempotent: an already initialised group is reused. Sets the CUDA device to the local rank and
    exports the torchrun variables (DeepSpeed reads ``LOCAL_RANK`` from the environment), so a SLURM
    or single-process launch looks the same to every library.
    """
    env = env or detect_env()
    os.environ.update(
        RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
    )
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return env, device
