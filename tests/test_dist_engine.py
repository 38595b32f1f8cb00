"""W ranks x batch b == 1 process x batch W*b (fused and AdamW value rows); shards survive DeepSpeed;
gradient accumulation: GAS micro-batches == one batch."""

from __future__ import annotations

import os

import pytest
import torch

from smft_dist.distributed.dense import build_dense_engine
from smft_dist.distributed.parallelize import train_step
from tests.distributed_helpers import (
    B, DENSE_LR, batch, build, dense_state, rank_slice, reference_step, reference_value_optimizer, tiny_job,
)
from tests.multiproc import run_ranks


def _equivalence(
    rank: int, world: int, zero_stage: int, device_type: str, method: str = "pretrain", values: str | None = None, shared: bool = False
) -> None:
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    job = tiny_job(method, values, zero_stage=zero_stage, dtype="fp32")
    if shared:  # both blocks' memory layers read one pool
        job.model.memory.layers, job.model.memory.shared_values = [0, 1], True
    if job.sparse_optim.type == "adamw":  # AdamW's first steps are ~lr per element: keep fp32 noise small
        job.method.value_lr = job.method.dense_lr = 0.01  # the helper's dense SGD keeps DENSE_LR
        job.sparse_optim.weight_decay = 0.1 if method == "pretrain" else 0.0
    reference, par = build(job, device)
    ref_opt = reference_value_optimizer(reference, job)
    (table_name,) = par.tables
    table = par.tables[table_name]
    init_rows = reference.value_tables[table_name].weight.detach().clone()
    before = dense_state(reference)
    # deepspeed.initialize has run: this rank's shard still holds its own rows
    lo = table.row_offsets[rank] if table.placement == "row_wise" else 0
    own = slice(lo, lo + table.local_weight().shape[0])
    assert torch.equal(table.local_weight().cpu(), init_rows[own])

    for step in range(2 if ref_opt else 1):  # AdamW: the second step reads the first one's moments
        ids, mask, labels = batch(world * B, step=step)
        ref_loss = reference_step(reference, ids, mask, labels, ref_opt)
        loss = train_step(par, *(rank_slice(t, rank, world, world * B).to(device) for t in (ids, mask, labels)))
        assert loss.item() == pytest.approx(ref_loss, rel=1e-5)

    after, expected = dense_state(par.model), dense_state(reference)
    assert after.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(after[name].cpu(), expected[name], msg=name)
    moved = {n for n in expected if not torch.equal(expected[n], before[n])}
    for i in job.model.memory.layers:
        assert {f"layers.{i}.ffn.query.weight", f"layers.{i}.ffn.keys"} <= moved, "score gradients did not reach query/keys"
    new_rows = reference.value_tables[table_name].weight.detach()
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


@pytest.mark.multirank
@pytest.mark.parametrize("method, values, shared", [("pretrain", "adamw", False), ("full_ft", None, False), ("pretrain", "adamw", True)])
def test_adamw_value_rows_two_ranks_equal_one_process(method, values, shared):
    """Rows under the non-fused kernel + torch AdamW: pretraining at value_lr, full_ft with the dense
    AdamW's settings, a pool shared by two layers (one update of the summed gradient; both layers'
    score gradients read the rows of the forward); query and keys learn through the row-wise lookup."""
    run_ranks(_equivalence, 2, 0, "cpu", method, values, shared)


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
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
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


def _accumulation(rank: int, world: int, method: str, values: str | None, placement: str) -> None:
    """Two optimizer steps of 2b rows per rank: as 2 micro-batches of b (GAS=2) and as one (GAS=1)."""
    runs = {}
    for gas in (1, 2):
        _, par = build(tiny_job(method, values, grad_accum_steps=gas, table_placement=placement))
        init = dense_state(par.model), par.tables["mem_values_1"].full_weight().clone()
        losses = []
        for step in range(2):
            rows = [rank_slice(t, rank, world, world * 2 * B) for t in batch(world * 2 * B, step)]
            rows[2][0, 3:] = -100  # the first micro-batch scores fewer tokens than the second
            losses.append(train_step(par, *rows).item())
        runs[gas] = losses, dense_state(par.model), par.tables["mem_values_1"].full_weight()
    (loss1, dense1, rows1), (loss2, dense2, rows2) = runs[1], runs[2]
    assert loss2 == pytest.approx(loss1, rel=1e-5)
    for name in dense1:
        torch.testing.assert_close(dense2[name], dense1[name], msg=name)
    torch.testing.assert_close(rows2, rows1)
    assert not torch.equal(rows1, init[1]) and any(not torch.equal(p, init[0][n]) for n, p in dense1.items()), "nothing trained"


@pytest.mark.multirank
@pytest.mark.parametrize("method, values, placement", [
    ("pretrain", "adamw", "row_wise"), ("full_ft", None, "row_wise"), ("pretrain", "exact_sgd", "data_parallel"),
])
def test_gradient_accumulation_equals_one_batch(method, values, placement):
    """GAS=2 x b == GAS=1 x 2b: loss (normalized by the window's tokens; micro-batches hold different
    token counts), dense parameters and value rows (one row step per optimizer step)."""
    run_ranks(_accumulation, 2, method, values, placement)


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
