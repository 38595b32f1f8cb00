"""The training loop: ``python -m smft_dist.train --config FILE [key=value ...]``.

Composes the pieces, one line each: process group -> model -> training method -> sharded tables +
DeepSpeed -> data stream -> resume -> steps (LR schedule, logging, eval, checkpoints) -> HF export.
The same code runs one CPU process (gloo) or many GPUs (NCCL) under torchrun, the deepspeed
launcher or SLURM.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from smft_dist.config import JobConfig, TrainConfig, load_config
from smft_dist.distributed.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from smft_dist.distributed.env import init_distributed
from smft_dist.distributed.parallelize import parallelize, train_step
from smft_dist.metrics import MetricLogger
from smft_dist.model.hf import SMFTForCausalLM
from smft_dist.model.transformer import Transformer
from smft_dist.smft.background import BackgroundStats
from smft_dist.smft.methods import apply_method


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Warmup then constant | cosine | linear decay to ``min_lr_ratio``, as a factor on the base lrs."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_model(cfg: JobConfig) -> Transformer:
    """A fresh model (seeded, identical on every rank) or the one saved at ``train.init_from``."""
    if cfg.train.init_from:
        path = Path(cfg.train.init_from)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"train.init_from: {path} is not a save_pretrained directory (no config.json)")
        model = SMFTForCausalLM.from_pretrained(str(path)).model
        cfg.model = model.cfg
        return model
    torch.manual_seed(cfg.train.seed)
    return Transformer(cfg.model)
