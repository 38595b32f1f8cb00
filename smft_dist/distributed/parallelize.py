"""Compose the distributed model: sharded value tables + the DeepSpeed engine, and one train step."""

from __future__ import annotations

from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist

from smft_dist.config import JobConfig
from smft_dist.distributed.dense import build_dense_engine, dense_dtype, set_dense_lr
from smft_dist.distributed.sharding import ShardedValueTable
from smft_dist.model.saved import saved_value_rows
from smft_dist.model.transformer import Transformer, lm_loss, value_table_names
from smft_dist.model.value_table import SeededRows
from smft_dist.smft.methods import MethodPlan


@dataclass
class Parallel:
    """A model ready to train: dense parameters under DeepSpeed, value tables under TorchRec.

    ``engine`` is None when no dense parameter trains (smft, memory_ft): DeepSpeed would have nothing
    to step and refuses a backward without an optimizer, so the model runs as is.
    """

    model: Transformer
    engine: deepspeed.DeepSpeedEngine | None
    tables: dict[str, ShardedValueTable]
    values_train: bool = True  # False (lora): rows stay at lr 0 whatever value_lr a step passes
    grad_accum_steps: int = 1  # micro-batches per step (DeepSpeed's own count when there is an engine)


def shard_value_tables(
    model: Transformer, cfg: JobConfig, device: torch.device, values_train: bool = True, split: bool = False, group=None
) -> dict[str, ShardedValueTable]:
    """Replace the model's local value tables by TorchRec ones (unregistered: DeepSpeed never sees them).

    Rows come from the local tables (identical on every rank) or, for a model built without them
    (``Transformer(cfg, build_value_tables=False)``), from the model saved at ``train.init_from``
    (:class:`SavedRows`) or else :class:`SeededRows` of ``train.seed``: each rank reads or generates
    only its own shard. Frozen values (``values_train`` False) keep lr 0: rows stay bit-identical
    while scores still get gradients. ``split``: lookups carry a trainable mask
    (sparse memory finetuning).
    """
    lr = cfg.method.value_lr if values_train else 0.0
    names = sorted(set(value_table_names(model.cfg).values()))
    slots, dim = model.cfg.memory.num_slots, model.cfg.value_dim
    tables = {}
    for i, name in enumerate(names):
        local = model.value_tables[name] if name in model.value_tables else None
        if local is not None:
            init = local.full_weight()
        elif cfg.train.init_from:
            init = saved_value_rows(cfg.train.init_from, name)
        else:
            init = SeededRows(slots, dim, cfg.train.seed * 1009 + i)
        tables[name] = ShardedValueTable(
            name, init, cfg.sparse_optim, lr, cfg.distributed.table_placement, device, group, split=split
        )
    model.bind_value_tables(tables, register=False)
    return tables


def parallelize(
    model: Transformer,
    cfg: JobConfig,
    plan: MethodPlan,
    device: torch.device,
    dense_optimizer: torch.optim.Optimizer | None = None,
) -> Parallel:
    """Shard the value tables and wrap the rest in DeepSpeed. ``dense_optimizer`` defaults to AdamW
    (``method.dense_lr``, betas, weight decay) over ``plan.dense_params``; none when they are frozen."""
    tables = shard_value_tables(model, cfg, device, plan.values_train, split=bool(plan.selectors))
    if not plan.dense_params:
        model = model.to(device, dense_dtype(cfg.distributed, device))
        return Parallel(model, None, tables, plan.values_train, cfg.distributed.grad_accum_steps)
    if dense_optimizer is None:
        m = cfg.method
        dense_optimizer = torch.optim.AdamW(plan.dense_params, lr=m.dense_lr, betas=tuple(m.betas), weight_decay=m.weight_decay)
    engine = build_dense_engine(model, dense_optimizer, cfg.distributed, device)
    return Parallel(engine.module, engine, tables, plan.values_train, cfg.distributed.grad_accum_steps)


def train_step(
    par: Parallel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    dense_lr: float | None = None,
    value_lr: float | None = None,
) -> float:
    """One micro-batch on this rank's slice of the global batch; returns the global mean loss.

    Value rows update inside the backward (fused optimizer); the dense optimizer steps at the
    gradient-accumulation boundary. The local loss is the token sum over the *global* token count
    times the world size, so the ranks' averaged gradients equal one process over the global batch
    even when ranks hold different numbers of label tokens. Every rank must pass the same batch
    shape (TorchRec's row-wise lookup expects as many bags from every rank).
    """
    if value_lr is not None and par.values_train:
        for table in par.tables.values():
            table.set_lr(value_lr)
    if dense_lr is not None and par.engine is not None:
        set_dense_lr(par.engine, dense_lr)
    logits = (par.engine or par.model)(input_ids, attention_mask)
    loss_sum = lm_loss(logits, labels, reduction="sum")
    stats = torch.stack([loss_sum.detach().float(), (labels[:, 1:] != -100).sum().float()])
    dist.all_reduce(stats)
    loss = loss_sum * dist.get_world_size() / stats[1].clamp(min=1)
    if par.engine is None:
        (loss / par.grad_accum_steps).backward()  # as DeepSpeed scales it
    else:
        par.engine.backward(loss)
    for table in par.tables.values():
        table.step_replicated()
    if par.engine is not None:
        par.engine.step()
    return (stats[0] / stats[1].clamp(min=1)).item()
