"""Slot counting, TF-IDF top-t selection, and the SMFT invariant: only top-t rows move."""

import pytest
import torch

from smft_dist.config import MemoryConfig, ModelConfig
from smft_dist.model import Transformer, lm_loss
from smft_dist.model.memory import MemoryAccess
from smft_dist.smft.background import BackgroundStats
from smft_dist.smft.selection import TopTSelector, background_log_q, idf, kl_scores, select_top_t
from smft_dist.smft.slot_counts import SlotCounter
from tests.multiproc import run_ranks


def test_tfidf_ranking_follows_the_paper_formula():
    counts = torch.tensor([4, 0, 1, 3, 2])
    df = torch.tensor([9, 0, 0, 1, 5])
    torch.testing.assert_close(idf(df, 9), torch.log(10 / (df.double() + 1)))
    # tf * idf of the accessed slots: 4/10*log(1)=0, 1/10*log(10)=.230, 3/10*log(5)=.483, 2/10*log(10/6)=.102
    order = [3, 2, 4, 0]
    for t in range(1, 5):
        assert select_top_t(counts, t, "tfidf", idf(df, 9)).nonzero().flatten().tolist() == sorted(order[:t])


def test_select_top_t_rankings_and_ties():
    counts = torch.tensor([2, 0, 2, 5, 1, 2])
    df = torch.tensor([0, 0, 0, 3, 0, 0])
    # tf: slot 3 first, then the tie 0, 2, 5 broken towards the lower index
    assert select_top_t(counts, 3, "tf").nonzero().flatten().tolist() == [0, 2, 3]
    # tfidf: slot 3 is common in the background -> ranked below the rare ties
    assert select_top_t(counts, 3, "tfidf", idf(df, 3)).nonzero().flatten().tolist() == [0, 2, 5]
    # never more than the accessed slots, never an unaccessed one
    assert select_top_t(counts, 100, "tfidf", idf(df, 3)).nonzero().flatten().tolist() == [0, 2, 3, 4, 5]
    assert select_top_t(counts, 100, "all").tolist() == (counts > 0).tolist()
    rand = select_top_t(counts, 2, "random", seed=7)
    assert int(rand.sum()) == 2 and not rand[1] and torch.equal(rand, select_top_t(counts, 2, "random", seed=7))
    with pytest.raises(ValueError, match="background"):
        select_top_t(counts, 2, "tfidf")


def test_counts_exclude_padding():
    idx = torch.tensor([[0, 1], [1, 2], [3, 3]])
    counts = SlotCounter(5).local_counts(MemoryAccess(idx, torch.tensor([True, True, False])))
    assert counts.tolist() == [1, 2, 1, 0, 0]


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
    layer = model.memory_layers()[0]
    table = model.value_tables["mem_values_1"]
    selector = TopTSelector(SlotCounter(64), t=5, ranking="tf")
    layer.trainable_selector = selector
    for p in model.parameters():
        p.requires_grad_(False)
    table.weight.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([table.weight], lr=2.0)
    ids = torch.randint(0, 64, (4, 8))
    lm_loss(model(ids), ids).backward()
    opt.step()

    chosen = selector.selected
    assert int(chosen.sum()) == 5
    moved = (table.weight != before["value_tables.mem_values_1.bag.weight"]).any(1)
    assert torch.equal(moved, chosen), "exactly the top-t rows change"
    for n, p in model.named_parameters():
        if not n.startswith("value_tables"):
            assert torch.equal(p, before[n]), f"{n} changed"


def _rank_selection(rank, world, idx, valid):
    per = idx.shape[0] // world
    sl = slice(rank * per, (rank + 1) * per)
    sel = TopTSelector(SlotCounter(32), t=6, ranking="tf")
    trainable = sel(idx[sl], valid[sl])
    return sel.counts, sel.selected, trainable


@pytest.mark.multirank
def test_every_rank_derives_the_same_top_t_as_one_process():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 32, (8, 4), generator=g)
    valid = torch.rand(8, generator=g) > 0.2
    ref = TopTSelector(SlotCounter(32), t=6, ranking="tf")
    ref_trainable = ref(idx, valid)
    results = run_ranks(_rank_selection, 2, idx, valid)
    for counts, selected, _ in results:
        assert torch.equal(counts, ref.counts)
        assert torch.equal(selected, ref.selected)
    assert torch.equal(torch.cat([r[2] for r in results]), ref_trainable)


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
        assert select_top_t(counts, t, "kl", log_q).nonzero().flatten().tolist() == sorted(order[:t])
    with pytest.raises(ValueError, match="background"):
        select_top_t(counts, 2, "kl")


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
    torch.testing.assert_close(plan.selectors[1].idf, background_log_q(torch.arange(16)))
    df_only = BackgroundStats(loaded.df, loaded.num_batches)  # a file written before counts were stored
    with pytest.raises(ConfigError, match="method.background: ranking 'kl' needs background access counts"):
        apply_method(model, MethodConfig(ranking="kl", top_t=3), df_only)
