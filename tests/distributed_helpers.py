"""Tiny model, batches and a local reference step shared by the distributed engine tests."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from smft_dist.config import JobConfig, MemoryConfig, MethodConfig, ModelConfig
from smft_dist.distributed.parallelize import Parallel, parallelize
from smft_dist.model.transformer import Transformer, lm_loss
from smft_dist.smft.background_stats import BackgroundStats
from smft_dist.smft.methods import apply_method
from smft_dist.smft.selection import apply_sparse_updates

DENSE_LR, VALUE_LR, B, S = 0.5, 2.0, 2, 8  # B: sequences per rank


def tiny_job(method: str = "pretrain", sparse_optim: str | None = None, **distributed) -> JobConfig:
    """``sparse_optim``: the value rows' optimizer type (default: the config's; adamw for full_ft)."""
    model = ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, max_seq_len=S,
                        memory=MemoryConfig(layers=[1], n_keys=8, heads=2, topk=4, k_dim=8))
    job = JobConfig(model=model, method=MethodConfig(name=method, dense_lr=DENSE_LR, value_lr=VALUE_LR, top_t=6))
    job.sparse_optim.type = sparse_optim or ("adamw" if method == "full_ft" else job.sparse_optim.type)
    job.distributed.grad_clip = 0.0
    for k, v in distributed.items():
        setattr(job.distributed, k, v)
    job.validate()
    return job


def batch(n: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n sequences with some right padding; labels -100 on padding."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 64, (n, S), generator=g)
    mask = torch.ones(n, S, dtype=torch.long)
    mask[::2, -(1 + step % 3):] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def rank_slice(t: torch.Tensor, rank: int, world: int, total: int) -> torch.Tensor:
    per = total // world
    return t[rank * per : (rank + 1) * per]


def background() -> BackgroundStats:
    """df statistics where even slots are common (so TF-IDF prefers odd ones)."""
    bg = BackgroundStats.empty({"mem_values_1": 64})
    bg.add_batch({"mem_values_1": (torch.arange(64) % 2 == 0).long()})
    return bg


def build(job: JobConfig, device=torch.device("cpu")) -> tuple[Transformer, Parallel]:
    """Same-seed model on every rank; returns (a local reference copy, the parallelized model).

    The reference counts slots over this rank alone (it sees the whole batch by itself); its row
    selectors ride along as ``reference.row_selectors``."""
    torch.manual_seed(0)
    model = Transformer(job.model)
    bg = background() if job.method.name == "smft" else None
    plan = apply_method(model, job.method, bg)
    reference = copy.deepcopy(model)
    alone = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]
    reference.row_selectors = apply_method(reference, job.method, bg, group=alone).selectors
    optimizer = torch.optim.SGD(plan.dense_params, lr=DENSE_LR) if plan.dense_params else None
    return reference, parallelize(model, job, plan, device, dense_optimizer=optimizer)


def reference_value_optimizer(model: Transformer, job: JobConfig) -> torch.optim.Optimizer | None:
    """A plain torch AdamW over the local tables, as ``job`` configures the rows' AdamW; None for SGD."""
    from smft_dist.distributed.sharding import value_optimizer

    optim, lr = value_optimizer(job)
    if optim.type != "adamw":
        return None
    return torch.optim.AdamW(model.value_tables.parameters(), lr=lr, betas=(optim.beta1, optim.beta2),
                             eps=optim.eps, weight_decay=optim.weight_decay)


def reference_step(model: Transformer, ids, mask, labels, value_optimizer: torch.optim.Optimizer | None = None) -> float:
    """One process, whole batch: SGD on dense (DENSE_LR); value rows by ``value_optimizer``, else SGD
    (VALUE_LR)."""
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model(ids, mask), labels)
    loss.backward()
    apply_sparse_updates(model.value_tables, model.row_selectors)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_value = name.startswith("value_tables.")
            if p.grad is not None and not (is_value and value_optimizer is not None):
                p -= (VALUE_LR if is_value else DENSE_LR) * p.grad
    if value_optimizer is not None:
        value_optimizer.step()
    return loss.item()


def dense_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("value_tables.")}
