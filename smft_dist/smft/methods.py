"""Training methods: which parameters train, and with what optimizer.

=========  ==========================================  ========================================
method     trains                                      optimizer
=========  ==========================================  ========================================
pretrain   everything (scores carry gradient)          AdamW dense; values at their own lr
smft       top-t value rows of each batch (TF-IDF)     SGD on value rows; dense frozen
memory_ft  every accessed value row                    SGD on value rows; dense frozen
full_ft    every parameter                             AdamW
lora       LoRA adapters on attention + SwiGLU FFNs    AdamW (peft)
=========  ==========================================  ========================================

SGD for sparse methods follows the paper: adaptive steps, momentum and weight decay interact with
sparsity in unexpected ways, and plain SGD leaves unselected rows bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from smft_dist.config import ConfigError, MethodConfig
from smft_dist.model.memory import MemoryLayer
from smft_dist.model.transformer import Attention, SwiGLU, Transformer
from smft_dist.smft.background import BackgroundStats
from smft_dist.smft.selection import TopTSelector, background_log_q, idf
from smft_dist.smft.slot_counts import SlotCounter


@dataclass
class MethodPlan:
    """What :func:`apply_method` set up: trainable dense parameters, whether values train, selectors."""

    name: str
    dense_params: list[nn.Parameter]
    values_train: bool
    selectors: dict[int, TopTSelector]  # block index of a memory layer -> its selector (smft only)


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
    """Freeze / unfreeze parameters of ``model`` for ``cfg.name`` and install top-t selectors."""
    if cfg.name in ("smft", "memory_ft") and not model.memory_layers():
        raise ConfigError(f"model.memory.layers: method {cfg.name} needs at least one memory layer")
    for layer in model.memory_layers():
        layer.trainable_selector = None
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
    selectors: dict[int, TopTSelector] = {}
    if cfg.name == "smft":
        for i, block in enumerate(model.layers):
            if not isinstance(block.ffn, MemoryLayer):
                continue
            name = block.ffn.table_name
            weights = None
            if cfg.ranking == "tfidf":
                if background is None or name not in background.df:
                    raise ConfigError(f"method.background: ranking 'tfidf' needs df statistics for table {name!r} "
                                      "(python -m smft_dist.background)")
                weights = idf(background.df[name], background.num_batches)
            elif cfg.ranking == "kl":
                if background is None or name not in background.counts:
                    raise ConfigError(f"method.background: ranking 'kl' needs background access counts for table {name!r} "
                                      "(rerun python -m smft_dist.background)")
                weights = background_log_q(background.counts[name])
            sel = TopTSelector(SlotCounter(block.ffn.cfg.num_slots, group), cfg.top_t, cfg.ranking, weights, seed_fn)
            block.ffn.trainable_selector = selectors[i] = sel
    dense = [p for _, p in model.dense_parameters() if p.requires_grad]
    return MethodPlan(cfg.name, dense, True, selectors)


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
