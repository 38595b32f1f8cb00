"""The retrofit example (examples/retrofit/): its helpers (the user's Llama config maps back to the same
model through the retrofit, the QA line is added once), and run.sh end to end: every stage runs,
recovery leaves every weight of the user's model as it was, and SMFT learns the new facts."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smft_dist.config import ConfigError, EvalConfig, MemoryConfig, load_config
from smft_dist.model.hf_retrofit import _LAYER_MAP, model_config

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "retrofit_example"


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "retrofit" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_user_model_config_comes_back_through_the_retrofit():
    cfg = load_config(ROOT / "examples" / "retrofit" / "user_model.yaml").model
    memory = MemoryConfig(layers=[2], placement="beside")
    back = model_config(example("user_model").llama_config(cfg), memory)
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "kv_heads", "hidden_dim", "norm_eps", "rope_theta",
                 "attention_bias", "max_seq_len", "tie_embeddings"):
        assert getattr(back, name) == getattr(cfg, name), name
    cfg.memory = memory
    with pytest.raises(ConfigError, match="model.memory.layers"):
        example("user_model").llama_config(cfg)


def test_qa_form_adds_the_eval_prompts_qa_line_once(tmp_path):
    path = tmp_path / "facts.jsonl"
    facts = [{"fact": "Q? A.", "paraphrases": ["Note: Q? A."], "question": "Q?", "answer": "A", "source": {}}]
    path.write_text("".join(json.dumps(f) + "\n" for f in facts))
    for _ in range(2):
        example("qa_form").main(str(path))
    (line,) = [json.loads(x) for x in path.read_text().splitlines()]
    qa = EvalConfig.qa_prompt.format(question="Q?") + " A"
    assert line["paraphrases"] == ["Note: Q? A.", qa] and qa == "Question: Q?\nAnswer: A"


def last_eval(path: Path) -> dict[str, float]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("split") == "eval"][-1]


@pytest.mark.slow
def test_retrofit_example_runs_end_to_end_and_learns():
    proc = subprocess.run(["bash", "examples/retrofit/run.sh"], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recovery: the user's model" in proc.stdout and "new_facts/f1" in proc.stdout
    user, recovered, after = (last_eval(OUT / d / "metrics.jsonl") for d in ("eval_user", "recovery", "smft"))
    assert user["known_facts/f1"] > 0.2  # the user's model knows facts, so forgetting can be measured
    assert after["new_facts/f1"] >= recovered["new_facts/f1"] + 0.1  # SMFT learned the new facts
    assert {"known_facts/f1", "heldout/nll"} <= after.keys()
    # recovery trained only the memory: every weight of the user's Llama is bit-identical in the recovered model
    llama = load_file(OUT / "user" / "model.safetensors")
    recovered_weights = load_file(OUT / "recovery" / "hf" / "model.safetensors")
    names = {"model.embed_tokens.weight": "model.tok_embeddings.weight", "model.norm.weight": "model.norm.weight",
             "lm_head.weight": "model.output.weight"}
    for i in range(4):
        names.update({f"model.layers.{i}.{src}.weight": f"model.layers.{i}.{dst}.weight" for src, dst in _LAYER_MAP.items()})
    assert set(names) == set(llama)
    for src, dst in names.items():
        assert torch.equal(recovered_weights[dst], llama[src]), dst
    assert recovered_weights["model.layers.2.memory.w2.weight"].abs().sum() > 0  # the memory grew out of its zero output
