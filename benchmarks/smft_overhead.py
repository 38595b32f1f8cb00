"""Cost of sparse selection: one training step under memory_ft (every accessed row) vs smft (count,
rank, top-t) with tf and tfidf rankings, on the trainer's path (TorchRec table, fused SGD, deferred
row update in ``train_step``) in one process.

    python -m benchmarks.smft_overhead [--n-keys 512 --batch 16 --seq 128]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import interleaved_best_times
from smft_dist.config import JobConfig, MemoryConfig, MethodConfig, ModelConfig
from smft_dist.distributed.env import init_distributed
from smft_dist.distributed.parallelize import parallelize, train_step
from smft_dist.model import Transformer
from smft_dist.smft.background_stats import BackgroundStats
from smft_dist.smft.methods import apply_method


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-keys", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--top-t", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    cfg = ModelConfig(vocab_size=1024, dim=args.dim, n_layers=2, n_heads=4,
                      memory=MemoryConfig(layers=[1], n_keys=args.n_keys, heads=4, topk=32, k_dim=128))
    num_slots = cfg.memory.num_slots
    background = BackgroundStats.empty({"mem_values_1": num_slots})
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        background.add_batch({"mem_values_1": (torch.rand(num_slots, generator=g) < 0.3).long()})
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    _, device = init_distributed()

    def make_step(method: MethodConfig):
        torch.manual_seed(0)
        model = Transformer(cfg, build_value_tables=False)
        job = JobConfig(model=cfg, method=method)
        par = parallelize(model, job, apply_method(model, method, background), device)
        return lambda: train_step(par, ids, mask, ids)

    methods = {"memory_ft (all accessed rows)": MethodConfig(name="memory_ft", value_lr=0.01)}
    for ranking in ("tf", "tfidf"):
        methods[f"smft {ranking} top-{args.top_t}"] = MethodConfig(name="smft", ranking=ranking, top_t=args.top_t, value_lr=0.01)
    times = interleaved_best_times({name: make_step(m) for name, m in methods.items()}, repeats=args.repeats)
    base = times["memory_ft (all accessed rows)"]
    rows = list(times.items())
    tokens = args.batch * args.seq
    print(f"slots={num_slots} tokens/step={tokens} (single process, TorchRec table, fused SGD)")
    print(f"{'method':<32}{'tokens/s':>12}{'time vs memory_ft':>20}")
    for name, t in rows:
        print(f"{name:<32}{tokens / t:>12,.0f}{t / base:>20.3f}")


if __name__ == "__main__":
    main()
