"""Each TorchRec behaviour the sharded tables rely on is pinned here, and its guard fails loudly naming it."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor
from torchrec.distributed import comm_ops

from smft_dist.config import SparseOptimConfig
from smft_dist.distributed import sharding, torchrec_guards
from smft_dist.distributed.sharding import ShardedValueTable
from smft_dist.distributed.torchrec_guards import TorchRecAssumptionError
from tests.multiproc import run_ranks


def test_gradient_division_is_on_and_its_guard_names_it(monkeypatch):
    assert comm_ops.get_gradient_division(), "gradient division: TorchRec's default changed"
    torchrec_guards.check_gradient_division()
    monkeypatch.setattr(comm_ops, "GRADIENT_DIVISION", False)
    with pytest.raises(TorchRecAssumptionError, match="gradient division"):
        torchrec_guards.check_gradient_division()


def _kjt(weights: torch.Tensor) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=["all"], values=torch.arange(len(weights)), lengths=torch.tensor([len(weights)]),
                             weights=weights)


def test_kjt_carries_swapped_weights_and_the_guard_names_a_mismatch():
    w = torch.randn(5)
    delivered = _kjt(w.clone())
    rebuilt = w.clone().requires_grad_()
    torchrec_guards.swap_weights("t", delivered, rebuilt, check=True)
    assert delivered.weights() is rebuilt, "delivered weights: KeyedJaggedTensor no longer reads _weights"
    with pytest.raises(TorchRecAssumptionError, match="delivered weights.*bucket order"):
        torchrec_guards.swap_weights("t", _kjt(w.clone()), w.flip(0), check=True)


def test_guard_names_a_kjt_that_stops_carrying_weights(monkeypatch):
    w = torch.randn(4)
    monkeypatch.setattr(KeyedJaggedTensor, "weights_or_none", lambda self: w)  # as if TorchRec kept its own copy
    with pytest.raises(TorchRecAssumptionError, match="_weights"):
        torchrec_guards.swap_weights("t", _kjt(w.clone()), w.clone().requires_grad_(), check=True)


def test_checks_run_once_per_table_or_always_when_debugging(monkeypatch):
    owner = torch.nn.Linear(1, 1)
    monkeypatch.delenv(torchrec_guards.DEBUG_ENV, raising=False)
    assert [torchrec_guards.due(owner) for _ in range(3)] == [True, False, False]
    monkeypatch.setenv(torchrec_guards.DEBUG_ENV, "1")
    assert torchrec_guards.due(owner)


def _fused_step_and_guards(rank: int, world: int) -> None:
    init = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    for optim in (SparseOptimConfig(), SparseOptimConfig(type="exact_rowwise_adagrad")):
        table = ShardedValueTable("mem_values", init, optim, 0.5)
        before = table.local_weight().clone()
        table.set_lr(0.25)
        table.ebc.fused_optimizer.step()
        assert torch.equal(table.local_weight(), before), f"lr-only step: {optim.type} moved rows without a backward"

    class Moves(torch.optim.SGD):
        def step(self, closure=None):
            with torch.no_grad():
                self.param_groups[0]["params"][0].add_(1.0)

    rows = torch.zeros(3, 4)
    with pytest.raises(TorchRecAssumptionError, match="lr-only step"):
        torchrec_guards.check_step_pushes_lr_only("t", Moves([rows], lr=1.0), rows)

    # building a table asserts gradient division (its guard is called there, not only here)
    comm_ops.GRADIENT_DIVISION, division = False, comm_ops.GRADIENT_DIVISION
    try:
        with pytest.raises(TorchRecAssumptionError, match="gradient division"):
            ShardedValueTable("mem_values", init, SparseOptimConfig(), 0.5)
    finally:
        comm_ops.GRADIENT_DIVISION = division

    # a rebuild that no longer matches TorchRec's delivery fails on the first lookup, on every rank
    table = ShardedValueTable("mem_values", init, SparseOptimConfig(), 0.5)
    sharding.sharded_weights, original = (lambda w, *a: original(w.flip(0), *a)), sharding.sharded_weights
    try:
        with pytest.raises(TorchRecAssumptionError, match="delivered weights"):
            table(torch.tensor([[0, 8, 4, 5]]), torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True))
    finally:
        sharding.sharded_weights = original


@pytest.mark.multirank
def test_fused_step_only_pushes_the_lr_and_a_wrong_rebuild_is_caught():
    run_ranks(_fused_step_and_guards, 2)
