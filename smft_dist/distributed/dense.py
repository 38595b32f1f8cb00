"""The DeepSpeed engine over the dense parameters only.

``deepspeed.initialize`` broadcasts every registered parameter from rank 0, casts it to the training
dtype and saves module weights from rank 0 only; on a row-sharded value table that would overwrite
or drop shards. The model given here must therefore have its value tables bound but *not*
registered (``Transformer.bind_value_tables(tables, register=False)``); :func:`build_dense_engine`
refuses a module that still holds a TorchRec module.

Gradient accumulation: ``parallelize.train_step`` runs an optimizer step as ``grad_accum_steps``
micro-batches, each loss already normalized by the whole window's token count, so it calls
``engine.backward(loss, scale_wrt_gas=False)`` and ``engine.step()`` after each: DeepSpeed
accumulates the gradients and steps the dense optimizer at its accumulation boundary, the window's
last micro-batch. Value rows follow the same window: torch row optimizers step once at its end,
and the config refuses fused FBGEMM optimizers (which update rows inside every backward) wherever
that would make rows step per micro-batch.
"""

from __future__ import annotations

import sys

import deepspeed
import deepspeed.ops
import torch
from deepspeed.accelerator import get_accelerator
from torch import nn

from smft_dist.config import DistributedConfig


def dense_dtype(cfg: DistributedConfig, device: torch.device) -> torch.dtype:
    """Training dtype of the dense parameters: ``auto`` = bf16 on CUDA, fp32 on CPU."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]


def deepspeed_config(cfg: DistributedConfig, device: torch.device) -> dict:
    """The DeepSpeed config dict for ``cfg`` (we feed batches ourselves: micro batch size is nominal)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,  # the client optimizer comes from the training method
        "bf16": {"enabled": dense_dtype(cfg, device) == torch.bfloat16},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op.

    ``deepspeed.comm`` builds ``deepspeed_shm_comm`` (g++ under a lock file in
    ``~/.cache/torch_extensions``) on first init of every fresh machine, although only
    ``inference_all_reduce`` uses it; training collectives go through torch.distributed. A rank killed
    mid-build leaves the lock behind and every later run on that home directory waits on it forever.
    DeepSpeed consults its per-process op compatibility table before building, so we mark the op
    unavailable there. The op exists only for the CPU accelerator; elsewhere this does nothing.
    """
    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_dense_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: DistributedConfig,
    device: torch.device,
) -> deepspeed.DeepSpeedEngine:
    """Wrap ``model`` (dense parameters only) in a DeepSpeed engine stepping ``optimizer``."""
    torchrec_types = sys.modules.get("torchrec.distributed.types")  # not imported: no TorchRec module exists
    sharded = [name for name, m in model.named_modules() if torchrec_types and isinstance(m, torchrec_types.ShardedModule)]
    if sharded:
        raise ValueError(f"build_dense_engine: {sharded[0]!r} is a TorchRec module; bind value tables with register=False")
    _skip_shm_comm_build()
    engine, *_ = deepspeed.initialize(
        model=model.to(device),
        optimizer=optimizer,
        config=deepspeed_config(cfg, device),
        dist_init_required=False,
    )
    return engine


def set_dense_lr(engine: deepspeed.DeepSpeedEngine, lr: float) -> None:
    """Learning rate of the next dense optimizer step."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
