"""Slot counting (sparse exchange == dense counts), TF-IDF top-t selection, and the SMFT
invariant: only top-t rows move."""

import pytest
import torch

from smft_dist.config import MemoryConfig, ModelConfig
from smft_dist.model import Transformer, lm_loss
from smft_dist.model.memory import MemoryAccess
from smft_dist.smft.background_stats import BackgroundStats
from smft_dist.smft.selection import RowSelector, apply_sparse_updates, background_log_q, idf, kl_scores, select_top_t
from smft_dist.smft.slot_counts import SlotCounter, local_counts
from tests.multiproc import run_ranks


def _top(counts: torch.Tensor, t: int, ranking: str, weights=None, seed: int = 0) -> list[int]:
    """select_top_t over the accessed slots of a dense count vector."""
    slots = counts.nonzero().flatten()
    return select_top_t(slots, counts[slots], t, ranking, weights, seed).tolist()


def test_tfidf_ranking_follows_the_paper_formula():
    counts = torch.tensor([4, 0, 1, 3, 2])
    df = torch.tensor([9, 0, 0, 1, 5])
    torch.testing.assert_close(idf(df, 9), torch.log(10 / (df.double() + 1)))
    # tf * idf of the accessed slots: 4/10*log(1)=0, 1/10*log(10)=.230, 3/10*log(5)=.483, 2/10*log(10/6)=.102
    order = [3, 2, 4, 0]
    for t in range(1, 5):
        assert _top(counts, t, "tfidf", idf(df, 9)) == sorted(order[:t])


def test_select_top_t_rankings_and_ties():
    counts = torch.tensor([2, 0, 2, 5, 1, 2])
    df = torch.tensor([0, 0, 0, 3, 0, 0])
    # tf: slot 3 first, then the tie 0, 2, 5 broken towards the lower index
    assert _top(counts, 3, "tf") == [0, 2, 3]
    # tfidf: slot 3 is common in the background -> ranked below the rare ties
    assert _top(counts, 3, "tfidf", idf(df, 3)) == [0, 2, 5]
    # never more than the accessed slots, never an unaccessed one
    assert _top(counts, 100, "tfidf", idf(df, 3)) == [0, 2, 3, 4, 5]
    assert _top(counts, 100, "all") == [0, 2, 3, 4, 5]
    rand = _top(counts, 2, "random", seed=7)
    assert len(rand) == 2 and 1 not in rand and rand == _top(counts, 2, "random", seed=7)
    with pytest.raises(ValueError, match="background"):
        _top(counts, 2, "tfidf")


def test_counts_exclude_padding():
    idx = torch.tensor([[0, 1], [1, 2], [3, 3]])
    access = MemoryAccess(idx, torch.tensor([True, True, False]))
    assert access.slots().tolist() == [[0, 1], [1, 2], [-1, -1]]
    for reads in ([access.slots()], [idx[:2]], [access.slots(), torch.tensor([-1, -1])]):
        slots, counts = local_counts(reads)
        assert slots.tolist() == [0, 1, 2] and counts.tolist() == [1, 2, 1]
        single = SlotCounter().global_counts(reads)  # one process: the exchange is the local count
        assert torch.equal(single[0], slots) and torch.equal(single[1], counts)


def test_background_stats_round_trip(tmp_path):
    stats = BackgroundStats.empty({"mem_values_1": 4})
    stats.add_batch({"mem_values_1": torch.tensor([0, 3, 1, 0])})
    stats.add_batch({"mem_values_1": torch.tensor([2, 1, 0, 0])})
    stats.save(tmp_path / "df.safetensors")
    loaded = BackgroundStats.load(tmp_path / "df.safetensors")
    assert loaded.num_batches == 2 and loaded.df["mem_values_1"].tolist() == [1, 2, 1, 0]
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        BackgroundStats.load(tmp_path / "bad.safetensors")


def _tiny_model():
    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, memory=MemoryConfig(layers=[1], n_keys=8, topk=2, heads=2, k_dim=8))
    torch.manual_seed(0)
    return Transformer(cfg)


def test_smft_step_moves_only_top_t_rows():
    model = _tiny_model()
    table = model.value_tables["mem_values_1"]
    selector = RowSelector(t=5, ranking="tf")
    table.deferred_rows = True
    for p in model.parameters():
        p.requires_grad_(False)
    table.weight.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([table.weight], lr=2.0)
    ids = torch.randint(0, 64, (4, 8))
    lm_loss(model(ids), ids).backward()
    apply_sparse_updates(model.value_tables, {"mem_values_1": selector})
    opt.step()

    chosen = torch.zeros(64, dtype=torch.bool)
    chosen[selector.selected] = True
    assert int(chosen.sum()) == 5
    moved = (table.weight != before["value_tables.mem_values_1.bag.weight"]).any(1)
    assert torch.equal(moved, chosen), "exactly the top-t rows change"
    for n, p in model.named_parameters():
        if not n.startswith("value_tables"):
            assert torch.equal(p, before[n]), f"{n} changed"


