"""Retrofit of HF checkpoints: beside placement computes the original function (Llama, Qwen2 with
attention biases, Mistral), replace drops the FFN, unsupported options are refused by field, and
the CLI writes a directory ``train.init_from`` loads."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, Qwen2Config, Qwen2ForCausalLM

from smft_dist.config import ConfigError, MemoryConfig, MethodConfig
from smft_dist.model import SMFTForCausalLM, lm_loss, retrofit
from smft_dist.model.transformer import Transformer
from smft_dist.smft.methods import apply_method
from smft_dist.model.hf_retrofit import model_config

MEMORY = dict(n_keys=8, topk=4, heads=2, k_dim=16)
SHAPE = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(rope_theta=5e5, tie_word_embeddings=False)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(rope_theta=1e6, tie_word_embeddings=True)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None, head_dim=8, tie_word_embeddings=False)),
}


def tiny_hf(arch: str, path, **overrides):
    """A random tiny checkpoint of ``arch`` saved to ``path``; every weight (biases too) perturbed."""
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**SHAPE, **extra, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


def _ids_mask():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 80, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("init", ["values_zero", "w2_zero"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_beside_retrofit_computes_the_original_function(arch, init, tmp_path):
    hf = tiny_hf(arch, tmp_path / "hf")
    torch.manual_seed(0)
    model = retrofit(tmp_path / "hf", MemoryConfig(layers=[0, 2], placement="beside", **MEMORY), init).eval()
    assert len(model.model.memory_layers()) == 2 and model.model.cfg.attention_bias == (arch == "qwen2")
    ids, mask = _ids_mask()
    expected = hf(ids).logits
    torch.testing.assert_close(model(ids).logits, expected)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = hf(ids, attention_mask=mask, position_ids=positions).logits
    got = model(ids, mask).logits
    torch.testing.assert_close(got[mask.bool()], padded[mask.bool()])

    model.save_pretrained(tmp_path / "smft")
    loaded = SMFTForCausalLM.from_pretrained(tmp_path / "smft").eval()
    assert loaded.model.cfg == model.model.cfg
    assert torch.equal(loaded(ids).logits, model(ids).logits)

    with torch.no_grad():  # the memory layers are wired in: nonzero W2 and values change the output
        model.model.layers[2].memory.w2.weight.normal_()
        for table in model.model.value_tables.values():
            table.weight.normal_()
    assert not torch.allclose(model(ids).logits, expected, atol=1e-3)


def test_values_zero_gives_value_rows_a_gradient_at_once(tmp_path):
    tiny_hf("llama", tmp_path / "hf")
    calibration = torch.randint(0, 80, (3, 16), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = retrofit(tmp_path / "hf", MemoryConfig(layers=[1], placement="beside", **MEMORY), "values_zero", calibration)
    (table,) = model.model.value_tables.values()
    assert not table.weight.any() and model.model.layers[1].memory.w2.weight.any()
    ids, _ = _ids_mask()
    lm_loss(model(ids).logits, ids).backward()
    read = model.model.layers[1].memory.last_access.indices.view(*ids.shape, -1)[:, :-1].unique()  # positions with a target
    grad_norm = table.weight.grad.norm(dim=1)
    assert bool((grad_norm[read] > 0).all())  # every row read gets a gradient (w2_zero: none does)

    # W2 is sized on the calibration tokens: with reference-scale values the memory's output has the
    # scale of the FFN output beside it (the same values drawn again: equal within sampling noise)
    block, out = model.model.layers[1], {}
    block.ffn.register_forward_hook(lambda m, a, o: out.__setitem__("ffn", o))
    block.memory.register_forward_hook(lambda m, a, o: out.__setitem__("mem", o))
    with torch.no_grad():
        table.weight.normal_(std=table.weight.shape[1] ** -0.5)
        model(calibration)
    ratio = float(out["mem"].pow(2).mean().sqrt() / out["ffn"].pow(2).mean().sqrt())
    assert 0.5 < ratio < 2.0


@pytest.mark.parametrize("method", ["smft", "memory_ft"])
def test_sparse_methods_refuse_a_zero_w2_in_one_line(method, tmp_path):
    tiny_hf("llama", tmp_path / "hf")
    memory = MemoryConfig(layers=[1], placement="beside", **MEMORY)
    cfg = MethodConfig(name=method, ranking="tf")
    with pytest.raises(ConfigError, match="memory_pretrain.*--memory-init values_zero") as e:
        apply_method(retrofit(tmp_path / "hf", memory, "w2_zero").model, cfg)
    assert "\n" not in str(e.value) and "block 1" in str(e.value)
    apply_method(retrofit(tmp_path / "hf", memory, "w2_zero").model, MethodConfig(name="memory_pretrain"))  # recovery runs
    apply_method(retrofit(tmp_path / "hf", memory, "values_zero").model, cfg)
    model_cfg = retrofit(tmp_path / "hf", memory, "w2_zero").model.cfg
    with torch.device("meta"):  # benchmarks.pareto counts a run's parameters on a meta model: nothing to check
        apply_method(Transformer(model_cfg, build_value_tables=False), cfg)


def test_replace_retrofit_drops_the_ffn(tmp_path):
    hf = tiny_hf("llama", tmp_path)
    src = hf.state_dict()
    model = retrofit(tmp_path, MemoryConfig(layers=[1], placement="replace", **MEMORY)).eval()
    assert [type(b.ffn).__name__ for b in model.model.layers] == ["SwiGLU", "MemoryLayer", "SwiGLU"]
    assert model.model.layers[1].memory is None
    assert torch.equal(model.model.layers[1].attention.wq.weight, src["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(model.model.layers[2].ffn.w2.weight, src["model.layers.2.mlp.down_proj.weight"])
    plain = retrofit(tmp_path, MemoryConfig()).eval()
    ids, _ = _ids_mask()
    torch.testing.assert_close(plain(ids).logits, hf(ids).logits)


@pytest.mark.parametrize(("config", "field"), [
    (MistralConfig(**SHAPE, sliding_window=16, head_dim=8), "sliding_window"),
    (Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=16, max_window_layers=1), "sliding_window"),
    (LlamaConfig(**SHAPE, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), "rope_parameters"),
    (LlamaConfig(**SHAPE, attention_bias=True), "attention_bias"),
    (LlamaConfig(**SHAPE, mlp_bias=True), "mlp_bias"),
    (LlamaConfig(**SHAPE, hidden_act="gelu"), "hidden_act"),
    (LlamaConfig(**SHAPE, head_dim=16), "head_dim"),
    (MixtralConfig(**SHAPE), "model_type"),
])
def test_unsupported_options_are_refused_by_field(config, field):
    with pytest.raises(ConfigError, match=f"config.json: {field}="):
        model_config(config, MemoryConfig())


def test_inactive_sliding_window_is_accepted():
    assert model_config(MistralConfig(**SHAPE, sliding_window=64, head_dim=8), MemoryConfig()).max_seq_len == 64
    assert model_config(Qwen2Config(**SHAPE, sliding_window=16), MemoryConfig()).dim == 32  # use_sliding_window off


def test_cli_writes_an_init_from_directory_with_tokenizer(tmp_path, capsys):
    from smft_dist.data.tokenizer import train_tokenizer
    from smft_dist.retrofit import main
    from smft_dist.train import build_model
    from smft_dist.config import JobConfig
    from smft_dist.model.saved import saved_value_rows
    from smft_dist.model.value_table import LocalValueTable

    hf = tiny_hf("qwen2", tmp_path / "hf", vocab_size=300)
    train_tokenizer(["the cat sat on the mat", "a dog ran"] * 20, 280, tmp_path / "hf")
    (tmp_path / "calib.txt").write_text("the cat sat on the mat. a dog ran.\n" * 40)
    main(["--model", str(tmp_path / "hf"), "--layers", "1", "--out", str(tmp_path / "out"), "--calibration-text",
          str(tmp_path / "calib.txt"), "n_keys=8", "topk=4", "heads=2", "k_dim=16"])
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    job = JobConfig()
    job.method.name, job.method.top_t = "smft", 8  # values_zero (the default): SMFT can start without recovery
    job.train.init_from = str(tmp_path / "out")
    model = build_model(job).eval()  # the dense weights; each rank reads its own table rows in parallelize
    assert job.model.memory.placement == "beside" and job.model.memory.layers == [1]
    rows = saved_value_rows(job.train.init_from, "mem_values_1")
    table = LocalValueTable(*rows.shape)
    table.weight.data.copy_(rows.rows(0, rows.shape[0]))
    model.bind_value_tables({"mem_values_1": table})
    ids, _ = _ids_mask()
    torch.testing.assert_close(model(ids), hf(ids).logits)

    for bad, field in ((["--layers", "5"], "model.memory.layers"), (["--layers", "1", "topk=99"], "model.memory.topk"),
                       (["--layers", "1", "bogus=1"], "model.memory.bogus"),
                       (["--layers", "1", "--placement", "replace", "--memory-init", "w2_zero"], "--memory-init"),
                       (["--layers", "1", "--placement", "replace", "--center-queries"], "--center-queries"),
                       (["--layers", "1", "--calibration-text", str(tmp_path / "none.txt")], "--calibration-text")):
        with pytest.raises(SystemExit, match=field) as e:
            main(["--model", str(tmp_path / "hf"), "--out", str(tmp_path / "bad"), *bad])
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("init", ["values_zero", "w2_zero"])
def test_centered_queries_keep_the_function_and_center_the_reads(init, tmp_path):
    """--center-queries: the query bias is -W_q mean(x) over the calibration tokens' memory inputs
    (so the mean pre-norm query is 0 there), the logits still equal the base model's, and the
    reads differ from the uncentered retrofit's."""
    hf = tiny_hf("llama", tmp_path / "hf")
    memory = MemoryConfig(layers=[0, 2], placement="beside", **MEMORY)
    calibration = torch.randint(0, 80, (3, 16), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    plain = retrofit(tmp_path / "hf", memory, init, calibration).eval()
    torch.manual_seed(0)
    model = retrofit(tmp_path / "hf", memory, init, calibration, center_queries=True).eval()
    ids, _ = _ids_mask()
    torch.testing.assert_close(model(ids).logits, hf(ids).logits)

    inputs = {i: [] for i in range(2)}
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(model.model.memory_layers())]
    with torch.no_grad():
        model(calibration)
        for h in hooks:
            h.remove()
        for i, (layer, ref) in enumerate(zip(model.model.memory_layers(), plain.model.memory_layers())):
            assert torch.equal(layer.query.weight, ref.query.weight) and torch.equal(layer.keys, ref.keys)
            x = torch.cat(inputs[i])
            assert layer.query.bias.abs().max() > 1e-3
            torch.testing.assert_close(layer.query(x).mean(0), torch.zeros(layer.query.out_features), atol=1e-5, rtol=0)
    plain(ids)
    model(ids)
    assert any(not torch.equal(a.last_access.indices, b.last_access.indices)
               for a, b in zip(model.model.memory_layers(), plain.model.memory_layers()))

    with pytest.raises(ConfigError, match="query_bias"):
        retrofit(tmp_path / "hf", MemoryConfig(layers=[0], placement="beside", query_bias=False, **MEMORY), init, center_queries=True)
