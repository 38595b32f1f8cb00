"""SMFT's selection options: counting only scored positions (method.count_positions) and the per-row
share cap (method.row_share_cap). Exact against counts and top-t's computed by hand, on 1 and 2 ranks;
rows outside the top-t bit-identical; share counts identical on every rank and restored on resume."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from smft_dist.config import CheckpointConfig, ConfigError, JobConfig, MethodConfig
from smft_dist.distributed import checkpoint as ckpt
from smft_dist.distributed.parallelize import train_step
from smft_dist.smft.selection import mark_counted_positions, select_top_t
from smft_dist.smft.slot_counts import count_scored
from tests.distributed_helpers import B, batch, build, rank_slice, reference_step, tiny_job
from tests.multiproc import run_ranks

TABLE = "mem_values_1"


def test_count_scored_marks_positions_whose_next_token_is_scored():
    labels = torch.tensor([[5, 6, 7, -100, -100],     # padding after 3 real tokens
                           [-100, -100, 8, 9, 4]])    # answer-only: the prompt is not scored
    assert count_scored(labels).tolist() == [[True, True, False, False, False],
                                             [False, True, True, True, False]]


def test_select_top_t_ranks_out_ineligible_slots_only():
    slots, counts = torch.tensor([1, 4, 6, 9]), torch.tensor([5, 3, 3, 1])
    assert select_top_t(slots, counts, 2, "tf").tolist() == [1, 4]
    eligible = torch.tensor([False, True, True, True])
    assert select_top_t(slots, counts, 2, "tf", eligible=eligible).tolist() == [4, 6]  # the next ones move up
    assert select_top_t(slots, counts, 9, "tf", eligible=eligible).tolist() == [4, 6, 9]  # fewer than t left
    assert select_top_t(slots, counts, 2, "all", eligible=eligible).tolist() == [4, 6, 9]
    # kl scores see every count (p is the whole step's), the cap only removes candidates
    log_q = torch.log(torch.full((10,), 0.1, dtype=torch.float64))
    full = select_top_t(slots, counts, 4, "kl", log_q).tolist()
    assert select_top_t(slots, counts, 3, "kl", log_q, eligible=eligible).tolist() == [s for s in full if s != 1]


@pytest.mark.parametrize("override, message", [
    (dict(count_positions="answers"), "method.count_positions: 'answers' is not one of all, scored"),
    (dict(row_share_cap=-1), "method.row_share_cap: must be >= 0"),
    (dict(name="memory_ft", count_positions="scored"), "method.count_positions: only smft selects rows"),
    (dict(name="memory_ft", row_share_cap=2), "method.row_share_cap: only smft selects rows"),
])
def test_options_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        MethodConfig(**override).validate()
    MethodConfig(name="memory_ft", row_share_cap=0).validate()  # 0: off


def _job(ranking: str = "tf", **method) -> JobConfig:
    job = tiny_job("smft")
    job.method.ranking = ranking
    for k, v in method.items():
        setattr(job.method, k, v)
    job.validate()
    return job


def _answer_only(labels: torch.Tensor) -> torch.Tensor:
    """The first 3 tokens of every row unscored, as a prompt under an answer-only loss."""
    labels = labels.clone()
    labels[:, :3] = -100
    return labels


def _hand_counts(reference, ids, mask, positions: torch.Tensor) -> Counter:
    """Reads of the reference (whole batch, one process) at ``positions`` [B, S], by Python counting."""
    with torch.no_grad():
        reference(ids, mask)
    access = reference.memory_layers()[0].last_access
    counted = positions.flatten() & access.valid
    return Counter(access.indices[counted].flatten().tolist())


def _hand_top(counts: Counter, t: int, eligible=lambda slot: True) -> list[int]:
    """tf top-t: most reads first, the lower slot on ties."""
    return sorted(sorted((s for s in counts if eligible(s)), key=lambda s: (-counts[s], s))[:t])


def _scored_counting(rank: int, world: int) -> None:
    job = _job(count_positions="scored")
    reference, par = build(job)
    table = par.tables[TABLE]
    init_rows = table.full_weight().clone()
    ids, mask, labels = batch(world * B, step=1)
    labels = _answer_only(labels)
    scored = _hand_counts(reference, ids, mask, count_scored(labels))
    every = _hand_counts(reference, ids, mask, torch.ones_like(labels, dtype=torch.bool))
    assert _hand_top(scored, 6) != _hand_top(every, 6), "the batch does not tell the two countings apart"

    mark_counted_positions(reference.value_tables, reference.row_selectors, labels)
    reference_step(reference, ids, mask, labels)
    train_step(par, *(rank_slice(t, rank, world, world * B) for t in (ids, mask, labels)))
    selector = par.row_selectors[TABLE]
    assert dict(zip(selector.slots.tolist(), selector.counts.tolist())) == dict(scored), "global counts"
    assert selector.selected.tolist() == _hand_top(scored, 6)
    assert torch.equal(selector.selected, reference.row_selectors[TABLE].selected)
    rows = table.full_weight()
    torch.testing.assert_close(rows, reference.value_tables[TABLE].weight.detach())
    outside = torch.ones(table.num_rows, dtype=torch.bool)
    outside[selector.selected] = False
    assert torch.equal(rows[outside], init_rows[outside]), "a row outside the top-t moved"
    assert not torch.equal(rows[~outside], init_rows[~outside]), "nothing trained"


@pytest.mark.multirank
@pytest.mark.parametrize("world", [1, 2])
def test_scored_positions_counting_is_exact(world):
    """Counts over the scored positions only equal a hand count of the whole batch's reads there;
    the top-t follows them, on every rank; rows outside it stay bit-identical."""
    run_ranks(_scored_counting, world)


def _steps(par, rank: int, world: int, start: int, stop: int) -> list[float]:
    return [train_step(par, *(rank_slice(t, rank, world, world * B) for t in batch(world * B, step))).item()
            for step in range(start, stop)]


def _share_cap(rank: int, world: int, root: str) -> dict:
    job = _job(row_share_cap=1)
    reference, par = build(job)
    table, selector = par.tables[TABLE], par.row_selectors[TABLE]
    shares: Counter = Counter()  # by hand: steps that trained each row
    ranked_out = 0
    for step in range(4):
        if step == 2:
            ckpt.save_checkpoint(par, CheckpointConfig(dir=root, keep_last=1), step=2, model_cfg=job.model)
        before = table.full_weight().clone()
        ids, mask, labels = batch(world * B, step)
        reference_step(reference, ids, mask, labels)
        train_step(par, *(rank_slice(t, rank, world, world * B) for t in (ids, mask, labels)))
        counts = Counter(dict(zip(selector.slots.tolist(), selector.counts.tolist())))
        expected = _hand_top(counts, 6, eligible=lambda s: shares[s] < 1)
        assert selector.selected.tolist() == expected, f"step {step}"
        assert torch.equal(selector.selected, reference.row_selectors[TABLE].selected)
        at_cap = sum(shares[s] >= 1 for s in counts)  # read this step, trained in an earlier one
        assert selector.ranked_out == at_cap
        ranked_out += at_cap
        shares.update(expected)
        rows = table.full_weight()
        torch.testing.assert_close(rows, reference.value_tables[TABLE].weight.detach())
        outside = torch.ones(table.num_rows, dtype=torch.bool)
        outside[selector.selected] = False
        assert torch.equal(rows[outside], before[outside]), "a row outside the top-t moved"
    assert ranked_out > 0, "the cap never ranked a row out"
    assert {s: n for s, n in enumerate(selector.shares.tolist()) if n} == dict(shares)
    assert max(shares.values()) == 1

    _, resumed = build(job)  # a fresh model resumes at step 2 and runs the same two steps
    assert ckpt.load_checkpoint(resumed, root)["step"] == 2
    _steps(resumed, rank, world, 2, 4)
    assert torch.equal(resumed.row_selectors[TABLE].shares, selector.shares)
    assert torch.equal(resumed.tables[TABLE].full_weight(), table.full_weight())

    _, uncapped = build(_job())
    ckpt.save_checkpoint(uncapped, CheckpointConfig(dir=root + "/uncapped"), step=1, model_cfg=job.model)
    with pytest.raises(ckpt.CheckpointError, match="no row share counts"):
        ckpt.load_checkpoint(build(job)[1], root + "/uncapped")
    return selector.shares


@pytest.mark.multirank
def test_row_share_cap_ranks_out_rows_and_resumes(tmp_path):
    """A row trained once (cap 1) is never selected again: each step's top-t equals a hand top-t over
    the rows still under the cap, on both ranks and a one-process reference; rows outside it stay
    bit-identical; the share counts are the same on every rank, and a resumed run equals the
    uninterrupted one (shares restored); resuming a capped run from an uncapped checkpoint is refused."""
    shares = run_ranks(_share_cap, 2, str(tmp_path))
    assert torch.equal(shares[0], shares[1])


def test_row_change_figures_by_hand():
    from smft_dist.analysis.row_change import change_by_sharing, histogram, summarize

    norms = torch.tensor([0.0, 3.0, 4.0, 0.0, 1.0, 0.5])  # squared: 9, 16, 1, 0.25 of 26.25
    s = summarize(norms)
    assert (s["rows"], s["rows_changed"], s["rows_for_half"], s["rows_for_90pct"]) == (6, 4, 1, 2)
    assert s["norm"] == pytest.approx(26.25 ** 0.5)
    assert s["top1pct_share"] == s["top10pct_share"] == pytest.approx(16 / 26.25)  # at least one row
    # Gini of (0.5, 1, 3, 4): sum |xi - xj| / (2 n^2 mean)
    x = torch.tensor([0.5, 1, 3, 4], dtype=torch.float64)
    assert s["gini"] == pytest.approx(float((x[:, None] - x[None]).abs().sum() / (2 * 16 * x.mean())))
    hist = histogram(norms)
    assert [(b["log10_lo"], b["rows"]) for b in hist] == [(-0.5, 1), (0.0, 1), (0.25, 1), (0.5, 1)]
    assert sum(b["norm_sq_share"] for b in hist) == pytest.approx(1.0)
    split = change_by_sharing(norms, {1: 1, 2: 3, 4: 2, 5: 8})
    assert [(b["trained_by"], b["rows"], b["rows_changed"]) for b in split] == [
        ("0", 2, 0), ("1", 1, 1), ("2", 1, 1), ("3-4", 1, 1), ("5-8", 1, 1)]
    assert [b["norm_sq_share"] for b in split] == pytest.approx([0, 9 / 26.25, 1 / 26.25, 16 / 26.25, 0.25 / 26.25])
