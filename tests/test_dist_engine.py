"""W ranks x batch b == 1 process x batch W*b; shards survive DeepSpeed; gradient accumulation."""

from __future__ import annotations

import os

import pytest
import torch

from smft_dist.distributed.dense import build_dense_engine
from smft_dist.distributed.parallelize import train_step
from tests.distributed_helpers import B, DENSE_LR, build, batch, dense_state, rank_slice, reference_step, tiny_job
from tests.multiproc import run_ranks


def _equivalence(rank: int, world: int, zero_stage: int, device_type: str) -> None:
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    job = tiny_job(zero_stage=zero_stage, dtype="fp32")
    reference, par = build(job, device)
    table = par.tables["mem_values_1"]
    init_rows = reference.value_tables["mem_values_1"].weight.detach().clone()
    before = dense_state(reference)
    # deepspeed.initialize has run: this rank's shard still holds its own rows
    lo = table.row_offsets[rank] if table.placement == "row_wise" else 0
    own = slice(lo, lo + table.local_weight().shape[0])
    assert torch.equal(table.local_weight().cpu(), init_rows[own])

    ids, mask, labels = batch(world * B, step=0)
    ref_loss = reference_step(reference, ids, mask, labels)
    loss = train_step(par, *(rank_slice(t, rank, world, world * B).to(device) for t in (ids, mask, labels)))

    assert loss == pytest.approx(ref_loss, rel=1e-5)
    after, expected = dense_state(par.model), dense_state(reference)
    assert after.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(after[name].cpu(), expected[name], msg=name)
    moved = {n for n in expected if not torch.equal(expected[n], before[n])}
    assert {"layers.1.ffn.query.weight", "layers.1.ffn.keys"} <= moved, "score gradients did not reach query/keys"
    new_rows = reference.value_tables["mem_values_1"].weight.detach()
    torch.testing.assert_close(table.full_weight().cpu(), new_rows)
    assert torch.equal(table.local_weight().cpu(), table.full_weight().cpu()[own]), "shard moved after the step"
    assert not torch.equal(new_rows, init_rows)


@pytest.mark.multirank
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_two_ranks_equal_one_process(zero_stage):
    run_ranks(_equivalence, 2, zero_stage, "cpu")


@pytest.mark.multirank
def test_one_rank_equals_one_process():
    run_ranks(_equivalence, 1, 0, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")
def test_ranks_equal_one_process_nccl():
    """The same check on NCCL: 2 ranks when 2 GPUs are present, else 1 (NCCL needs a GPU per rank)."""
    run_ranks(_equivalence, min(2, torch.cuda.device_count()), 0, "cuda", backend="nccl")


def _smft(rank: int, world: int) -> None:
    reference, par = build(tiny_job("smft"))
    table = par.tables["mem_values_1"]
    init_rows, dense0 = table.full_weight().clone(), dense_state(par.model)
    ids, mask, labels = batch(world * B, step=0)
    ref_loss = reference_step(reference, ids, mask, labels)
    loss = train_step(par, *(rank_slice(t, rank, world, world * B) for t in (ids, mask, labels)))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    ids_selected = par.row_selectors["mem_values_1"].selected
    assert torch.equal(ids_selected, reference.row_selectors["mem_values_1"].selected)
    selected = torch.zeros(table.num_rows, dtype=torch.bool)
    selected[ids_selected] = True
    assert int(selected.sum()) == 6
    rows = table.full_weight()
    torch.testing.assert_close(rows, reference.value_tables["mem_values_1"].weight.detach())
    changed = (rows != init_rows).any(1)
    assert changed.any() and not (changed & ~selected).any(), "a row outside the top-t moved"
    assert torch.equal(rows[~selected], init_rows[~selected])
    assert all(torch.equal(p, dense0[n]) for n, p in dense_state(par.model).items()), "a frozen dense weight moved"


@pytest.mark.multirank
def test_smft_two_ranks_equal_one_process():
    """Global slot counts -> the same top-t on every rank; only those rows move; dense stays frozen."""
    run_ranks(_smft, 2)


def _accumulation(rank: int, world: int) -> None:
    job = tiny_job(grad_accum_steps=2)
    _, par = build(job)
    table = par.tables["mem_values_1"]
    rows0, dense0 = table.full_weight().clone(), dense_state(par.model)
    ids, mask, labels = batch(world * B, step=0)
    train_step(par, *(rank_slice(t, rank, world, world * B) for t in (ids, mask, labels)))
    # first micro-batch: the fused optimizer already moved the rows, DeepSpeed has not stepped
    rows1 = table.full_weight().clone()
    assert not torch.equal(rows1, rows0)
    assert all(torch.equal(p, dense0[n]) for n, p in dense_state(par.model).items())
    train_step(par, *(rank_slice(t, rank, world, world * B) for t in batch(world * B, step=1)))
    assert not torch.equal(table.full_weight(), rows1)
    assert any(not torch.equal(p, dense0[n]) for n, p in dense_state(par.model).items())


@pytest.mark.multirank
def test_gradient_accumulation_rows_step_every_micro_batch():
    run_ranks(_accumulation, 2)


def _clipping(rank: int, world: int) -> None:
    _, par = build(tiny_job(grad_clip=1e-3))
    dense0 = dense_state(par.model)
    train_step(par, *(rank_slice(t, rank, world, world * B) for t in batch(world * B, step=0)))
    update = torch.cat([(p - dense0[n]).flatten() for n, p in dense_state(par.model).items()])
    assert 0 < update.norm() <= DENSE_LR * 1e-3 * (1 + 1e-4)


@pytest.mark.multirank
def test_dense_gradient_clipping():
    run_ranks(_clipping, 2)


def _refuses_registered_tables(rank: int, world: int) -> None:
    job = tiny_job()
    _, par = build(job)
    par.model.bind_value_tables(par.tables, register=True)
    with pytest.raises(ValueError, match="TorchRec module"):
        build_dense_engine(par.model, torch.optim.SGD(par.model.parameters(), lr=1.0), job.distributed, torch.device("cpu"))


@pytest.mark.multirank
def test_dense_engine_refuses_sharded_tables():
    run_ranks(_refuses_registered_tables, 1)


def _compiles_nothing(rank: int, world: int, extensions_dir: str) -> None:
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir
    build(tiny_job())
    built = os.listdir(extensions_dir) if os.path.exists(extensions_dir) else []
    assert not built, f"DeepSpeed JIT-compiled {built} at run time"


@pytest.mark.multirank
def test_dense_engine_compiles_nothing_at_run_time(tmp_path):
    """No g++ build (and no lock file in a shared home directory) when a fresh node starts training."""
    run_ranks(_compiles_nothing, 2, str(tmp_path / "torch_extensions"))
