"""Memory layer forward+backward: local table vs TorchRec row-sharded table at 1 and 2 ranks.

Prints tokens/s (global: all ranks' tokens per second) and bytes sent between ranks per token, by
phase: TorchRec's input all-to-all (lengths, indices, weights), its output reduce-scatter and the
backward of it, and the score transfer added by ``weighted_dist`` (weights forward, weight
gradients backward). The lookup is a pretraining one: one feature, no trainable/frozen split.
"computed" is the expectation for uniformly spread rows; "measured" counts the off-rank bytes of
every collective call in one step. No pass/fail.

    python benchmarks/sharded_lookup.py [--dim 256 --n-keys 128 --heads 4 --topk 16 --tokens 1024]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import best_time
from smft_dist.config import MemoryConfig, SparseOptimConfig
from smft_dist.distributed import weighted_dist
from smft_dist.distributed.env import DistEnv, free_port, init_distributed
from smft_dist.distributed.sharding import ShardedValueTable
from smft_dist.model import LocalValueTable, MemoryLayer

PHASES = ("input a2a", "output reduce-scatter", "output grad (bwd)", "score weights fwd (added)", "score grads bwd (added)")


def computed_bytes(world: int, dim: int, entries: int) -> dict[str, float]:
    """Expected off-rank bytes per token with rows spread uniformly over ``world`` ranks."""
    remote = (world - 1) / world
    lengths = (world - 1) * 8  # every rank receives every bag's (int64) length (one feature)
    pooled = (world - 1) * dim * 4  # partial sums from the other ranks
    return {
        "input a2a": entries * remote * (8 + 4) + lengths,  # int64 index + fp32 weight per entry
        "output reduce-scatter": pooled,
        "output grad (bwd)": pooled,
        "score weights fwd (added)": entries * remote * 4,
        "score grads bwd (added)": entries * remote * 4,
    }


class _CommCounter:
    """Counts off-rank bytes of torch.distributed collectives, labelled by the current phase."""

    def __init__(self):
        self.phase, self.scores, self.bytes = "idle", False, collections.Counter()
        self._patch()

    def label(self, op: str) -> str:
        if self.scores:
            return "score weights fwd (added)" if self.phase == "forward" else "score grads bwd (added)"
        if self.phase == "forward":
            return "output reduce-scatter" if "reduce_scatter" in op else "input a2a"
        return "output grad (bwd)"

    def _patch(self) -> None:
        counter, world, me = self, dist.get_world_size(), dist.get_rank()

        def nbytes(t):
            return t.numel() * t.element_size()

        def a2a(orig):
            def f(output, input, output_split_sizes=None, input_split_sizes=None, *a, **k):
                if input_split_sizes:
                    row = nbytes(input) // max(input.shape[0], 1)
                    sent = (sum(input_split_sizes) - input_split_sizes[me]) * row
                else:
                    sent = nbytes(input) * (world - 1) // world
                counter.bytes[counter.label("all_to_all")] += sent
                return orig(output, input, output_split_sizes, input_split_sizes, *a, **k)
            return f

        def rs(orig, name):
            def f(output, input, *a, **k):
                total = nbytes(input) if isinstance(input, torch.Tensor) else sum(nbytes(t) for t in input)
                counter.bytes[counter.label(name)] += total * (world - 1) // world
                return orig(output, input, *a, **k)
            return f

        def ag(orig, name):
            def f(output, input, *a, **k):
                counter.bytes[counter.label(name)] += nbytes(input) * (world - 1)
                return orig(output, input, *a, **k)
            return f

        dist.all_to_all_single = a2a(dist.all_to_all_single)
        for name in ("reduce_scatter_tensor", "reduce_scatter"):
            setattr(dist, name, rs(getattr(dist, name), name))
        for name in ("all_gather_into_tensor", "all_gather"):
            setattr(dist, name, ag(getattr(dist, name), name))
        fwd, bwd = weighted_dist._AllToAll.forward, weighted_dist._AllToAll.backward

        def flagged(fn):
            def f(*a):
                counter.scores = True
                try:
                    return fn(*a)
                finally:
                    counter.scores = False
            return staticmethod(f)

        weighted_dist._AllToAll.forward, weighted_dist._AllToAll.backward = flagged(fwd), flagged(bwd)


def _memory_layer(args, table_factory) -> tuple[MemoryLayer, torch.Tensor]:
    torch.manual_seed(0)
    cfg = MemoryConfig(layers=[0], n_keys=args.n_keys, heads=args.heads, topk=args.topk, k_dim=args.k_dim)
    layer = MemoryLayer(args.dim, cfg, "mem_values")
    layer.reset_parameters()
    layer.bind_table(table_factory(cfg.num_slots, args.dim))
    x = torch.randn(1, args.tokens, args.dim, generator=torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0))
    return layer, x.requires_grad_()


def _sharded_rank(rank: int, world: int, port: int, args, out: str) -> None:
    torch.set_num_threads(1)
    init_distributed("gloo", DistEnv(rank, world, rank, "127.0.0.1", port, "bench"))
    layer, x = _memory_layer(
        args, lambda n, d: ShardedValueTable("mem_values", torch.randn(n, d) * d**-0.5, SparseOptimConfig(), 1e-3)
    )
    step = lambda: layer(x).sum().backward()  # noqa: E731
    seconds = best_time(step, repeats=args.repeats)
    counter = _CommCounter()
    counter.phase = "forward"
    y = layer(x)
    counter.phase = "backward"
    y.sum().backward()
    measured = torch.tensor([counter.bytes[p] for p in PHASES], dtype=torch.float64)
    dist.all_reduce(measured)
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        torch.save({"seconds": t.item(), "measured": measured.tolist()}, out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see tests/multiproc.py: skip C++ static destructors after FBGEMM CPU work


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-keys", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--k-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    entries = args.heads * args.topk

    layer, x = _memory_layer(args, lambda n, d: LocalValueTable(n, d))
    rows = [("local table (1 process)", 1, args.tokens / best_time(lambda: layer(x).sum().backward(), repeats=args.repeats), None)]
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.pt")
            mp.spawn(_sharded_rank, args=(world, free_port(), args, out), nprocs=world, join=True)
            res = torch.load(out, weights_only=True)
        tokens = world * args.tokens
        measured = {ph: b / tokens for ph, b in zip(PHASES, res["measured"])}
        rows.append((f"TorchRec row-wise, {world} rank(s)", world, tokens / res["seconds"], measured))

    print(f"slots={args.n_keys**2} dim={args.dim} heads={args.heads} k={args.topk} -> {entries} entries/token; "
          f"{args.tokens} tokens per rank; 1 CPU thread per rank; gloo")
    print(f"{'table':<30}{'ranks':>6}{'tokens/s':>12}")
    for name, world, tps, _ in rows:
        print(f"{name:<30}{world:>6}{tps:>12,.0f}")
    print(f"\nbytes sent between ranks per token ({'computed':>9} / measured)")
    print(f"{'phase':<30}" + "".join(f"{f'{w} rank(s)':>22}" for _, w, _, m in rows if m is not None))
    for ph in PHASES:
        cells = "".join(f"{computed_bytes(w, args.dim, entries)[ph]:>11,.0f} / {m[ph]:>8,.0f}" for _, w, _, m in rows if m is not None)
        print(f"{ph:<30}{cells}")


if __name__ == "__main__":
    main()
