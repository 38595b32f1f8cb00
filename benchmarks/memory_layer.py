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


def measure(
    dim: int = 512, n_keys: int = 256, heads: int = 4, topk: int = 32, k_dim: int = 256, tokens: int = 2048,
    repeats: int = 5, device: str = "cpu", dtype: torch.dtype = torch.float32, copy_bytes: int = 256 * 2**20,
) -> dict[str, float]:
    """Forward+backward tokens/s of the memory layer and of a SwiGLU FFN, and the value-read
    bandwidth of the bag forward (bytes of value rows read per second) with the copy bandwidth."""
    torch.manual_seed(0)
    cfg = MemoryConfig(layers=[0], n_keys=n_keys, heads=heads, topk=topk, k_dim=k_dim)
    memory = MemoryLayer(dim, cfg, "mem_values").to(device)
    memory.reset_parameters()
    table = LocalValueTable(cfg.num_slots, dim, device=device)
    memory.bind_table(table)
    memory.to(dtype)
    table.to(dtype)
    ffn = SwiGLU(dim, 4 * dim).to(device, dtype)
    x = torch.randn(1, tokens, dim, device=device, dtype=dtype, requires_grad=True)

    def step(module):
        return lambda: module(x).sum().backward()

    t_mem = best_time(step(memory), repeats=repeats)
    t_ffn = best_time(step(ffn), repeats=repeats)
    with torch.no_grad():
        idx, scores = memory.retrieve(x[0])
        t_bag = best_time(lambda: table(idx, scores), repeats=repeats)
    value_bytes = tokens * heads * topk * dim * torch.finfo(dtype).bits // 8
    return {"slots": cfg.num_slots, "memory_tokens_s": tokens / t_mem, "ffn_tokens_s": tokens / t_ffn,
            "value_read_bw": value_bytes / t_bag, "copy_bw": copy_bandwidth(copy_bytes, device=device)}


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
    m = measure(args.dim, args.n_keys, args.heads, args.topk, args.k_dim, args.tokens, args.repeats, device)

    print(f"device={device} dim={args.dim} slots={m['slots']} heads={args.heads} k={args.topk} tokens={args.tokens}")
    print(f"{'module':<28}{'tokens/s':>14}{'vs SwiGLU':>12}")
    print(f"{'SwiGLU FFN (hidden 4*dim)':<28}{m['ffn_tokens_s']:>14,.0f}{1.0:>12.2f}")
    print(f"{'memory layer (fwd+bwd)':<28}{m['memory_tokens_s']:>14,.0f}{m['memory_tokens_s'] / m['ffn_tokens_s']:>12.2f}")
    bw, copy_bw = m["value_read_bw"], m["copy_bw"]
    print(f"value-row reads (bag fwd): {bw / 1e9:.2f} GB/s = {bw / copy_bw:.2f} x copy bandwidth ({copy_bw / 1e9:.2f} GB/s read+write)")


if __name__ == "__main__":
    main()
