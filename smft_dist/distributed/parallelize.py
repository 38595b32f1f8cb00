"""Compose the distributed model: sharded value tables + the DeepSpeed engine, and one train step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import deepspeed
import torch
import torch.distributed as dist

from smft_dist.config import JobConfig
from smft_dist.distributed.dense import build_dense_engine, dense_dtype, set_dense_lr
from smft_dist.distributed.nonfinite import check_loss
from smft_dist.distributed.sharding import ShardedValueTable, check_row_optimizer, value_optimizer
from smft_dist.model.saved import saved_value_rows
from smft_dist.model.transformer import Transformer, lm_loss, value_table_names
from smft_dist.model.value_table import SavedRows, SeededRows
from smft_dist.smft.methods import MethodPlan
from smft_dist.smft.selection import RowSelector, apply_sparse_updates, mark_counted_positions


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
    grad_accum_steps: int = 1  # micro-batches per optimizer step (DeepSpeed's own count when there is an engine)
    row_selectors: dict[str, RowSelector] = field(default_factory=dict)  # smft / memory_ft: deferred row updates
    before_row_update: Callable[[str, torch.Tensor], None] | None = None  # sees deferred updates' rows (NonFiniteGuard)

    def step_values(self) -> None:
        """End of an optimizer step's window, after its last backward: the one place where value rows
        update outside the backward pass. smft / memory_ft: each table's rows selected from every
        lookup of the window (all layers, all micro-batches) update once; torch row optimizers step
        (fused ones already stepped inside the backward)."""
        apply_sparse_updates(self.tables, self.row_selectors, self.before_row_update)
        for table in self.tables.values():
            table.step()

    def discard_step(self) -> None:
        """Forget the lookups of a step that will not be applied (a skipped non-finite step)."""
        for table in self.tables.values():
            table.pending.clear()


def shard_value_tables(
    model: Transformer, cfg: JobConfig, device: torch.device, values_train: bool = True, deferred_rows: bool = False,
    group=None
) -> dict[str, ShardedValueTable]:
    """Replace the model's local value tables by TorchRec ones (unregistered: DeepSpeed never sees them).

    Rows come from the local tables (identical on every rank) or, for a model built without them
    (``Transformer(cfg, build_value_tables=False)``), from the model saved at ``train.init_from``
    (:class:`SavedRows`) or else :class:`SeededRows` of ``train.seed``: each rank reads or generates
    only its own shard. The rows' optimizer and lr come from
    :func:`~smft_dist.distributed.sharding.value_optimizer`. Frozen values (``values_train`` False)
    keep lr 0: rows stay bit-identical while scores still get gradients. ``deferred_rows``: rows
    update only in :meth:`Parallel.step_values` (sparse memory finetuning).
    """
    optim, lr = value_optimizer(cfg)
    lr = lr if values_train else 0.0
    tables = {}
    for name, init in value_table_sources(model, cfg).items():
        tables[name] = ShardedValueTable(
            name, init, optim, lr, cfg.distributed.table_placement, device, group, deferred_rows=deferred_rows
        )
    model.bind_value_tables(tables, register=False)
    return tables


def value_table_sources(model: Transformer, cfg: JobConfig) -> dict[str, torch.Tensor | SavedRows | SeededRows]:
    """Where each value table's rows start from: the model's local table (whole), the model saved at
    ``train.init_from`` or rows seeded from ``train.seed`` (both read by row range). Call before
    :func:`shard_value_tables` binds the sharded tables."""
    slots, dim = model.cfg.memory.num_slots, model.cfg.value_dim
    sources = {}
    for i, name in enumerate(sorted(set(value_table_names(model.cfg).values()))):
        if name in model.value_tables:
            sources[name] = model.value_tables[name].full_weight()
        elif cfg.train.init_from:
            sources[name] = saved_value_rows(cfg.train.init_from, name)
        else:
            sources[name] = SeededRows(slots, dim, cfg.train.seed * 1009 + i)
    return sources


def parallelize(
    model: Transformer,
    cfg: JobConfig,
    plan: MethodPlan,
    device: torch.device,
    dense_optimizer: torch.optim.Optimizer | None = None,
) -> Parallel:
    """Shard the value tables and wrap the rest in DeepSpeed. ``dense_optimizer`` defaults to AdamW
    (``method.dense_lr``, betas, weight decay) over ``plan.dense_params``; none when they are frozen."""
    if plan.selectors:
        check_row_optimizer(cfg.sparse_optim, plan.name, len(model.memory_layers()))
    tables = shard_value_tables(model, cfg, device, plan.values_train, deferred_rows=bool(plan.selectors))
    if not plan.dense_params:
        model = model.to(device, dense_dtype(cfg.distributed, device))
        return Parallel(model, None, tables, plan.values_train, cfg.distributed.grad_accum_steps, plan.selectors)
    if dense_optimizer is None:
        m = cfg.method
        dense_optimizer = torch.optim.AdamW(plan.dense_params, lr=m.dense_lr, betas=tuple(m.betas), weight_decay=m.weight_decay)
    engine = build_dense_engine(model, dense_optimizer, cfg.distributed, device)
    return Parallel(engine.module, engine, tables, plan.values_train, cfg.distributed.grad_accum_steps, plan.selectors)


def trim_padding(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows [B, S] without their trailing columns that are padding (mask 0, label -100) in every
    row of every rank: they keep the longest real row of any rank. Exact: attention is causal and
    padding reads no memory, so no real token sees those columns. Every rank keeps one length, as
    TorchRec's row-wise lookup and the slot counts need one shape; so do the micro-batches of a
    window, chunked from these rows. Collective (one all-reduce, one host sync)."""
    real = attention_mask.bool().any(0) | (labels != -100).any(0)
    length = (real * torch.arange(1, real.numel() + 1, device=real.device)).max()
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    keep = max(int(length), 1)
    return input_ids[:, :keep], attention_mask[:, :keep], labels[:, :keep]


