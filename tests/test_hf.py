"""transformers integration: save/load round trip, generate, Auto*, Llama import."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from smft_dist.config import MemoryConfig, ModelConfig, to_dict
from smft_dist.model import SMFTConfig, SMFTForCausalLM, from_llama

TINY = ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, memory=MemoryConfig(layers=[1], n_keys=8, topk=4, heads=2, k_dim=16))


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    for tie in (False, True):
        cfg = ModelConfig(**{**to_dict(TINY), "memory": TINY.memory, "tie_embeddings": tie})
        model = SMFTForCausalLM(SMFTConfig(model=to_dict(cfg))).eval()
        model.save_pretrained(tmp_path / str(tie))
        assert AutoConfig.from_pretrained(tmp_path / str(tie)).model_type == "smft_memory"
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / str(tie)).eval()
        assert isinstance(loaded, SMFTForCausalLM)
        ids = torch.randint(0, 96, (2, 9))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0  # left padding
        assert torch.equal(model(ids, mask).logits, loaded(ids, mask).logits)
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_generate_is_greedy_argmax():
    torch.manual_seed(0)
    model = SMFTForCausalLM(SMFTConfig(model=to_dict(TINY))).eval()
    ids = torch.randint(0, 96, (1, 5))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9) and torch.equal(out[:, :5], ids)
    step = ids
    for _ in range(4):
        step = torch.cat([step, model(step).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, step)


def test_from_llama_copies_weights_and_swaps_ffn(tmp_path):
    torch.manual_seed(0)
    lc = LlamaConfig(
        vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    llama = LlamaForCausalLM(lc).eval()
    llama.save_pretrained(tmp_path)
    ids = torch.randint(0, 80, (2, 11))

    plain = from_llama(tmp_path, MemoryConfig()).eval()
    torch.testing.assert_close(plain(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)

    mem = from_llama(tmp_path, MemoryConfig(layers=[1], n_keys=8, topk=4, heads=2, k_dim=16)).eval()
    assert len(mem.model.memory_layers()) == 1
    src = llama.state_dict()
    assert torch.equal(mem.model.layers[1].attention.wq.weight, src["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(mem.model.layers[2].ffn.w2.weight, src["model.layers.2.mlp.down_proj.weight"])
    assert mem(ids).logits.shape == (2, 11, 80)
