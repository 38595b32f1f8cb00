"""transformers integration: save/load round trip, generate, Auto*."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from smft_dist.config import MemoryConfig, ModelConfig, to_dict
from smft_dist.model import SMFTConfig, SMFTForCausalLM

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

