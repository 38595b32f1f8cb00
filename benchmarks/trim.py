"""Trimming right padding: tokens/s of smft steps on the facts stream with every batch run at its
padded ``seq_len`` vs trimmed to its longest real row (``train_step``'s default), in one run.

The quickstart's model (``configs/quickstart_pretrain.yaml``, freshly initialized) and stage-2 method
(``configs/quickstart_smft.yaml``; ranking tf, which needs no background statistics), on the facts
of a synthetic world generated into a temporary directory; one process. Both modes step the same
model through the same batches, alternating which goes first; tokens are real (unpadded) tokens.

    python -m benchmarks.trim [--seq-len 64 --facts 32 --passes 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from smft_dist.config import load_config
from smft_dist.data import build_stream, load_tokenizer
from smft_dist.data.synthetic import generate
from smft_dist.distributed.env import init_distributed
from smft_dist.distributed.parallelize import parallelize, train_step
from smft_dist.model import Transformer
from smft_dist.smft.methods import apply_method


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=64, help="the facts stream's padded row length")
    p.add_argument("--facts", type=int, default=32, help="facts (one step each) per pass")
    p.add_argument("--passes", type=int, default=2, help="timed passes over the facts, after one warmup step per mode")
    args = p.parse_args()
    model_cfg = load_config("configs/quickstart_pretrain.yaml").model
    with tempfile.TemporaryDirectory() as data:
        paths = generate(data, "small")
        cfg = load_config("configs/quickstart_smft.yaml", [
            "train.init_from=", "method.ranking=tf", "method.background=", f"data.tokenizer={paths['tokenizer']}",
            f"data.continual.source.path={paths['facts_new']}", f"data.continual.source.max_examples={args.facts}",
            f"data.continual.seq_len={args.seq_len}", "data.continual.shuffle=false",
        ])
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        stream = build_stream(cfg.data.continual, tokenizer)
        batches = list(stream)
    cfg.model = model_cfg
    _, device = init_distributed()
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model, build_value_tables=False)
    par = parallelize(model, cfg, apply_method(model, cfg.method), device)

    def step(batch: dict[str, torch.Tensor], trim: bool) -> float:
        t0 = time.perf_counter()
        train_step(par, *(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")), trim=trim)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for trim in (False, True):
        step(batches[0], trim)
    seconds = {False: 0.0, True: 0.0}
    for i, batch in enumerate(batches * args.passes):
        for trim in ((False, True) if i % 2 else (True, False)):
            seconds[trim] += step(batch, trim)
    masks = [b["attention_mask"] for b in batches]
    real = sum(int(m.sum()) for m in masks)
    rows = sum(m.shape[0] for m in masks)
    columns = sum(int(m.sum(1).max()) for m in masks) / len(masks)
    print(f"facts stream: {len(batches)} facts x {cfg.data.continual.batch_size} rows, seq_len {args.seq_len}: "
          f"{real / rows:.1f} real tokens per row, trimmed to {columns:.1f} columns on average "
          f"({cfg.model.dim}-dim, {cfg.model.n_layers} layers, {cfg.model.memory.num_slots} slots, smft tf top-{cfg.method.top_t}, "
          f"{torch.get_num_threads()} thread(s) on {device.type})")
    tokens = real * args.passes
    for name, trim in (("padded", False), ("trimmed", True)):
        print(f"{name:<10}{tokens / seconds[trim]:>12,.0f} tokens/s")
    print(f"ratio trimmed/padded: {seconds[False] / seconds[True]:.2f}x")


if __name__ == "__main__":
    main()
