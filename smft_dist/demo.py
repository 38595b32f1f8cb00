"""Single-process demo of the memory-layer LM: ``python -m smft_dist.demo --config FILE``.

Builds the configured model, trains it for a few steps on random tokens, and shows which memory
slots the last batch read. A stand-in for the trainer on a fresh machine.
"""

from __future__ import annotations

import argparse

import torch

from smft_dist.config import load_config
from smft_dist.model import Transformer, lm_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny_cpu.yaml")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, cfg.model.vocab_size, (8, 32))
    for step in range(args.steps):
        loss = lm_loss(model(ids), ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    for layer in model.memory_layers():
        idx = layer.last_access.indices[layer.last_access.valid]
        print(f"{layer.table_name}: {idx.unique().numel()} of {layer.cfg.num_slots} slots read by the last batch")


if __name__ == "__main__":
    main()
