"""Trimming right padding before the forward is exact: a trimmed step equals the padded batch's
reference step (loss, dense update, smft's top-t and rows) on 1 and 2 ranks, every rank trimming to
the longest real row of any rank; unpadded, left-padded and unmasked batches keep every column."""

from __future__ import annotations

import pytest
import torch

from smft_dist.distributed.parallelize import Parallel, train_step, trim_padding
from tests.distributed_helpers import B, S, build, dense_state, rank_slice, reference_step, tiny_job
from tests.multiproc import run_ranks

LENGTHS = (3, 5, 2, 4)  # real tokens per row: on 2 ranks the first holds the longest (5), the second 4


def padded_batch(lengths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of S tokens right-padded to ``lengths``; labels -100 on padding."""
    ids = torch.randint(0, 64, (len(lengths), S), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(S) < torch.tensor(lengths)[:, None]).long()
    return ids, mask, ids.masked_fill(mask == 0, -100)


def record_shapes(par: Parallel) -> list[tuple[int, ...]]:
    """The input shape of every forward of ``par.model`` from now on."""
    shapes: list[tuple[int, ...]] = []
    par.model.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    return shapes


def _trimmed_step(rank: int, world: int, method: str, grad_accum_steps: int) -> None:
    reference, par = build(tiny_job(method, grad_accum_steps=grad_accum_steps))
    table = par.tables["mem_values_1"]
    rows0, dense0 = table.full_weight().clone(), dense_state(par.model)
    ids, mask, labels = padded_batch(LENGTHS[: world * B])
    mine = [rank_slice(t, rank, world, world * B) for t in (ids, mask, labels)]
    longest = max(LENGTHS[: world * B])
    assert trim_padding(*mine)[0].shape == (B, longest), "not trimmed to the longest real row of any rank"
    shapes = record_shapes(par)

    ref_loss = reference_step(reference, ids, mask, labels)  # one process, whole padded batch
    loss = train_step(par, *mine)
    assert shapes == [(B // grad_accum_steps, longest)] * grad_accum_steps
    torch.testing.assert_close(loss, torch.tensor(ref_loss))
    rows = table.full_weight()
    torch.testing.assert_close(rows, reference.value_tables["mem_values_1"].weight.detach())
    dense, expected = dense_state(par.model), dense_state(reference)
    for name in expected:
        torch.testing.assert_close(dense[name], expected[name], msg=name)
    if method == "smft":
        selected = par.row_selectors["mem_values_1"].selected
        assert torch.equal(selected, reference.row_selectors["mem_values_1"].selected)
        outside = torch.ones(table.num_rows, dtype=torch.bool)
        outside[selected] = False
        assert torch.equal(rows[outside], rows0[outside]), "a row outside the top-t moved"
        assert all(torch.equal(p, dense0[n]) for n, p in dense.items()), "a frozen dense weight moved"
    else:
        assert any(not torch.equal(p, dense0[n]) for n, p in dense.items()), "no dense weight trained"
    assert not torch.equal(rows, rows0), "no value row trained"


@pytest.mark.multirank
@pytest.mark.parametrize("method", ["pretrain", "smft"])
def test_trimmed_step_equals_padded_batch(method):
    """One rank: the step runs 5 of 8 columns; loss, dense update (SGD: the gradients), smft's top-t
    and the value rows equal a plain step on the padded batch."""
    run_ranks(_trimmed_step, 1, method, 1)


@pytest.mark.multirank
@pytest.mark.parametrize("method, grad_accum_steps", [("pretrain", 1), ("smft", 2)])
def test_ranks_trim_to_the_longest_row_of_any_rank(method, grad_accum_steps):
    """Two ranks whose longest rows differ (5, 4) both run 5 columns (TorchRec's row-wise lookup needs
    one shape), as does every micro-batch of a window, and equal one process on the whole batch."""
    run_ranks(_trimmed_step, 2, method, grad_accum_steps)


def _keeps_real_columns(rank: int, world: int) -> None:
    ids, mask, labels = padded_batch(LENGTHS[:B])
    full = mask.clone()
    full[0] = 1  # one row without padding
    scored = labels.clone()
    scored[0, -1] = ids[0, -1]  # a masked last column whose label is scored
    left = mask.flip(1)  # left padding: the last column is real
    kept = {"unpadded row": (full, ids.masked_fill(full == 0, -100)), "scored label": (mask, scored),
            "left padding": (left, ids.masked_fill(left == 0, -100))}
    for case, (m, lab) in kept.items():
        assert all(torch.equal(t, u) for t, u in zip(trim_padding(ids, m, lab), (ids, m, lab))), case

    reference, par = build(tiny_job())
    shapes = record_shapes(par)
    for m, lab in (kept["unpadded row"], (None, labels)):  # unmasked: every token is real
        ref_loss = reference_step(reference, ids, m, lab)
        torch.testing.assert_close(train_step(par, ids, m, lab), torch.tensor(ref_loss))
    assert shapes == [(B, S)] * 2
    dense = dense_state(par.model)
    for name, p in dense_state(reference).items():
        torch.testing.assert_close(dense[name], p, msg=name)


@pytest.mark.multirank
def test_unpadded_left_padded_and_unmasked_batches_keep_every_column():
    """No column is dropped from a batch with one unpadded row, a masked column with a scored label,
    left padding, or no mask; steps on them equal the plain step."""
    run_ranks(_keeps_real_columns, 1)
