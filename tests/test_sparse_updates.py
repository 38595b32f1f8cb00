"""Deferred row updates under smft / memory_ft equal a plain-torch reference: the full gradient of the
table, one top-t per table from the counts of every layer reading it, one update per row per step."""

from __future__ import annotations

import copy

import pytest
import torch

from smft_dist.config import ConfigError, JobConfig, MemoryConfig, MethodConfig, ModelConfig, SparseOptimConfig
from smft_dist.distributed.parallelize import parallelize, train_step
from smft_dist.distributed.sharding import ShardedValueTable
from smft_dist.model.transformer import Transformer, lm_loss
from smft_dist.model.value_table import LocalValueTable
from smft_dist.smft.background_stats import BackgroundStats
from smft_dist.smft.methods import apply_method
from smft_dist.smft.selection import idf
from tests.distributed_helpers import B, S, batch, dense_state, rank_slice
from tests.multiproc import run_ranks

LR, TOP_T = 2.0, 6


def _shared_job(ranking: str) -> JobConfig:
    """Two memory layers (blocks 0 and 2) reading one value pool."""
    memory = MemoryConfig(layers=[0, 2], n_keys=8, heads=2, topk=4, k_dim=8, shared_values=True)
    model = ModelConfig(vocab_size=64, dim=16, n_layers=3, n_heads=2, max_seq_len=S, memory=memory)
    job = JobConfig(model=model, method=MethodConfig(name="smft", ranking=ranking, top_t=TOP_T, value_lr=LR))
    job.validate()
    return job


def _background() -> BackgroundStats:
    bg = BackgroundStats.empty({"mem_values": 64})
    bg.add_batch({"mem_values": (torch.arange(64) % 3 == 0).long()})
    return bg


def _reference_top_t(counts: torch.Tensor, ranking: str, weights: torch.Tensor | None) -> list[int]:
    """Top-t written out directly: accessed slots by descending score, ties to the lower slot."""
    accessed = [i for i in range(counts.numel()) if counts[i] > 0]
    total = float(counts.sum())
    score = {i: float(counts[i]) / total * float(weights[i]) if ranking == "tfidf" else float(counts[i]) for i in accessed}
    return sorted(sorted(accessed, key=lambda i: (-score[i], i))[:TOP_T])


def _reference_step(model: Transformer, ids, mask, labels, ranking, weights) -> tuple[float, list[int]]:
    """Full table gradient by plain autograd, SGD on the top-t rows only (counts over both layers)."""
    table = model.value_tables["mem_values"].weight
    table.grad = None
    loss = lm_loss(model(ids, mask), labels)
    loss.backward()
    counts = torch.zeros(64, dtype=torch.long)
    for layer in model.memory_layers():
        access = layer.last_access
        counts += torch.bincount(access.indices[access.valid].flatten(), minlength=64)
    top = _reference_top_t(counts, ranking, weights)
    with torch.no_grad():
        table[top] -= LR * table.grad[top]
    return loss.item(), top


def _shared_pool(rank: int, world: int, ranking: str, grad_accum_steps: int) -> None:
    job = _shared_job(ranking)
    job.distributed.grad_accum_steps = grad_accum_steps  # the window's micro-batches select and update once
    torch.manual_seed(0)
    model = Transformer(job.model)
    reference = copy.deepcopy(model)
    for p in reference.parameters():
        p.requires_grad_(p is reference.value_tables["mem_values"].weight)
    bg = _background()
    plan = apply_method(model, job.method, bg)
    par = parallelize(model, job, plan, torch.device("cpu"))
    table = par.tables["mem_values"]
    dense0 = dense_state(par.model)
    weights = idf(bg.df["mem_values"], bg.num_batches)
    for step in range(2):
        before = table.full_weight().clone()
        ids, mask, labels = batch(world * B, step)
        ref_loss, top = _reference_step(reference, ids, mask, labels, ranking, weights)
        loss = train_step(par, *(rank_slice(t, rank, world, world * B) for t in (ids, mask, labels)), value_lr=LR)
        assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
        assert plan.selectors["mem_values"].selected.tolist() == top, "one top-t per table from both layers' counts"
        rows = table.full_weight()
        torch.testing.assert_close(rows, reference.value_tables["mem_values"].weight.detach())
        outside = torch.ones(64, dtype=torch.bool)
        outside[top] = False
        assert torch.equal(rows[outside], before[outside]), "a row outside the top-t moved"
        assert not torch.equal(rows[top], before[top])
    assert all(torch.equal(p, dense0[n]) for n, p in dense_state(par.model).items()), "a frozen dense weight moved"


