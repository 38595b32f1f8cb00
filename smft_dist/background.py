"""Collect background df statistics: ``python -m smft_dist.background --config FILE --out PATH``.

Runs the model (``train.init_from``) forward over ``--batches`` global batches of the background
stream (``data.background``) and counts, per memory layer's table, in how many batches each slot
was read (all-reduced over ranks, so a global batch counts once) and how often in total. The result
is what ``method.background`` points at for TF-IDF (df) and KL (counts) ranking.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from smft_dist.config import JobConfig, load_config
from smft_dist.data import DataError, build_stream, load_tokenizer
from smft_dist.distributed.env import init_distributed
from smft_dist.distributed.parallelize import parallelize
from smft_dist.smft.background_stats import BackgroundStats
from smft_dist.smft.methods import MethodPlan
from smft_dist.smft.slot_counts import SlotCounter
from smft_dist.train import USER_ERRORS, build_model


@torch.no_grad()
def collect(cfg: JobConfig, num_batches: int) -> BackgroundStats:
    """df and access-count statistics of ``num_batches`` background batches (fewer if the stream ends first)."""
    env, device = init_distributed(cfg.distributed.backend)
    model = build_model(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    par = parallelize(model, cfg, MethodPlan("background", [], False, {}), device)
    par.model.eval()
    stream = build_stream(cfg.data.background, load_tokenizer(cfg.data.tokenizer), rank=env.rank,
                          world_size=env.world_size, seed=cfg.data.seed, cache_dir=cfg.data.cache_dir)
    layers = par.model.memory_layers()
    stats = BackgroundStats.empty({layer.table_name: layer.cfg.num_slots for layer in layers})
    for batch in stream:
        if stats.num_batches >= num_batches:
            break
        par.model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        accessed = {name: torch.zeros_like(df) for name, df in stats.df.items()}
        for layer in layers:  # layers sharing a pool add up
            slots, counts = SlotCounter().global_counts([layer.last_access.slots()])
            accessed[layer.table_name].index_add_(0, slots.cpu(), counts.cpu())
        stats.add_batch(accessed)
    return stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--batches", type=int, default=1000, help="background batches (paper: 1000)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    args = p.parse_args(argv)
    try:
        stats = collect(load_config(args.config, args.overrides), args.batches)
        if stats.num_batches == 0:
            raise DataError("data.background: the stream gave no batch")
        if dist.get_rank() == 0:
            stats.save(args.out)
            print(f"background: df over {stats.num_batches} batches -> {args.out}")
    except USER_ERRORS as e:
        raise SystemExit(f"smft_dist.background: {e}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
