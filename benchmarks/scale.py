"""Paper-scale memory on CPU: per-rank peak memory against the table shard, SMFT step time against
the number of slots, and row-wise lookup throughput per rank, all on 2 gloo ranks.

    python -m benchmarks.scale                # N = 2^20 x 1024 (the paper's table), then 2^22 x 256
    python -m benchmarks.scale --only steps   # one part: memory | steps | lookup | cli
    python -m benchmarks.scale --quick        # tiny sizes: checks that every phase runs
    python -m benchmarks.scale --only memory --memory-size 18:512   # one table size (2^18 x 512)

Memory: every phase runs in a fresh pair of processes and reports the larger rank's peak resident
set (``VmHWM``), once at the measured size and once at a tiny table (the baseline: libraries, dense
model, runtime buffers): ``(peak - baseline) / shard`` is the memory a phase needs per byte of its
table shard (1.0: the shard alone).
Phases: pretrain and SMFT steps, ``train.init_from`` of a saved model, the HF export, a checkpoint
save (pretrain: rows, their optimizer state, the DeepSpeed dense model) and its load (a resume).
CLI: the real ``python -m smft_dist.train`` on 2 gloo processes (torchrun), end to end (build,
steps, final eval, checkpoint, HF export) on ``configs/quickstart_pretrain.yaml`` with
``model.memory.n_keys=1024 model.memory.v_dim=512 train.steps=3`` (a 2 GiB table, 1 GiB per rank),
each rank's peak resident set read every 0.2 s, against the same run at ``n_keys=32``.
Step time: SMFT (count, rank, deferred update) against memory_ft with the same batch at N = 2^16 .. 2^22
(default: the paper's SMFT batch, 64 sequences of 64 tokens over the 2 ranks), and the share of the
SMFT step spent in the slot-count service: the service run alone on the reads of that step, between
barriers, in the same run (``count share``), and timed inside the step (``in-step``: its collective
also waits for the slower rank's forward and backward, rank skew that is not the service's cost).
Lookup: a memory layer's forward + backward, tokens/s per rank on 2 row-wise ranks against one
process with a local table (reuses ``benchmarks.sharded_lookup``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import best_time
from benchmarks.sharded_lookup import _memory_layer, _sharded_rank
from smft_dist.config import CheckpointConfig, JobConfig, MemoryConfig, MethodConfig, ModelConfig
from smft_dist.distributed.env import DistEnv, free_port, init_distributed
from smft_dist.model import LocalValueTable

TABLE = "mem_values_1"
SMALL_N_LOG2 = 10  # the memory baseline: every phase at a table too small to matter
MEMORY_PHASES = ("pretrain", "smft", "export", "init_from", "save", "load")
CLI_SMALL_N_KEYS = 32  # the CLI baseline: 1024 slots
ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` size (VmHWM: peak resident set) in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _job(args, n_log2: int, v_dim: int, method: str, init_from: str | None = None) -> JobConfig:
    model = ModelConfig(vocab_size=1024, dim=args.dim, n_layers=2, n_heads=4, max_seq_len=args.seq,
                        memory=MemoryConfig(layers=[1], n_keys=2 ** (n_log2 // 2), heads=4, topk=32, k_dim=64, v_dim=v_dim))
    job = JobConfig(model=model, method=MethodConfig(name=method, top_t=args.top_t, value_lr=0.01, dense_lr=1e-4))
    job.train.init_from = init_from
    job.validate()
    return job


def _background(num_slots: int):
    from smft_dist.smft.background_stats import BackgroundStats

    stats = BackgroundStats.empty({TABLE: num_slots})
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        stats.add_batch({TABLE: (torch.rand(num_slots, generator=g) < 0.3).long()})
    return stats


def _batch(args, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the global batch (``args.batch`` sequences over 2 ranks)."""
    ids = torch.randint(0, 1024, (args.batch // 2, args.seq), generator=torch.Generator().manual_seed(rank))
    return ids, torch.ones_like(ids)


def _phase(rank: int, world: int, port: int, phase: str, args, n_log2: int, v_dim: int, out: str) -> None:
    """One measurement on this rank; rank results go to ``out``.rank<r>."""
    from smft_dist.distributed.checkpoint import export_hf, load_checkpoint, save_checkpoint
    from smft_dist.distributed.parallelize import parallelize, train_step
    from smft_dist.model.transformer import Transformer
    from smft_dist.smft.methods import apply_method
    from smft_dist.train import build_model

    torch.set_num_threads(1)
    _, device = init_distributed("gloo", DistEnv(rank, world, rank, "127.0.0.1", port, "bench"))
    method = {"pretrain": "pretrain", "smft": "smft", "memory_ft": "memory_ft", "save": "pretrain", "load": "pretrain"}.get(phase, "memory_ft")
    saved = f"{args.saved}-{n_log2}" if phase in ("export", "init_from") else None  # export writes what init_from reads
    checkpoints = CheckpointConfig(dir=f"{args.saved}-ckpt-{n_log2}", keep_last=0)  # save writes what load reads
    job = _job(args, n_log2, v_dim, method, init_from=saved if phase == "init_from" else None)
    model = build_model(job) if phase == "init_from" else Transformer(job.model, build_value_tables=False)
    plan = apply_method(model, job.method, _background(job.model.memory.num_slots) if method == "smft" else None)
    par = parallelize(model, job, plan, device)
    result = {"shard_kib": par.tables[TABLE].local_weight().numel() * 4 // 1024}
    ids, mask = _batch(args, rank)
    if phase in ("pretrain", "smft", "memory_ft"):
        counting, reads, service = [0.0], {}, {}
        for name, sel in par.row_selectors.items():  # the slot-count service, per table
            service[name] = sel.counter.global_counts
            sel.counter.global_counts = _timed(service[name], counting, reads, name)
        step = lambda: train_step(par, ids, mask, ids)  # noqa: E731
        step()
        counting[0] = 0.0
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        result.update(step_s=min(times), in_step_count_s=counting[0] / args.repeats)
        if reads:  # the service alone on the last step's reads (every table), best of the repeats
            alone = lambda: [service[n](reads[n]) for n in sorted(reads)]  # noqa: E731
            result["count_s"] = min(_between_barriers(alone) for _ in range(args.repeats))
    elif phase == "export":
        export_hf(par, job.model, saved)
    elif phase == "save":
        save_checkpoint(par, checkpoints, 1, job.model)
    elif phase == "load":
        load_checkpoint(par, checkpoints.dir)
    result["peak_kib"] = _status_kib("VmHWM")
    torch.save(result, f"{out}.rank{rank}")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see tests/multiproc.py: skip C++ static destructors after FBGEMM CPU work


def _timed(fn, total: list[float], last: dict, name: str):
    """``fn`` adding its wall time to ``total[0]`` and keeping its argument in ``last[name]``."""
    def timed(reads):
        last[name] = reads
        t0 = time.perf_counter()
        out = fn(reads)
        total[0] += time.perf_counter() - t0
        return out
    return timed


def _between_barriers(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_phase(phase: str, args, n_log2: int, v_dim: int, world: int = 2) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(_phase, args=(world, free_port(), phase, args, n_log2, v_dim, out), nprocs=world, join=True)
        return [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(world)]


def memory_table(args, n_log2: int, v_dim: int) -> None:
    print(f"\npeak memory per rank, N = 2^{n_log2} x v_dim {v_dim} ({2**n_log2 * v_dim * 4 / 2**30:.2f} GiB table), 2 ranks;"
          f" baseline: the same phase at N = 2^{SMALL_N_LOG2}")
    print(f"{'phase':<12}{'shard MiB':>11}{'peak MiB':>10}{'baseline MiB':>14}{'(peak-baseline)/shard':>23}")
    for phase in args.phases:
        worst = {}
        for size in (SMALL_N_LOG2, n_log2):
            worst[size] = max(run_phase(phase, args, size, v_dim), key=lambda r: r["peak_kib"])
        big, small = worst[n_log2], worst[SMALL_N_LOG2]
        ratio = (big["peak_kib"] - small["peak_kib"]) / max(big["shard_kib"] - small["shard_kib"], 1)
        print(f"{phase:<12}{big['shard_kib'] / 1024:>11.1f}{big['peak_kib'] / 1024:>10.1f}"
              f"{small['peak_kib'] / 1024:>14.1f}{ratio:>23.2f}")


def _vm_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` size in KiB (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), 0)
    except OSError:
        return 0


def _rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    except OSError:
        return None
    return int(env[b"RANK"]) if b"RANK" in env else None


def cli_peaks(data: Path, out: Path, n_keys: int, v_dim: int, steps: int) -> dict[int, int]:
    """Run ``smft_dist.train`` on 2 gloo processes under torchrun (cwd ``data``: the quickstart
    paths resolve there); each rank's peak resident set in KiB, read every 0.2 s."""
    import psutil

    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "smft_dist.train",
           "--config", str(ROOT / "configs" / "quickstart_pretrain.yaml"), f"model.memory.n_keys={n_keys}",
           f"model.memory.v_dim={v_dim}", f"train.steps={steps}", f"train.out_dir={out}", f"checkpoint.dir={out}/ckpt"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen(cmd, cwd=data, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        for child in psutil.Process(proc.pid).children():
            rank = _rank_of(child.pid)
            if rank is not None:
                peaks[rank] = max(peaks.get(rank, 0), _vm_kib(child.pid, "VmHWM"))
        time.sleep(0.2)
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{log[-3000:]}")
    return peaks


def cli_table(args) -> None:
    from smft_dist.data.synthetic import generate

    shard_kib = args.cli_n_keys**2 * args.cli_v_dim * 4 // 2 // 1024
    print(f"\npython -m smft_dist.train, quickstart_pretrain, n_keys {args.cli_n_keys} x v_dim {args.cli_v_dim}"
          f" ({2 * shard_kib / 2**20:.2f} GiB table), train.steps={args.cli_steps}, 2 gloo ranks (torchrun);"
          f" baseline: n_keys {CLI_SMALL_N_KEYS}")
    print(f"{'rank':<6}{'shard MiB':>11}{'peak MiB':>10}{'baseline MiB':>14}{'(peak-baseline)/shard':>23}")
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "data" / "quickstart", "small")
        small = cli_peaks(Path(tmp), Path(tmp) / "small", CLI_SMALL_N_KEYS, args.cli_v_dim, args.cli_steps)
        big = cli_peaks(Path(tmp), Path(tmp) / "big", args.cli_n_keys, args.cli_v_dim, args.cli_steps)
    for rank in sorted(big):
        ratio = (big[rank] - small[rank]) / shard_kib
        print(f"{rank:<6}{shard_kib / 1024:>11.1f}{big[rank] / 1024:>10.1f}{small[rank] / 1024:>14.1f}{ratio:>23.2f}")


def step_table(args, v_dim: int) -> None:
    print(f"\nSMFT step vs memory_ft, same batch ({args.batch} x {args.seq} tokens over 2 ranks), dense dim {args.dim},"
          f" v_dim {v_dim}, top-t {args.top_t}")
    print(f"{'N':>6}{'memory_ft s':>13}{'smft s':>9}{'smft/memory_ft':>16}{'count ms':>10}{'count share':>13}{'in-step':>9}")
    for n_log2 in args.sweep:
        base = max(r["step_s"] for r in run_phase("memory_ft", args, n_log2, v_dim))
        smft = max(run_phase("smft", args, n_log2, v_dim), key=lambda r: r["step_s"])
        print(f"{'2^' + str(n_log2):>6}{base:>13.4f}{smft['step_s']:>9.4f}{smft['step_s'] / base:>16.3f}"
              f"{smft['count_s'] * 1e3:>10.2f}{smft['count_s'] / smft['step_s']:>13.1%}"
              f"{smft['in_step_count_s'] / smft['step_s']:>9.1%}")


def lookup_table(args) -> None:
    la = argparse.Namespace(dim=args.lookup_dim, n_keys=2 ** (args.lookup_n_log2 // 2), heads=4, topk=32, k_dim=64,
                            tokens=args.tokens, repeats=args.repeats)
    layer, x = _memory_layer(la, lambda n, d: LocalValueTable(n, d))
    local = la.tokens / best_time(lambda: layer(x).sum().backward(), repeats=la.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_sharded_rank, args=(2, free_port(), la, out), nprocs=2, join=True)
        per_rank = la.tokens / torch.load(out, weights_only=True)["seconds"]
    print(f"\nmemory layer fwd+bwd, N = 2^{args.lookup_n_log2} x dim {la.dim}, {la.tokens} tokens per rank")
    print(f"{'1-rank local tokens/s':>22}{'2-rank row-wise tokens/s per rank':>35}{'ratio':>8}")
    print(f"{local:>22,.0f}{per_rank:>35,.0f}{per_rank / local:>8.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a check that every phase runs)")
    p.add_argument("--dim", type=int, default=256, help="dense model dim")
    p.add_argument("--only", choices=("memory", "steps", "lookup", "cli"), help="run one part")
    p.add_argument("--memory-size", action="append", metavar="N_LOG2:V_DIM", help="memory table size(s) (default: 20:1024, 22:256)")
    p.add_argument("--phases", type=lambda s: s.split(","), default=list(MEMORY_PHASES),
                   help=f"memory phases, comma-separated (default: {','.join(MEMORY_PHASES)})")
    p.add_argument("--cli-n-keys", type=int, default=1024, help="CLI run: model.memory.n_keys (n_keys^2 slots)")
    p.add_argument("--cli-v-dim", type=int, default=512)
    p.add_argument("--cli-steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="sequences per step over both ranks (paper: 64 paraphrases)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--top-t", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=1024, help="lookup benchmark: tokens per rank")
    args = p.parse_args()
    if args.quick:
        args.dim, args.batch, args.seq, args.repeats, args.top_t = 64, 4, 16, 2, 50
        memory_sizes, args.sweep, args.lookup_n_log2, args.lookup_dim, sweep_v_dim = [(12, 64)], [10, 12], 12, 64, 64
        args.cli_n_keys, args.cli_v_dim = 128, 64
    else:
        memory_sizes, args.sweep, args.lookup_n_log2, args.lookup_dim, sweep_v_dim = [(20, 1024), (22, 256)], [16, 18, 20, 22], 20, 256, 256
    if args.memory_size:
        memory_sizes = [tuple(int(x) for x in size.split(":")) for size in args.memory_size]
    if args.only in (None, "memory"):
        with tempfile.TemporaryDirectory() as tmp:
            args.saved = os.path.join(tmp, "hf")
            for n_log2, v_dim in memory_sizes:
                memory_table(args, n_log2, v_dim)
    if args.only in (None, "steps"):
        step_table(args, sweep_v_dim)
    if args.only in (None, "lookup"):
        lookup_table(args)
    if args.only in (None, "cli"):
        cli_table(args)


if __name__ == "__main__":
    main()