@pytest.mark.multirank
@pytest.mark.parametrize("ranking,grad_accum_steps", [("tf", 1), ("tfidf", 1), ("tfidf", 2)])
def test_shared_pool_smft_equals_full_gradient_reference(ranking, grad_accum_steps):
    for world in (1, 2):
        run_ranks(_shared_pool, world, ranking, grad_accum_steps)


# ------------------------------------------------------------------------------ row optimizers
N, D, T, K = 23, 8, 6, 5  # 23 rows: uneven row-wise shards


def _rowwise_adagrad(w, g, state, lr, eps):
    """Exact row-wise Adagrad in plain torch: (new rows, new row states)."""
    state = state + (g * g).mean(1)
    return w - lr * g / (state.sqrt() + eps)[:, None], state


def _two_lookups_one_update(rank: int, world: int, optim: str) -> None:
    """Two lookups of one table (two layers), two steps: only selected rows move, once per step."""
    g = torch.Generator().manual_seed(0)
    init = torch.randn(N, D, generator=g)
    cfg = SparseOptimConfig(type=optim, eps=1e-3)
    table = ShardedValueTable("mem_values", init, cfg, LR, deferred_rows=True)
    expected, state = init.clone(), torch.zeros(N)
    mine = slice(rank * T, (rank + 1) * T)
    for step in range(2):
        before = table.full_weight().clone()
        reads = [(torch.randint(0, N, (world * T, K), generator=g), torch.rand(world * T, K, generator=g),
                  torch.rand(world * T, generator=g) > 0.2, torch.randn(world * T, D, generator=g)) for _ in range(2)]
        ref = LocalValueTable(N, D)
        ref.weight.data.copy_(expected)
        loss = sum((ref(i, w, v) * p).sum() for i, w, v, p in reads) / world  # the ranks' mean loss
        loss.backward()
        rows = torch.tensor([1, 4, 12, 13, 20])  # on both sides of the shard boundary
        out = sum((table(i[mine], w[mine], v[mine]) * p[mine]).sum() for i, w, v, p in reads)
        out.backward()
        table.update_rows(rows)
        read = torch.zeros(N, dtype=torch.bool)
        for i, _, v, _ in reads:
            read[i[v]] = True
        moved = rows[read[rows]]
        if optim == "exact_sgd":
            expected[moved] -= LR * ref.weight.grad[moved]
        else:
            expected[moved], state[moved] = _rowwise_adagrad(expected[moved], ref.weight.grad[moved], state[moved], LR, 1e-3)
        after = table.full_weight()
        torch.testing.assert_close(after, expected)
        untouched = torch.ones(N, dtype=torch.bool)
        untouched[moved] = False
        assert torch.equal(after[untouched], before[untouched]), f"step {step}: an unselected row moved"


@pytest.mark.multirank
@pytest.mark.parametrize("optim", ["exact_sgd", "exact_rowwise_adagrad"])
def test_row_optimizer_updates_selected_rows_once(optim):
    for world in (1, 2):
        run_ranks(_two_lookups_one_update, world, optim)


def test_row_optimizer_settings_without_effect_are_refused():
    from smft_dist.distributed.sharding import fused_params

    for optim in ("exact_sgd", "exact_rowwise_adagrad"):
        with pytest.raises(ConfigError, match="sparse_optim.weight_decay"):
            fused_params(SparseOptimConfig(type=optim, weight_decay=0.1), 1.0, "cpu")
    assert fused_params(SparseOptimConfig(type="exact_rowwise_adagrad", weight_decay=0.1), 1.0, "cuda")["weight_decay_mode"] == 1


def _stateful_optimizer_with_score_gradients(rank: int, world: int) -> None:
    job = _shared_job("tf")
    job.sparse_optim.type = "exact_rowwise_adagrad"
    model = Transformer(job.model)
    with pytest.raises(ConfigError, match="sparse_optim.type"):
        parallelize(model, job, apply_method(model, job.method), torch.device("cpu"))


@pytest.mark.multirank
def test_stateful_row_optimizer_with_several_memory_layers_is_refused():
    run_ranks(_stateful_optimizer_with_score_gradients, 1)


def test_adam_rows_under_sparse_methods_are_refused():
    from smft_dist.distributed.sharding import check_row_optimizer

    with pytest.raises(ConfigError, match="sparse_optim.type: FBGEMM's adam advances its bias correction"):
        check_row_optimizer(SparseOptimConfig(type="adam"), "smft", 1)
    check_row_optimizer(SparseOptimConfig(type="exact_rowwise_adagrad"), "smft", 1)
