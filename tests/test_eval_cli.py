"""python -m smft_dist.evaluate end to end, with a tiny causal LM registered with the Auto classes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from smft_dist import evaluate
from smft_dist.data import train_tokenizer


class UniformConfig(PretrainedConfig):
    model_type = "smft_test_uniform"

    def __init__(self, vocab_size: int = 300, **kwargs):
        self.vocab_size = vocab_size
        super().__init__(**kwargs)


class UniformLM(PreTrainedModel):
    """Equal logits for every token: NLL = log(vocab)."""

    config_class = UniformConfig

    def __init__(self, config: UniformConfig):
        super().__init__(config)
        self.logit = nn.Parameter(torch.zeros(config.vocab_size))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return CausalLMOutput(logits=self.logit.expand(*input_ids.shape, -1))


def test_evaluate_cli(tmp_path):
    AutoConfig.register(UniformConfig.model_type, UniformConfig, exist_ok=True)
    AutoModelForCausalLM.register(UniformConfig, UniformLM, exist_ok=True)
    texts = ["the river is wide", "seven stones lie north", "alpha beta gamma"]
    train_tokenizer(texts * 4, 300, tmp_path / "tok")
    UniformLM(UniformConfig(vocab_size=300)).save_pretrained(tmp_path / "model")
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    task = f"eval.tasks=[{{name: held, kind: nll, seq_len: 8, source: {{path: {tmp_path / 'held.jsonl'}}}}}]"
    results = evaluate.main(
        ["--model", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"), "--step", "3",
         "--out", str(tmp_path / "eval.jsonl"), "--tensorboard", str(tmp_path / "tb"), task, f"data.cache_dir={tmp_path / 'cache'}"]
    )
    assert results["held/nll"] == pytest.approx(math.log(300))
    (line,) = (tmp_path / "eval.jsonl").read_text().splitlines()
    assert json.loads(line)["step"] == 3 and any((tmp_path / "tb").iterdir())
