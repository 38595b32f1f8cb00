"""python -m smft_dist.evaluate end to end, with a tiny causal LM registered with the Auto classes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from smft_dist import evaluate
from smft_dist.data import train_tokenizer
from smft_dist.eval.report import last_eval


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
         "--out", str(tmp_path / "eval"), task, f"data.cache_dir={tmp_path / 'cache'}"]
    )
    assert results["held/nll"] == pytest.approx(math.log(300))
    (line,) = (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()
    logged = json.loads(line)
    assert logged["step"] == 3 and logged["split"] == "eval" and logged["held/nll"] == pytest.approx(math.log(300))
    assert last_eval(tmp_path / "eval" / "metrics.jsonl")["held/nll"] == pytest.approx(math.log(300))
    acc = EventAccumulator(str(tmp_path / "eval" / "tensorboard"))
    acc.Reload()
    (event,) = acc.Scalars("eval/held/nll")
    assert event.step == 3 and event.value == pytest.approx(math.log(300))


@pytest.mark.parametrize("case", ["no_model_dir", "missing_task_file", "bad_override"])
def test_bad_input_is_one_line_naming_it(tmp_path, case):
    UniformLM(UniformConfig(vocab_size=300)).save_pretrained(tmp_path / "model")
    train_tokenizer(["alpha beta gamma"] * 4, 300, tmp_path / "tok")
    missing = tmp_path / "nowhere.jsonl"
    args, named = {
        "no_model_dir": (["--model", str(tmp_path / "nomodel")], "--model"),
        "missing_task_file": (["--model", str(tmp_path / "model"),
                               f"eval.tasks=[{{name: held, kind: nll, source: {{path: {missing}}}}}]"], str(missing)),
        "bad_override": (["--model", str(tmp_path / "model"), "eval.batch_size=0"], "eval.batch_size"),
    }[case]
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--tokenizer", str(tmp_path / "tok"), *args, f"data.cache_dir={tmp_path / 'cache'}"])
    message = str(e.value)
    assert message.startswith("smft_dist.evaluate: ") and named in message and "\n" not in message
