"""Each training method moves exactly the parameters it should (single process)."""

import pytest
import torch

from smft_dist.config import MemoryConfig, MethodConfig, ModelConfig
from smft_dist.model import Transformer, lm_loss
from smft_dist.smft.background_stats import BackgroundStats
from smft_dist.smft.methods import MethodPlan, apply_method, merged_state_dict
from smft_dist.smft.selection import apply_sparse_updates

CFG = ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, memory=MemoryConfig(layers=[1], n_keys=8, topk=2, heads=2, k_dim=8))
TABLE = "value_tables.mem_values_1.bag.weight"


def _local_optimizers(model: Transformer, plan: MethodPlan, cfg: MethodConfig) -> list[torch.optim.Optimizer]:
    """Single-process stand-ins for DeepSpeed (AdamW on dense / LoRA) and the fused row optimizer
    (SGD for sparse methods, AdamW otherwise) over the local tables."""
    opts = [torch.optim.AdamW(plan.dense_params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)] if plan.dense_params else []
    values = [p for p in model.value_tables.parameters() if p.requires_grad]
    if plan.values_train and values:
        sgd = plan.name in ("smft", "memory_ft")
        opts.append(torch.optim.SGD(values, lr=cfg.value_lr) if sgd else torch.optim.AdamW(values, lr=cfg.value_lr, weight_decay=0.0))
    return opts


def _step(method: MethodConfig, background=None):
    torch.manual_seed(0)
    model = Transformer(CFG)
    plan = apply_method(model, method, background)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opts = _local_optimizers(model, plan, method)
    ids = torch.randint(0, 64, (4, 8))
    lm_loss(model(ids), ids).backward()
    apply_sparse_updates(model.value_tables, plan.selectors)
    for opt in opts:
        opt.step()
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    return model, plan, changed, before


def test_smft_trains_only_top_t_rows_with_tfidf():
    bg = BackgroundStats.empty({"mem_values_1": 64})
    bg.add_batch({"mem_values_1": torch.arange(64) % 2})  # odd slots are common in the background
    model, plan, changed, before = _step(MethodConfig(name="smft", top_t=4, background="x"), bg)
    assert changed == {TABLE}
    rows = (model.value_tables["mem_values_1"].weight != before[TABLE]).any(1)
    sel = plan.selectors["mem_values_1"]
    selected = torch.zeros(64, dtype=torch.bool)
    selected[sel.selected] = True
    assert torch.equal(rows, selected) and int(selected.sum()) == 4
    even_accessed = int((sel.slots % 2 == 0).sum())
    assert int((sel.selected % 2 == 0).sum()) == min(4, even_accessed), "rare slots rank first"


def test_memory_ft_trains_every_accessed_row_only():
    model, _, changed, before = _step(MethodConfig(name="memory_ft"))
    assert changed == {TABLE}
    access = model.memory_layers()[0].last_access
    scored = access.indices.view(4, 8, -1)[:, :-1]  # the last position predicts nothing
    accessed = torch.zeros(64, dtype=torch.bool)
    accessed[scored.flatten()] = True
    rows = (model.value_tables["mem_values_1"].weight != before[TABLE]).any(1)
    assert torch.equal(rows, accessed)


def test_full_ft_trains_everything():
    _, _, changed, before = _step(MethodConfig(name="full_ft", dense_lr=1e-3, value_lr=1e-3))
    assert changed == set(before)


def test_lora_trains_only_adapters():
    model, plan, changed, before = _step(MethodConfig(name="lora", lora_rank=2, dense_lr=1e-2))
    assert changed and all("lora_" in n for n in changed)
    assert not any("lora" in n for n in before if n.startswith("layers.1.ffn")), "memory layer has no adapters"
    assert any(n.startswith("layers.0.ffn.w3.lora_B") for n in changed)
    assert not plan.values_train


def test_tfidf_without_background_is_a_clear_error():
    with pytest.raises(ValueError, match="method.background"):
        apply_method(Transformer(CFG), MethodConfig(name="smft", ranking="tfidf"))


def test_lora_merges_into_plain_weights_for_export():
    model, _, _, _ = _step(MethodConfig(name="lora", lora_rank=2, dense_lr=1e-2))
    ids = torch.randint(0, 64, (2, 8))
    state = merged_state_dict(model)  # lora_B moved in the step, so the adapters change the output
    plain = Transformer(CFG)
    plain.load_state_dict(state, strict=True)
    torch.testing.assert_close(plain(ids), model(ids), atol=1e-5, rtol=1e-5)
    assert any("lora_" in n for n, _ in model.named_parameters()), "the trained model keeps its adapters"
