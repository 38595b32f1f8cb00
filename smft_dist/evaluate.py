"""Evaluate a saved model on the ``eval`` tasks of a config.

    python -m smft_dist.evaluate --config configs/tiny.yaml --model runs/x/hf [--step N]
        [--out DIR] [key=value ...]

A memory model (``save_pretrained`` of this project) loads as ``train.init_from`` does: the dense
weights on every rank, each rank only its own rows of the value tables (row-sharded, as in
training); under torchrun / SLURM the ranks split each task's examples and run equal-shaped batches
in lockstep. Any other causal LM (``AutoModelForCausalLM``) loads whole on every rank, each rank
evaluating a disjoint shard of each task. Rank 0 prints the results and, with ``--out``, logs them
as a training run does (``DIR/metrics.jsonl``, ``DIR/tensorboard``, each qa / choice example's
answer in ``DIR/answers/step<N>/<task>.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import smft_dist.model  # noqa: F401  (registers smft_memory with the Auto* classes)
from smft_dist.config import ConfigError, load_config
from smft_dist.data import DataError, load_tokenizer
from smft_dist.distributed.env import init_distributed
from smft_dist.distributed.parallelize import parallelize
from smft_dist.eval.runner import run_eval
from smft_dist.metrics import MetricLogger
from smft_dist.model.hf import SMFTConfig
from smft_dist.model.saved import load_dense
from smft_dist.smft.methods import MethodPlan
from smft_dist.train import USER_ERRORS
from smft_dist.train import evaluate as evaluate_parallel


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
    try:
        return evaluate(parse_args(argv))
    except USER_ERRORS as e:
        raise SystemExit(f"smft_dist.evaluate: {e}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    """Evaluate ``args.model`` on the config's tasks; rank 0 prints or logs the results."""
    cfg = load_config(args.config, args.overrides)
    if not (Path(args.model) / "config.json").is_file():
        raise ConfigError(f"--model: {args.model} is not a save_pretrained directory (no config.json)")
    tokenizer = load_tokenizer(args.tokenizer or cfg.data.tokenizer or args.model)
    answers = Path(args.out) / "answers" / f"step{args.step}" if args.out else None
    if json.loads((Path(args.model) / "config.json").read_text()).get("model_type") == SMFTConfig.model_type:
        _, device = init_distributed(cfg.distributed.backend)  # a group of one when not launched
        model = load_dense(args.model)  # the value tables stay unbound: parallelize reads each rank's rows
        cfg.model, cfg.train.init_from = model.cfg, args.model
        par = parallelize(model, cfg, MethodPlan("evaluate", [], False, {}), device)
        results = evaluate_parallel(par, tokenizer, cfg, answers)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1:
            _, device = init_distributed(cfg.distributed.backend)
        model = AutoModelForCausalLM.from_pretrained(args.model).to(device)
        results = run_eval(model, tokenizer, cfg.eval, cache_dir=cfg.data.cache_dir, answers_dir=answers)
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if args.out:
        logger = MetricLogger(args.out, is_main)
        logger.log(args.step, results, prefix="eval")
        logger.close()
    elif is_main:
        print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
