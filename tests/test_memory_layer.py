"""Product-key retrieval, gradients and masking of the memory layer."""

import pytest
import torch
from torch.func import functional_call

from smft_dist.config import MemoryConfig, ModelConfig
from smft_dist.model import LocalValueTable, MemoryLayer, Transformer, lm_loss, product_key_topk


@pytest.mark.parametrize("n_keys,k,heads", [(4, 1, 1), (8, 4, 2), (16, 8, 4), (32, 32, 3)])
def test_product_key_topk_equals_exhaustive(n_keys, k, heads):
    g = torch.Generator().manual_seed(n_keys * 100 + k)
    k_dim, T = 12, 37
    query = torch.randn(T, heads, k_dim, generator=g, dtype=torch.float64)
    keys = torch.randn(heads, 2, n_keys, k_dim // 2, generator=g, dtype=torch.float64)
    scores, idx = product_key_topk(query, keys, k)

    # every full key is the concatenation of its two half-keys: key[i1 * n + i2] = [K1[i1], K2[i2]]
    full = torch.cat(
        [keys[:, 0].repeat_interleave(n_keys, dim=1), keys[:, 1].repeat(1, n_keys, 1)], dim=-1
    )  # [H, N, k_dim]
    exhaustive = torch.einsum("thd,hnd->thn", query, full)
    ref_scores, ref_idx = exhaustive.topk(k, dim=-1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(idx, ref_idx)
    assert int(idx.max()) < n_keys * n_keys


def _tiny_layer(dtype=torch.float64):
    cfg = MemoryConfig(layers=[0], n_keys=4, topk=2, heads=2, k_dim=4, v_dim=6)
    torch.manual_seed(0)
    layer = MemoryLayer(dim=5, cfg=cfg, table_name="mem_values_0")
    layer.reset_parameters()
    table = LocalValueTable(cfg.num_slots, 6)
    layer.bind_table(table)
    return layer.to(dtype), table.to(dtype)


def test_gradients_reach_every_parameter_and_match_finite_differences():
    layer, table = _tiny_layer()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    # analytic gradients reach query, keys, W1, W2 and the values
    layer(x).pow(2).sum().backward()
    for n, p in list(layer.named_parameters()) + [("values", table.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {n}"

    # finite differences over the dense parameters (query, keys, W1, W2) with the table fixed ...
    def f(*ps):
        return functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-5)

    # ... and over the value rows, with the retrieval fixed
    idx, scores = layer.retrieve(x.view(-1, 5))
    table_weight = table.weight.detach().clone().requires_grad_()

    def g(values):
        return functional_call(table, {"bag.weight": values}, (idx, scores.detach()))

    assert torch.autograd.gradcheck(g, (table_weight,), eps=1e-6, atol=1e-5)


def test_score_gradients_match_finite_differences():
    layer, table = _tiny_layer()
    x = torch.randn(6, 5, dtype=torch.float64)
    idx, scores = layer.retrieve(x)
    w = scores.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w: table(idx, w), (w,), eps=1e-6, atol=1e-5)


def test_padded_positions_produce_no_access_and_no_gradient():
    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, memory=MemoryConfig(layers=[1], n_keys=8, topk=2, heads=2, k_dim=8))
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    logits = model(ids, mask)
    access = model.memory_layers()[0].last_access
    assert access.valid.tolist() == mask.flatten().bool().tolist()

    # padded tokens read nothing: changing them leaves the valid positions' logits unchanged
    ids2 = ids.clone()
    ids2[1, 3:] = (ids2[1, 3:] + 1) % 64
    torch.testing.assert_close(model(ids2, mask)[mask.bool()], logits[mask.bool()])

    # rows accessed only by padded tokens receive no gradient
    lm_loss(logits, ids.masked_fill(mask == 0, -100)).backward()
    valid_rows = set(access.indices[access.valid].flatten().tolist())
    grad_rows = set(model.value_tables["mem_values_1"].weight.grad.abs().sum(1).nonzero().flatten().tolist())
    assert grad_rows <= valid_rows and grad_rows


def test_deferred_rows_read_frozen_and_update_only_the_given_rows():
    layer, table = _tiny_layer(torch.float32)
    x = torch.randn(7, 5)
    idx, scores = layer.retrieve(x)
    full = table(idx, scores)
    table.deferred_rows = True
    deferred = table(idx, scores.detach())
    torch.testing.assert_close(deferred, full)
    deferred.sum().backward()
    assert table.weight.grad is None, "the read carries no row gradient"
    rows = idx.flatten().unique()[::2]
    table.update_rows(rows)
    grad_rows = set(table.weight.grad.abs().sum(1).nonzero().flatten().tolist())
    assert grad_rows == set(rows.tolist()) and not table.pending


def test_shared_value_pool_is_one_table():
    cfg = ModelConfig(n_layers=3, memory=MemoryConfig(layers=[0, 2], n_keys=4, topk=2, heads=1, k_dim=8, shared_values=True))
    model = Transformer(cfg)
    assert list(model.value_tables) == ["mem_values"]
    a, b = model.memory_layers()
    assert a.table is b.table is model.value_tables["mem_values"]
    assert sum(1 for n, _ in model.named_parameters() if n.startswith("value_tables")) == 1


def test_unregistered_tables_leave_the_module_tree():
    cfg = ModelConfig(n_layers=2, memory=MemoryConfig(layers=[1], n_keys=4, topk=2, heads=1, k_dim=8))
    model = Transformer(cfg)
    tables = dict(model.value_tables)
    model.bind_value_tables(tables, register=False)
    assert not any(n.startswith("value_tables") for n, _ in model.named_parameters())
    assert model.memory_layers()[0].table is tables["mem_values_1"]
    model(torch.randint(0, 512, (1, 4)))


def test_sequences_longer_than_max_seq_len_are_refused():
    model = Transformer(ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, max_seq_len=8))
    model(torch.randint(0, 64, (1, 8)))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.randint(0, 64, (1, 9)))
