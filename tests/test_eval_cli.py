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


def _evaluate_memory_model(rank: int, world: int, tmp_path) -> tuple[dict[str, float], list[tuple[int, int]]]:
    """evaluate on this rank; the value-table row ranges it read from the saved model."""
    from smft_dist.model.value_table import SavedRows

    read, rows = [], SavedRows.rows

    def recording(self, lo, hi):
        read.append((lo, hi))
        return rows(self, lo, hi)

    SavedRows.rows = recording
    tasks = (f"eval.tasks=[{{name: facts, kind: qa, source: {{path: {tmp_path / 'qa.jsonl'}, schema: nq_open}}}},"
             f" {{name: held, kind: nll, seq_len: 8, source: {{path: {tmp_path / 'held.jsonl'}}}}}]")
    args = evaluate.parse_args(["--model", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"), "--step", "7",
                                "--out", str(tmp_path / f"eval{world}"), tasks,
                                "eval.batch_size=2", "eval.max_new_tokens=4", f"data.cache_dir={tmp_path / 'cache'}"])
    return evaluate.evaluate(args), read


@pytest.mark.multirank
def test_evaluate_memory_model_on_two_ranks_equals_one_each_reading_its_rows(tmp_path):
    from smft_dist.config import MemoryConfig, ModelConfig, to_dict
    from smft_dist.model import SMFTConfig, SMFTForCausalLM
    from tests.multiproc import run_ranks

    texts = ["the river is wide", "seven stones lie north", "alpha beta gamma", "rome is in italy"]
    train_tokenizer(texts * 4, 300, tmp_path / "tok")
    cfg = ModelConfig(vocab_size=300, dim=16, n_layers=2, n_heads=2, max_seq_len=64,
                      memory=MemoryConfig(layers=[1], n_keys=8, heads=2, topk=4, k_dim=8))
    torch.manual_seed(0)
    SMFTForCausalLM(SMFTConfig(model=to_dict(cfg))).save_pretrained(tmp_path / "model")
    questions = [{"question": f"where is stone {i}", "answer": ["north"]} for i in range(5)]  # odd: a rank pads
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:3]))
    (one, one_read), = run_ranks(_evaluate_memory_model, 1, tmp_path)
    assert sorted(one) == ["facts/contains", "facts/count", "facts/em", "facts/f1", "held/nll", "held/ppl", "held/tokens"]
    assert sum(hi - lo for lo, hi in one_read) == 64
    two = run_ranks(_evaluate_memory_model, 2, tmp_path)
    for results, _ in two:
        assert results.keys() == one.keys()
        for key in one:
            assert results[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    (read0, read1) = (read for _, read in two)
    assert sum(hi - lo for lo, hi in read0) == sum(hi - lo for lo, hi in read1) == 32, "each rank reads its half"
    assert max(hi for _, hi in read0) <= min(lo for lo, _ in read1)
    # each question's answer, gathered from the rank that decoded it, as one process wrote it
    answers = (tmp_path / "eval1" / "answers" / "step7" / "facts.jsonl").read_text()
    assert [json.loads(x)["question"] for x in answers.splitlines()] == [q["question"] for q in questions]
    assert (tmp_path / "eval2" / "answers" / "step7" / "facts.jsonl").read_text() == answers


def test_report_over_one_run_shows_each_evaluation_and_nll_against_its_minimum(tmp_path, capsys):
    from smft_dist.eval import report

    lines = [{"split": "train", "step": 1, "loss": 3.0}, {"split": "eval", "step": 10, "held/nll": 2.0, "qa/f1": 0.1, "qa/count": 8},
             {"split": "eval", "step": 20, "held/nll": 1.0, "qa/f1": 0.4}, {"split": "eval", "step": 30, "held/nll": 1.5, "qa/f1": 0.7}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    report.main([str(path)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["step", "held/nll", "qa/f1"] and out[3].split() == ["30", "1.5000", "0.7000"]
    assert out[-1] == "held/nll: last 1.5000, minimum 1.0000 (x1.500 of it)"
    report.main([str(path), str(path)])
    assert "qa/f1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no eval results"):
        (tmp_path / "empty.jsonl").write_text(json.dumps(lines[0]) + "\n")
        report.main([str(tmp_path / "empty.jsonl")])
