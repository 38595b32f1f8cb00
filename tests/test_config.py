"""Typed config loading, overrides and validation errors that name the field."""

from pathlib import Path

import pytest
import torch

from smft_dist.config import ConfigError, JobConfig, MemoryConfig, ModelConfig, load_config
from smft_dist.model import LocalValueTable, Transformer


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  dim: 32\n  memory:\n    layers: [1]\n    n_keys: 8\n    topk: 4\nmethod:\n  top_t: 64\n")
    cfg = load_config(path, ["model.memory.heads=2", "model.norm_eps=1e-6"])
    assert isinstance(cfg, JobConfig)
    assert (cfg.model.dim, cfg.model.memory.layers, cfg.model.memory.heads, cfg.model.norm_eps) == (32, [1], 2, 1e-6)


def test_overrides_address_list_items_by_index_or_name(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("eval:\n  tasks:\n    - {name: a, kind: qa, source: {path: x.jsonl, max_examples: 4}}\n"
                    "    - {name: b, kind: nll, source: {path: y.jsonl}}\n")
    cfg = load_config(path, ["eval.tasks.a.source.max_examples=16", "eval.tasks.1.source.path=z.jsonl"])
    assert (cfg.eval.tasks[0].source.max_examples, cfg.eval.tasks[1].source.path) == (16, "z.jsonl")
    for bad in ("eval.tasks.c.source.path=w", "eval.tasks.2.source.path=w", "eval.tasks.a.source.path.x=1"):
        with pytest.raises(ConfigError, match=f"^{bad.partition('=')[0]}"):
            load_config(path, [bad])


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["model.memory.layers=[0]", "model.memory.n_keys=8", "model.memory.topk=9"], "model.memory.topk"),
        (["model.memory.layers=[5]"], "model.memory.layers"),
        (["model.dimm=3"], "model.dimm"),
        (["model.dim=abc"], "model.dim"),
        (["model.memory.layers=[0]", "model.memory.k_dim=7"], "model.memory.k_dim"),
        (["model.memory.layers=[0]", "model.memory.n_keys=46341"], "model.memory.n_keys"),
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


@pytest.mark.parametrize("path", sorted([*Path(__file__).parent.parent.glob("configs/*.yaml"), *Path(__file__).parent.parent.glob("examples/*/*.yaml")]),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)


@pytest.mark.parametrize("grid", sorted(Path(__file__).parent.parent.glob("benchmarks/grids/*.yaml")), ids=lambda p: p.name)
@pytest.mark.parametrize("quick", [False, True])
def test_every_point_of_a_shipped_grid_is_a_valid_config(grid, quick):
    from benchmarks.pareto import expand, load_grid, train_args

    spec = load_grid(grid, quick)
    runs = expand(spec)
    assert runs and len({r.key for r in runs}) == len(runs)
    for run in runs:  # the overrides a sweep passes to smft_dist.train, validated as the trainer would
        args = train_args(spec, run, Path("/tmp/unused"))
        cfg = load_config(spec.config, args[2:])
        assert cfg.method.name in run.method and cfg.data.seed == run.seed


def test_paper_config_is_the_papers_model():
    cfg = load_config(Path(__file__).parent.parent / "configs/paper_1p3b.yaml").model
    with torch.device("meta"):
        model = Transformer(cfg)
    dense = sum(p.numel() for _, p in model.dense_parameters())
    values = sum(p.numel() for p in model.value_tables.parameters())
    assert cfg.memory.num_slots == 1024**2 and values == 1024**2 * 1024
    assert 1.0e9 < dense < 1.6e9, dense


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["method.name=full_ft"], "sparse_optim.type: full_ft trains value rows with AdamW"),
        (["method.name=full_ft", "sparse_optim.type=adamw", "sparse_optim.weight_decay=0.1"], "sparse_optim.weight_decay"),
        (["method.name=smft", "sparse_optim.type=adamw"], "sparse_optim.type: adamw steps every row"),
        (["method.name=lora", "sparse_optim.type=adamw"], "sparse_optim.type: adamw steps every row"),
        (["method.name=pretrain", "distributed.grad_accum_steps=2"], "distributed.grad_accum_steps: the fused"),
        (["method.name=pretrain", "sparse_optim.type=exact_rowwise_adagrad", "distributed.table_placement=data_parallel"],
         "sparse_optim.type: replicated tables"),
        (["method.name=pretrain", "model.memory.layers=[0,1]", "model.memory.shared_values=true"], "model.memory.shared_values"),
    ],
)
def test_value_optimizers_that_would_train_something_else_are_refused(overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.name=full_ft", "sparse_optim.type=adamw", "distributed.grad_accum_steps=2"],
        ["method.name=pretrain", "sparse_optim.type=adamw", "distributed.grad_accum_steps=2",
         "model.memory.layers=[0,1]", "model.memory.shared_values=true"],
        ["method.name=pretrain", "distributed.table_placement=data_parallel", "distributed.grad_accum_steps=2"],
        ["method.name=lora", "distributed.grad_accum_steps=2"],  # rows frozen: the fused kernel runs at lr 0
    ],
)
def test_exact_value_optimizer_combinations_load(overrides):
    load_config(None, overrides)


@pytest.mark.parametrize(
    "name, seq_len, top_t, layers",
    [("paper_smft_facts", 64, 500, [12]), ("paper_smft_documents", 512, 10_000, [12]),
     ("paper_smft_facts_memory_plus", 64, 500, [4, 12, 20])],
)
def test_paper_smft_configs_are_the_papers_runs(name, seq_len, top_t, layers):
    configs = Path(__file__).parent.parent / "configs"
    cfg, base = load_config(configs / f"{name}.yaml"), load_config(configs / "paper_1p3b.yaml").model
    m, c = cfg.method, cfg.data.continual
    assert (m.name, m.ranking, m.top_t, m.value_lr, cfg.sparse_optim.type) == ("smft", "tfidf", top_t, 2.0, "exact_sgd")
    assert (c.batch_size, c.seq_len, c.pack, c.shuffle) == (64, seq_len, False, False)
    assert cfg.model.memory.layers == layers and cfg.model.memory.shared_values == (len(layers) > 1)
    same = {f: getattr(base, f) for f in ("vocab_size", "dim", "n_layers", "n_heads", "tie_embeddings")}
    assert {f: getattr(cfg.model, f) for f in same} == same
    assert (cfg.model.memory.num_slots, cfg.model.value_dim) == (base.memory.num_slots, base.value_dim)
    for task in cfg.eval.tasks:  # every evaluation source is a local file or one of the hub formats
        assert task.source.schema in ("facts", "nq_open", "hellaswag", "gsm8k", "simpleqa"), task.name


def test_selected_slot_log_only_for_smft():
    from smft_dist.config import ConfigError, load_config

    assert load_config(None, ["train.log_selected_slots=true"]).train.log_selected_slots
    with pytest.raises(ConfigError, match="^train.log_selected_slots: only smft selects slots"):
        load_config(None, ["train.log_selected_slots=true", "method.name=full_ft"])
