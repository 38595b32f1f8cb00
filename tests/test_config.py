"""Typed config loading, overrides and validation errors that name the field."""

from pathlib import Path

import pytest
import torch

from smft_dist.config import ConfigError, JobConfig, MemoryConfig, ModelConfig, load_config
from smft_dist.model import LocalValueTable, Transformer


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  dim: 32\n  memory:\n    layers: [1]\n    n_keys: 8\n    topk: 4\n")
    cfg = load_config(path, ["model.memory.heads=2", "model.norm_eps=1e-6"])
    assert isinstance(cfg, JobConfig)
    assert (cfg.model.dim, cfg.model.memory.layers, cfg.model.memory.heads, cfg.model.norm_eps) == (32, [1], 2, 1e-6)


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["model.memory.layers=[0]", "model.memory.n_keys=8", "model.memory.topk=9"], "model.memory.topk"),
        (["model.memory.layers=[5]"], "model.memory.layers"),
        (["model.dimm=3"], "model.dimm"),
        (["model.dim=abc"], "model.dim"),
        (["model.memory.layers=[0]", "model.memory.k_dim=7"], "model.memory.k_dim"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        load_config(None, overrides)


def test_bad_model_config_fails_at_construction():
    with pytest.raises(ConfigError, match="model.memory.topk"):
        Transformer(ModelConfig(memory=MemoryConfig(layers=[0], n_keys=4, topk=5)))
    with pytest.raises(ConfigError, match="model.memory.layers"):
        Transformer(ModelConfig(n_layers=2, memory=MemoryConfig(layers=[2])))


def test_shared_pool_with_mismatched_dims_is_rejected():
    model = Transformer(ModelConfig(n_layers=3, memory=MemoryConfig(layers=[0, 2], n_keys=4, topk=2, k_dim=8, shared_values=True)))
    with pytest.raises(ValueError, match="mem_values.*v_dim=64"):
        model.bind_value_tables({"mem_values": LocalValueTable(16, 32)})
    with pytest.raises(ValueError, match="mem_values.*16"):
        model.bind_value_tables({"mem_values": LocalValueTable(15, 64)})


def test_missing_config_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)


def test_paper_config_is_the_papers_model():
    cfg = load_config(Path(__file__).parent.parent / "configs/paper_1p3b.yaml").model
    with torch.device("meta"):
        model = Transformer(cfg)
    dense = sum(p.numel() for _, p in model.dense_parameters())
    values = sum(p.numel() for p in model.value_tables.parameters())
    assert cfg.memory.num_slots == 1024**2 and values == 1024**2 * 1024
    assert 1.0e9 < dense < 1.6e9, dense


def test_selected_slot_log_only_for_smft():
    from smft_dist.config import ConfigError, load_config

    assert load_config(None, ["train.log_selected_slots=true"]).train.log_selected_slots
    with pytest.raises(ConfigError, match="^train.log_selected_slots: only smft selects slots"):
        load_config(None, ["train.log_selected_slots=true", "method.name=full_ft"])
