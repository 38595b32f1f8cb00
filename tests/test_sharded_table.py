"""The TorchRec value table equals the local one: lookups, score gradients, fused and AdamW row updates."""

from __future__ import annotations

import pytest
import torch

from smft_dist.config import SparseOptimConfig
from smft_dist.distributed.sharding import ShardedValueTable, fused_params
from smft_dist.model.value_table import LocalValueTable, SeededRows
from tests.multiproc import run_ranks

N, D, T, K, LR = 23, 8, 6, 5, 0.5  # 23 rows: uneven row-wise shards (12 + 11)


ADAMW = SparseOptimConfig(type="adamw", beta1=0.8, beta2=0.9, weight_decay=0.1)


def _lookup_and_update(rank: int, world: int, placement: str, optim: SparseOptimConfig) -> None:
    for deferred in (False, True) if optim.type == "exact_sgd" else (False,):
        _check_lookup_and_update(rank, world, placement, deferred, optim)


def _check_lookup_and_update(rank: int, world: int, placement: str, deferred: bool, optim: SparseOptimConfig) -> None:
    """Plain: rows update in the backward (fused) or in ``step`` (torch). Deferred: the backward reaches
    only the scores; rows in ``selected`` update in ``update_rows`` by the same gradient, every other
    row stays bit-identical."""
    torch.manual_seed(0)
    ref = LocalValueTable(N, D)
    idx, w = torch.randint(0, N, (world * T, K)), torch.randn(world * T, K)
    valid = torch.rand(world * T) > 0.2
    probe = torch.randn(world * T, D)
    w_ref = w.clone().requires_grad_()
    out_ref = ref(idx, w_ref, valid)
    ((out_ref * probe).sum() / world).backward()  # the global loss: mean of the ranks' losses
    selected = torch.arange(N) % 3 != 0 if deferred else torch.ones(N, dtype=torch.bool)
    expected = ref.weight.detach().clone().requires_grad_()
    expected.grad = ref.weight.grad * selected[:, None]
    if optim.type == "adamw":  # twice: the second step reads the first one's moments
        opt = torch.optim.AdamW([expected], lr=LR, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay)
        opt.step()
        opt.step()
    else:
        torch.optim.SGD([expected], lr=LR).step()

    table = ShardedValueTable("mem_values", ref.weight.detach().clone(), optim, LR, placement, deferred_rows=deferred)
    mine = slice(rank * T, (rank + 1) * T)
    w_mine = w[mine].clone().requires_grad_()
    out = table(idx[mine], w_mine, valid[mine])
    torch.testing.assert_close(out, out_ref[mine].detach())
    (out * probe[mine]).sum().backward()
    if deferred:
        assert torch.equal(table.full_weight(), ref.weight.detach()), "a row moved before update_rows"
        table.update_rows(selected.nonzero().flatten())
    table.step()
    # Scores are rank-local: each rank gets d(its loss)/d(its scores), i.e. world x the global-mean grad.
    torch.testing.assert_close(w_mine.grad, world * w_ref.grad[mine])
    if optim.type == "adamw":  # the same gradient again: the rows' grads were cleared by the first step
        table(idx[mine], w[mine], valid[mine]).mul(probe[mine]).sum().backward()
        table.step()
    torch.testing.assert_close(table.full_weight(), expected.detach())
    if deferred:
        assert torch.equal(table.full_weight()[~selected], ref.weight.detach()[~selected])


@pytest.mark.multirank
@pytest.mark.parametrize("placement", ["row_wise", "data_parallel"])
@pytest.mark.parametrize("optim", [SparseOptimConfig(), ADAMW], ids=["exact_sgd", "adamw"])
def test_sharded_table_matches_local(placement, optim):
    for world in (1, 2):
        run_ranks(_lookup_and_update, world, placement, optim)


def _lr_schedule(rank: int, world: int) -> None:
    init = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    table = ShardedValueTable("mem_values", init, SparseOptimConfig(), 1.0)
    table.set_lr(0.25)
    table(torch.tensor([[rank]]), torch.ones(1, 1)).sum().backward()
    moved = (table.full_weight() - init)[:world]
    torch.testing.assert_close(moved, torch.full_like(moved, -0.25 / world))  # grads are a mean over ranks


@pytest.mark.multirank
def test_set_lr_applies_to_the_next_backward():
    run_ranks(_lr_schedule, 2)


def test_adam_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no adam kernel on cpu"):
        fused_params(SparseOptimConfig(type="adam"), 1e-3, "cpu")
    assert fused_params(SparseOptimConfig(type="adam"), 1e-3, "cuda")["beta2"] == 0.999


def test_seeded_rows_are_the_same_however_the_table_is_split():
    init = SeededRows(N, D, seed=3, chunk=7)  # chunks of 7 rows: ranges straddle chunk boundaries
    full = init.rows(0, N)
    assert full.shape == (N, D) and not torch.equal(full, SeededRows(N, D, seed=4, chunk=7).rows(0, N))
    for lo, hi in [(0, 1), (5, 9), (7, 14), (12, 23), (22, 23), (4, 4)]:
        assert torch.equal(init.rows(lo, hi), full[lo:hi]), (lo, hi)
    big = SeededRows(4096, 64, seed=0).rows(0, 4096)
    assert abs(big.std().item() - 64**-0.5) < 0.01


def _seeded_table(rank: int, world: int) -> torch.Tensor:
    return ShardedValueTable("mem_values", SeededRows(N, D, seed=3, chunk=7), SparseOptimConfig(), LR).full_weight()


@pytest.mark.multirank
def test_sharded_table_built_from_seeded_rows_matches_at_any_world_size():
    expected = SeededRows(N, D, seed=3, chunk=7).rows(0, N)
    for world in (1, 2):
        for full in run_ranks(_seeded_table, world):
            assert torch.equal(full, expected)
