"""Multi-node launch: the SLURM scripts build one rendezvous (checked by running them against a fake
``srun`` / ``scontrol`` / launcher that record what they would run), and two torchrun "nodes" joined
through c10d on 127.0.0.1 train the model that one node with two processes trains, bit for bit."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from smft_dist.distributed.env import detect_env, free_port

ROOT = Path(__file__).resolve().parents[1]
NODES, JOB_ID, GPUS = ["node-a", "node-b"], "4242", 8
CONFIG, OVERRIDES = "configs/paper_1p3b.yaml", ["train.steps=7"]

# what a launcher would be handed: its name, argv and the launch variables, one JSON line per call
_RECORD = f"""#!{sys.executable}
import json, os, sys
keep = {{k: v for k, v in os.environ.items() if k.startswith(("SLURM", "MASTER_"))}}
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:], "env": keep}}) + "\\n")
"""
# srun: run the command once per task of the allocation with that task's SLURM variables
_SRUN = """#!/usr/bin/env bash
while [[ "$1" == -* ]]; do shift; done
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
per=${SLURM_NTASKS_PER_NODE:-1}
for n in "${!nodes[@]}"; do
  for ((l = 0; l < per; l++)); do
    SLURM_NODEID=$n SLURM_LOCALID=$l SLURM_PROCID=$((n * per + l)) SLURM_NTASKS=$((${#nodes[@]} * per)) \\
      SLURMD_NODENAME=${nodes[$n]} "$@"
  done
done
"""
_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && tr ',' '\\n' <<< "$3"
exit 0
"""


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _sbatch(script: str, tmp: Path, tasks_per_node: int) -> tuple[list[dict], Path]:
    """Run ``slurm/<script>`` as SLURM would on a 2-node allocation; return each launcher call and
    the submit directory."""
    submit, bin_dir, log = tmp / "submit", tmp / "bin", tmp / "calls.jsonl"
    for prog in ("torchrun", "python", "deepspeed"):
        _executable(submit / ".venv" / "bin" / prog, _RECORD)
    _executable(bin_dir / "srun", _SRUN)
    _executable(bin_dir / "scontrol", _SCONTROL)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "SLURM_SUBMIT_DIR": str(submit),
        "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "smft", "SLURM_JOB_NODELIST": ",".join(NODES),
        "SLURM_NNODES": str(len(NODES)), "SLURM_GPUS_PER_NODE": str(GPUS), "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
    }
    proc = subprocess.run(["bash", str(ROOT / "slurm" / script), CONFIG, *OVERRIDES], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in log.read_text().splitlines()], submit


def _torchrun_args(argv: list[str]):
    from torch.distributed.run import get_args_parser

    return get_args_parser().parse_args(argv)


def test_torchrun_sbatch_gives_every_node_one_c10d_rendezvous_on_the_head_node(tmp_path):
    calls, _ = _sbatch("torchrun.sbatch", tmp_path, tasks_per_node=1)
    assert [c["prog"] for c in calls] == ["torchrun"] * len(NODES)
    assert [c["env"]["SLURMD_NODENAME"] for c in calls] == NODES
    assert calls[0]["argv"] == calls[1]["argv"], "c10d needs the same arguments on every node"
    args = _torchrun_args(calls[0]["argv"])
    assert (args.nnodes, args.nproc_per_node) == (str(len(NODES)), str(GPUS))
    assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == ("c10d", f"{NODES[0]}:29500", JOB_ID)
    assert args.node_rank == 0, "node ranks come from the c10d rendezvous, not from the command line"
    assert args.module and args.training_script == "smft_dist.train"
    assert args.training_script_args == ["--config", CONFIG, *OVERRIDES]


def test_srun_sbatch_gives_each_task_its_rank_and_the_head_node(tmp_path):
    calls, _ = _sbatch("srun.sbatch", tmp_path, tasks_per_node=GPUS)
    assert len(calls) == len(NODES) * GPUS
    for call in calls:
        assert call["prog"] == "python"
        assert call["argv"] == ["-m", "smft_dist.train", "--config", CONFIG, *OVERRIDES]
    envs = [detect_env(c["env"]) for c in calls]
    assert sorted(e.rank for e in envs) == list(range(len(NODES) * GPUS))
    assert {e.world_size for e in envs} == {len(NODES) * GPUS} and {e.launcher for e in envs} == {"slurm"}
    assert {(e.master_addr, e.master_port) for e in envs} == {(NODES[0], 29500)}
    for call, e in zip(calls, envs):
        assert e.local_rank == e.rank % GPUS and call["env"]["SLURMD_NODENAME"] == NODES[e.rank // GPUS]


def test_deepspeed_sbatch_lists_every_node_and_rendezvouses_on_the_head_node(tmp_path):
    calls, submit = _sbatch("deepspeed.sbatch", tmp_path, tasks_per_node=1)
    assert [c["prog"] for c in calls] == ["deepspeed"]
    argv = calls[0]["argv"]
    hostfile = Path(argv[argv.index("--hostfile") + 1])
    hostfile = hostfile if hostfile.is_absolute() else submit / hostfile
    assert hostfile.read_text().splitlines() == [f"{n} slots={GPUS}" for n in NODES]
    assert argv[argv.index("--master_addr") + 1] == NODES[0]
    assert argv[argv.index("--module") + 1:] == ["smft_dist.train", "--config", CONFIG, *OVERRIDES]


# ---------------------------------------------------------------------------- a real rendezvous
def _tiny(world: Path, out: Path) -> list[str]:
    return [
        "model.vocab_size=320", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
        "model.memory.layers=[1]", "model.memory.n_keys=8", "model.memory.heads=2", "model.memory.topk=4",
        "model.memory.k_dim=16", f"data.tokenizer={world}/tokenizer",
        f"data.pretrain.source.path={world}/pretrain.jsonl", "data.pretrain.seq_len=32", "data.pretrain.batch_size=4",
        "method.name=pretrain", "method.dense_lr=1e-2", "method.value_lr=0.5", "distributed.grad_clip=0",
        "train.stream=pretrain", "train.steps=3", "train.log_every=1", f"train.out_dir={out}",
        f"checkpoint.dir={out}/ckpt", "checkpoint.interval=2",
    ]


@pytest.mark.slow
@pytest.mark.multirank
def test_two_torchrun_nodes_train_what_one_node_with_two_processes_trains(tmp_path):
    from smft_dist.data.synthetic import WorldSize, generate

    generate(tmp_path / "world", WorldSize(people=12, background_docs=60, heldout_docs=8), seed=0, vocab_size=300)
    (tmp_path / "empty.yaml").write_text("{}\n")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}

    def train_args(out: str) -> list[str]:
        return ["-m", "smft_dist.train", "--config", str(tmp_path / "empty.yaml"), *_tiny(tmp_path / "world", tmp_path / out)]

    one = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", *train_args("one_node")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    # the rendezvous arguments torchrun.sbatch builds, on 127.0.0.1 and a free port, one process per node
    calls, _ = _sbatch("torchrun.sbatch", tmp_path / "sbatch", tasks_per_node=1)
    argv = calls[0]["argv"]
    argv = argv[:argv.index("-m")]
    argv[argv.index("--rdzv-endpoint") + 1] = f"127.0.0.1:{free_port()}"
    argv[argv.index("--nproc-per-node") + 1] = "1"
    argv[argv.index("--shutdown-timeout") + 1] = "10"
    nodes = [subprocess.Popen([torchrun, *argv, "--node-rank", str(i), *train_args("two_nodes")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (_, err) in zip(nodes, outs):
        assert node.returncode == 0, err[-3000:]
    a = load_file(str(tmp_path / "one_node" / "hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "two_nodes" / "hf" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name
