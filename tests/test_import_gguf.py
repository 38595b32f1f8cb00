"""GGUF import: a tiny Llama written to GGUF with the ``gguf`` package (fp32 tensors, llama.cpp's
names and Q/K row order, a byte-level BPE vocabulary) comes back through ``smft_dist.import_gguf`` as
a directory whose model gives the logits of the model it was written from, and whose tokenizer
encodes as the original; the directory retrofits; an architecture the retrofit cannot represent is
refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from smft_dist.config import MemoryConfig

gguf = pytest.importorskip("gguf")

SHAPE = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
TEXT = "the cat sat on the mat. a dog ran to the park and the cat ran after it."


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for Q / K (its converter's ``permute``; transformers undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: LlamaForCausalLM, tokenizer, path, arch: str = "llama") -> None:
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t.startswith("<") and t.endswith(">") else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        for src, dst in names.items():
            w.add_tensor(f"blk.{i}.{dst}.weight", sd[p + src + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the model written, its tokenizer, the GGUF file)."""
    from smft_dist.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("gguf")
    tokenizer = train_tokenizer([TEXT] * 20, 280, root / "tok")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    write_gguf(model, tokenizer, root / "tiny.gguf")
    return model, tokenizer, root / "tiny.gguf"


def test_import_gives_the_written_models_logits_and_tokenizer(tiny, tmp_path, capsys):
    from smft_dist.import_gguf import main
    from smft_dist.model import retrofit

    model, tokenizer, path = tiny
    main(["--gguf", str(path), "--out", str(tmp_path / "out")])
    assert "2 layers, dim 32" in capsys.readouterr().out
    assert not any((tmp_path / "out").glob("*.gguf"))
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert getattr(loaded.config, "quantization_config", None) is None and loaded.config.tie_word_embeddings
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == tokenizer(TEXT, add_special_tokens=False)["input_ids"]

    torch.manual_seed(0)  # the imported directory is what retrofit reads: the same function
    mem = retrofit(tmp_path / "out", MemoryConfig(layers=[1], placement="beside", n_keys=8, topk=4, heads=2, k_dim=16)).eval()
    torch.testing.assert_close(mem(ids).logits, model(ids).logits)


def test_unrepresentable_or_missing_input_is_refused_in_one_line(tiny, tmp_path):
    from smft_dist.import_gguf import main

    model, tokenizer, _ = tiny
    biased = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    write_gguf(biased, tokenizer, tmp_path / "falcon.gguf", arch="falcon")  # an architecture retrofit has no place for
    for path, words in ((tmp_path / "falcon.gguf", "model_type"), (tmp_path / "none.gguf", "is not a file")):
        with pytest.raises(SystemExit, match=words) as e:
            main(["--gguf", str(path), "--out", str(tmp_path / "bad")])
        assert "\n" not in str(e.value)
    assert not (tmp_path / "bad").exists()