def train_step(
    par: Parallel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    dense_lr: float | None = None,
    value_lr: float | None = None,
    trim: bool = True,
) -> torch.Tensor:
    """One optimizer step on this rank's rows of the step's global batch; returns the global mean
    loss as a 0-dim tensor (call ``.item()`` only to log it; the host syncs are the trimmed length
    and, per micro-batch, the finiteness check of its loss before the backward).

    The rows first lose the trailing columns that are padding everywhere (:func:`trim_padding`; exact,
    so ``trim`` False only serves as the baseline of ``benchmarks.trim``).

    The rows run as ``par.grad_accum_steps`` equal micro-batches (consecutive row blocks), whose
    gradients accumulate; dense parameters, torch row optimizers and the deferred row updates of smft / memory_ft
    step once at the end. Each
    micro-batch's loss is its token sum over the *window's* global token count (counted up front)
    times the world size, so the step equals one backward over the whole global batch, with ranks
    and micro-batches holding different numbers of label tokens (TorchRec and DeepSpeed average
    gradients over ranks). Under ``method.count_positions=scored`` each micro-batch's labels mark
    the reads the slot counts see. Every rank must pass the same batch shape (TorchRec's row-wise lookup
    expects as many bags from every rank). A non-finite loss raises
    :class:`~smft_dist.distributed.nonfinite.NonFiniteError` before the backward that would use it.
    """
    gas = par.grad_accum_steps
    if input_ids.shape[0] % gas:
        raise ValueError(f"train_step: {input_ids.shape[0]} rows do not split into grad_accum_steps={gas} micro-batches")
    if value_lr is not None and par.values_train:
        for table in par.tables.values():
            table.set_lr(value_lr)
    if dense_lr is not None and par.engine is not None:
        set_dense_lr(par.engine, dense_lr)
    if trim and attention_mask is not None:  # without a mask every token is real
        input_ids, attention_mask, labels = trim_padding(input_ids, attention_mask, labels)
    tokens = (labels[:, 1:] != -100).sum().float()
    dist.all_reduce(tokens)
    scale = dist.get_world_size() / tokens.clamp(min=1)
    loss_sum = torch.zeros((), device=labels.device)
    masks = attention_mask.chunk(gas) if attention_mask is not None else [None] * gas
    for ids, mask, lab in zip(input_ids.chunk(gas), masks, labels.chunk(gas)):
        mark_counted_positions(par.tables, par.row_selectors, lab)  # method.count_positions=scored
        micro_sum = lm_loss((par.engine or par.model)(ids, mask), lab, reduction="sum")
        global_sum = micro_sum.detach().float()
        dist.all_reduce(global_sum)
        check_loss(global_sum)  # before the backward: fused row optimizers step inside it
        loss_sum += global_sum
        if par.engine is None:
            (micro_sum * scale).backward()
        else:
            par.engine.backward(micro_sum * scale, scale_wrt_gas=False)
            par.engine.step()  # DeepSpeed steps at its accumulation boundary, the window's last micro-batch
    par.step_values()
    return loss_sum / tokens.clamp(min=1)
