"""Evaluate a saved model on the ``eval`` tasks of a config.

    python -m smft_dist.evaluate --config configs/tiny.yaml --model runs/x/hf [--step N]
        [--out DIR] [key=value ...]

The model is loaded whole (local value tables) on every rank; under torchrun / SLURM every rank
evaluates a disjoint shard of each task. Rank 0 prints the results and, with ``--out``, logs them
as a training run does (``DIR/metrics.jsonl``, ``DIR/tensorboard``).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import smft_dist.model  # noqa: F401  (registers smft_memory with the Auto* classes)
from smft_dist.config import load_config
from smft_dist.data.tokenizer import load_tokenizer
from smft_dist.distributed.env import init_distributed
from smft_dist.eval.runner import run_eval
from smft_dist.metrics import MetricLogger


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="YAML config (its eval section lists the tasks)")
    ap.add_argument("--model", required=True, help="HF model directory (AutoModelForCausalLM)")
    ap.add_argument("--tokenizer", help="tokenizer directory; default: data.tokenizer, else --model")
    ap.add_argument("--step", type=int, default=0, help="step recorded with the results")
    ap.add_argument("--out", help="log directory: metrics.jsonl and tensorboard/ (appended)")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1:
        _, device = init_distributed(cfg.distributed.backend)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(device)
    tokenizer = load_tokenizer(args.tokenizer or cfg.data.tokenizer or args.model)
    results = run_eval(model, tokenizer, cfg.eval, cache_dir=cfg.data.cache_dir)
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if args.out:
        logger = MetricLogger(args.out, is_main)
        logger.log(args.step, results, prefix="eval")
        logger.close()
    elif is_main:
        print(json.dumps(results, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
