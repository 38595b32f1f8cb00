"""Training methods: which parameters train, and with what optimizer.

===============  ==========================================  ========================================
method           trains                                      optimizer
===============  ==========================================  ========================================
pretrain         everything (scores carry gradient)          AdamW dense; values at their own lr
smft             top-t value rows per table and step         row optimizer (sparse_optim); dense frozen
memory_ft        every accessed value row                    row optimizer (sparse_optim); dense frozen
memory_pretrain  memory layers: query, keys, W1, W2, values  AdamW on those; values at their own lr
full_ft          every parameter                             AdamW (value rows too)
lora             LoRA adapters on attention + SwiGLU FFNs    AdamW (peft)
===============  ==========================================  ========================================

memory_pretrain is recovery training after a retrofit (:mod:`smft_dist.model.hf_retrofit`): the
memory learns while every other weight stays bit-identical.

SGD for sparse methods follows the paper. smft / memory_ft update rows by a deferred row update
(``ValueTable.update_rows``): one selection per table and optimizer step from the counts of every
layer reading it, each selected row updated once with the sum of its gradients, unselected rows never
in a backward (bit-identical under any row optimizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from smft_dist.config import ConfigError, MethodConfig
from smft_dist.model.transformer import Attention, SwiGLU, Transformer
from smft_dist.smft.background_stats import BackgroundStats
from smft_dist.smft.selection import RowSelector, background_log_q, idf


@dataclass
class MethodPlan:
    """What :func:`apply_method` set up: trainable dense parameters, whether values train, and the
    row selectors of deferred row updates (smft, memory_ft)."""

    name: str
    dense_params: list[nn.Parameter]
    values_train: bool
    selectors: dict[str, RowSelector]  # value table name -> its selector (smft, memory_ft)


def lora_targets(model: Transformer) -> list[str]:
    """Full names of the attention and SwiGLU projections (memory layers excluded)."""
    return [
        f"{name}.{proj}"
        for name, module in model.named_modules()
        if isinstance(module, (Attention, SwiGLU))
        for proj, child in module.named_children()
        if isinstance(child, nn.Linear)
    ]


def apply_method(
    model: Transformer,
    cfg: MethodConfig,
    background: BackgroundStats | None = None,
    group: torch.distributed.ProcessGroup | None = None,
    seed_fn: Callable[[], int] = lambda: 0,
) -> MethodPlan:
    """Freeze / unfreeze parameters of ``model`` for ``cfg.name``; smft / memory_ft get one row
    selector per value table and defer the row updates of the model's local tables."""
    if cfg.name in ("smft", "memory_ft", "memory_pretrain") and not model.memory_layers():
        raise ConfigError(f"model.memory.layers: method {cfg.name} needs at least one memory layer")
    if cfg.name == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=lora_targets(model))
        inject_adapter_in_model(lora, model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        return MethodPlan(cfg.name, [p for p in model.parameters() if p.requires_grad], False, {})

    dense_train = cfg.name in ("pretrain", "full_ft")
    for _, p in model.dense_parameters():
        p.requires_grad_(dense_train)
    if cfg.name == "memory_pretrain":
        for layer in model.memory_layers():
            layer.requires_grad_(True)
    selectors: dict[str, RowSelector] = {}
    if cfg.name in ("smft", "memory_ft"):
        refuse_zero_w2(model, cfg.name)
        ranking = cfg.ranking if cfg.name == "smft" else "all"
        for layer in model.memory_layers():
            name = layer.table_name
            if name in selectors:  # a shared pool: one selector for every layer reading it
                continue
            weights = ranking_weights(ranking, background, name, layer.cfg.num_slots)
            selectors[name] = RowSelector(cfg.top_t, ranking, weights, seed_fn, group, cfg.count_positions,
                                          cfg.row_share_cap, layer.cfg.num_slots)
        for table in model.value_tables.values():
            table.deferred_rows = True
    dense = [p for _, p in model.dense_parameters() if p.requires_grad]
    return MethodPlan(cfg.name, dense, True, selectors)


def refuse_zero_w2(model: Transformer, method: str) -> None:
    """A memory layer whose output projection W2 is all zero: value rows cannot move the output and
    ``method`` keeps W2 frozen, so it would train nothing. Refused, naming what to run first. A model
    on the meta device (parameter counts) holds no values to check."""
    for i, block in enumerate(model.layers):
        layer = block.memory_layer
        if layer is not None and not layer.w2.weight.is_meta and not bool(layer.w2.weight.any()):
            raise ConfigError(f"model: the memory layer of block {i} has an all-zero output projection W2, which {method} "
                              "keeps frozen, so no value row could change the output; run recovery first "
                              "(method.name=memory_pretrain from this model) or retrofit again with --memory-init values_zero")


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` under plain :class:`Transformer` names, LoRA adapters merged into their
    base weights (the model itself is left unmerged)."""
    from peft.tuners.lora import LoraLayer

    adapters = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for m in adapters:
        m.merge()
    try:
        return {
            k.replace(".base_layer", ""): v.detach().clone()
            for k, v in model.state_dict().items()
            if "lora_" not in k
        }
    finally:
        for m in adapters:
            m.unmerge()


def ranking_weights(ranking: str, background: BackgroundStats | None, name: str, num_slots: int) -> torch.Tensor | None:
    """The per-slot background weights ``ranking`` ranks table ``name`` with (idf for tfidf, log q for
    kl, None otherwise), refusing statistics that are missing or were collected for another table size."""
    if ranking == "tfidf":
        if background is None or name not in background.df:
            raise ConfigError(f"method.background: ranking 'tfidf' needs df statistics for table {name!r} "
                              "(python -m smft_dist.background)")
        df = background.df[name]
        if df.numel() != num_slots or background.num_batches <= 0:
            raise ConfigError(f"method.background: df statistics for table {name!r} cover {df.numel()} slots over "
                              f"{background.num_batches} batches; the model has {num_slots} slots (collect them for this model)")
        return idf(df, background.num_batches)
    if ranking == "kl":
        if background is None or name not in background.counts:
            raise ConfigError(f"method.background: ranking 'kl' needs background access counts for table {name!r} "
                              "(rerun python -m smft_dist.background)")
        return background_log_q(background.counts[name])
    return None
