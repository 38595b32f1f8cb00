"""Launch environments: torchrun / deepspeed launcher, SLURM, single process, broken ones."""

import pytest

from smft_dist.distributed.env import LaunchError, detect_env
from tests.multiproc import run_ranks


def test_torchrun_environment():
    env = detect_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 8, 1, "node0", 29500)
    assert env.launcher == "torchrun" and not env.is_main


def test_slurm_environment_with_master_addr():
    env = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "n1", "SLURM_JOB_ID": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (5, 8, 1, "n1", 21234)
    assert env.launcher == "slurm"


def test_torchrun_variables_win_over_slurm():
    env = detect_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1",
                      "SLURM_PROCID": "7", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3"})
    assert (env.rank, env.world_size, env.launcher) == (0, 2, "torchrun")


def test_no_launcher_is_a_single_process():
    env = detect_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single") and env.is_main


@pytest.mark.parametrize("env, missing", [
    ({"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "WORLD_SIZE is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "1"}, "MASTER_ADDR is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a"}, "MASTER_PORT is not set"),
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "rank 2 is outside world size 2"),
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, "SLURM_NTASKS is not set"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}, "neither MASTER_ADDR nor SLURM_NODELIST"),
])
def test_broken_environment_names_the_variable(env, missing):
    with pytest.raises(LaunchError, match=missing):
        detect_env(env)
    try:
        detect_env(env)
    except LaunchError as e:
        assert "\n" not in str(e)


def test_slurm_head_node_from_nodelist(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho gpu-017\necho gpu-018\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    env = detect_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu-[017-018]"})
    assert env.master_addr == "gpu-017"


def test_init_distributed_single_process_exports_the_launch_variables(monkeypatch):
    import os

    import torch
    import torch.distributed as dist

    from smft_dist.distributed.env import init_distributed

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    saved = dict(os.environ)
    try:
        env, device = init_distributed()
        expected = ("nccl", "cuda") if torch.cuda.is_available() else ("gloo", "cpu")
        assert (env.launcher, dist.get_world_size(), (dist.get_backend(), device.type)) == ("single", 1, expected)
        assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("0", "0", "1")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def _sigterm_then_ask(rank: int, world: int) -> list[bool]:
    import os
    import signal

    from smft_dist.distributed.preemption import PreemptionHandler

    handler = PreemptionHandler()
    before = handler.requested()
    if rank == 0:
        os.kill(os.getpid(), signal.SIGTERM)  # the process lives on: the signal only asks for a stop
    return [before, handler.requested()]


@pytest.mark.multirank
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step():
    assert run_ranks(_sigterm_then_ask, 2) == [[False, True], [False, True]]
