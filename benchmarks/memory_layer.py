"""Memory layer (local value table) vs a dense SwiGLU FFN of the same model dim.

Prints forward+backward tokens/s of both, their ratio, and the achieved value-read bandwidth (bytes
of value rows read per second in the forward) as a fraction of a copy bandwidth measured in the
same run. No thresholds: these machines are noisy, ratios are what to compare.

    python benchmarks/memory_layer.py [--dim 512 --n-keys 256 --heads 4 --topk 32 --tokens 2048]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import best_time, copy_bandwidth
from smft_dist.config import MemoryConfig
from smft_dist.model import LocalValueTable, MemoryLayer
from smft_dist.model.transformer import SwiGLU


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n-keys", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--k-dim", type=int, default=256)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    cfg = MemoryConfig(layers=[0], n_keys=args.n_keys, heads=args.heads, topk=args.topk, k_dim=args.k_dim)
    memory = MemoryLayer(args.dim, cfg, "mem_values").to(device)
    memory.reset_parameters()
    table = LocalValueTable(cfg.num_slots, args.dim, device=device)
    memory.bind_table(table)
    ffn = SwiGLU(args.dim, 4 * args.dim).to(device)
    x = torch.randn(1, args.tokens, args.dim, device=device, requires_grad=True)

    def step(module):
        return lambda: module(x).sum().backward()

    t_mem = best_time(step(memory), repeats=args.repeats)
    t_ffn = best_time(step(ffn), repeats=args.repeats)
    with torch.no_grad():
        idx, scores = memory.retrieve(x[0])
        t_bag = best_time(lambda: table(idx, scores), repeats=args.repeats)
    value_bytes = args.tokens * args.heads * args.topk * args.dim * 4
    bag_bw = value_bytes / t_bag
    copy_bw = copy_bandwidth(device=device)

    print(f"device={device} dim={args.dim} slots={cfg.num_slots} heads={args.heads} k={args.topk} tokens={args.tokens}")
    print(f"{'module':<28}{'tokens/s':>14}{'vs SwiGLU':>12}")
    print(f"{'SwiGLU FFN (hidden 4*dim)':<28}{args.tokens / t_ffn:>14,.0f}{1.0:>12.2f}")
    print(f"{'memory layer (fwd+bwd)':<28}{args.tokens / t_mem:>14,.0f}{t_ffn / t_mem:>12.2f}")
    print(f"value-row reads (bag fwd): {bag_bw / 1e9:.2f} GB/s = {bag_bw / copy_bw:.2f} x copy bandwidth ({copy_bw / 1e9:.2f} GB/s read+write)")


if __name__ == "__main__":
    main()