def _reads(world: int) -> list[list[torch.Tensor]]:
    """Per rank, two lookups' slot reads over 40 slots, the same shapes on every rank: ties in the
    counts, padded tokens (-1, dropped), and a rank that reads slots no other rank reads, so the
    ranks read different numbers of entries."""
    g = torch.Generator().manual_seed(0)
    reads = []
    for r in range(world):
        idx = torch.randint(0, 12, (6, 4), generator=g) + 10 * r
        valid = torch.rand(6, generator=g) > 0.3
        extra = torch.tensor([3, 3, 7, 7, 39])
        extra[2 + 3 * r :] = -1
        reads.append([MemoryAccess(idx, valid).slots(), extra])
    return reads


def _sparse_counts(rank: int, world: int, reads: list[list[torch.Tensor]]):
    slots, counts = SlotCounter().global_counts(reads[rank])
    selected = {ranking: select_top_t(slots, counts, 4, ranking, torch.linspace(1, 2, 40).double(), seed=3)
                for ranking in ("tf", "tfidf", "random", "all")}
    return slots, counts, selected


@pytest.mark.multirank
def test_sparse_count_exchange_equals_dense_counts():
    for world in (1, 2):
        reads = _reads(world)
        dense = sum(torch.bincount(r[r >= 0], minlength=40) for rank in reads for r in rank)
        assert all(r.eq(-1).any() for rank in reads for r in rank[:1]), "every rank has padding"
        assert len(set(dense[dense > 0].tolist())) < int((dense > 0).sum()), "the counts have ties"
        results = run_ranks(_sparse_counts, world, reads)
        for slots, counts, selected in results:
            assert torch.equal(slots, dense.nonzero().flatten()) and torch.equal(counts, dense[slots])
            assert selected["tf"].tolist() == sorted(sorted(slots.tolist(), key=lambda i: (-int(dense[i]), i))[:4])
            for ranking, rows in selected.items():
                assert torch.equal(rows, results[0][2][ranking]), f"{ranking}: ranks disagree"


def test_kl_ranking_on_hand_made_numbers():
    import math

    counts = torch.tensor([4, 0, 1, 3, 2])
    background = torch.tensor([10, 0, 0, 5, 5])
    q = [(b + 1) / (20 + 5) for b in background.tolist()]  # add-one smoothing over N = 5 slots
    log_q = background_log_q(background)
    torch.testing.assert_close(log_q, torch.tensor([math.log(x) for x in q], dtype=torch.float64))
    expected = {i: c / 10 * math.log(c / 10 / q[i]) for i, c in enumerate(counts.tolist()) if c}
    accessed = counts.nonzero().flatten()
    torch.testing.assert_close(kl_scores(counts[accessed], log_q[accessed]),
                               torch.tensor([expected[i] for i in accessed.tolist()], dtype=torch.float64))
    # surprise ranks slot 2 (never in the background) first, the background's favourite slot 0 last
    order = sorted(expected, key=lambda i: -expected[i])
    assert order == [2, 3, 4, 0]
    for t in range(1, 5):
        assert select_top_t(accessed, counts[accessed], t, "kl", log_q).tolist() == sorted(order[:t])
    with pytest.raises(ValueError, match="background"):
        select_top_t(accessed, counts[accessed], 2, "kl")


def test_kl_needs_background_counts(tmp_path):
    from smft_dist.config import ConfigError, MethodConfig
    from smft_dist.smft.methods import apply_method

    model = Transformer(ModelConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2,
                                    memory=MemoryConfig(layers=[1], n_keys=4, heads=1, topk=2, k_dim=8)))
    stats = BackgroundStats.empty({"mem_values_1": 16})
    stats.add_batch({"mem_values_1": torch.arange(16)})
    stats.save(tmp_path / "bg.safetensors")
    loaded = BackgroundStats.load(tmp_path / "bg.safetensors")
    assert loaded.counts["mem_values_1"].tolist() == list(range(16))
    plan = apply_method(model, MethodConfig(ranking="kl", top_t=3), loaded)
    torch.testing.assert_close(plan.selectors["mem_values_1"].idf, background_log_q(torch.arange(16)))
    df_only = BackgroundStats(loaded.df, loaded.num_batches)  # a file written before counts were stored
    with pytest.raises(ConfigError, match="method.background: ranking 'kl' needs background access counts"):
        apply_method(model, MethodConfig(ranking="kl", top_t=3), df_only)
