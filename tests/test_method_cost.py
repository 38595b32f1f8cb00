"""benchmarks.method_cost runs every method through the trainer's path in its own process and reports
what each trains: smft its top-t rows and no optimizer state, full_ft every dense parameter with
AdamW's moments, lora only adapters; ratios are against full_ft measured in the same run."""

from __future__ import annotations

import pytest

from benchmarks import method_cost
from smft_dist.config import load_config
from smft_dist.data.synthetic import WorldSize, generate
from smft_dist.model.transformer import Transformer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate(out, WorldSize(people=12, background_docs=60, heldout_docs=8), seed=0, vocab_size=300)
    return out


def test_every_method_reports_what_it_trains_against_full_finetuning(world, capsys):
    overrides = [
        "model.vocab_size=320", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
        "model.memory.layers=[1]", "model.memory.n_keys=8", "model.memory.heads=2", "model.memory.topk=4",
        "model.memory.k_dim=16", f"data.tokenizer={world}/tokenizer", f"data.continual.source.path={world}/facts_new.jsonl",
        "data.continual.seq_len=24", "data.continual.batch_size=4", "method.ranking=tf", "method.top_t=5",
        "method.value_lr=0.5", "train.stream=continual",
    ]
    method_cost.main(["--config", "", "--warmup", "1", "--steps", "2", *overrides])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == set(method_cost.METHODS)
    dense = sum(p.numel() for n, p in Transformer(load_config(None, overrides).model, build_value_tables=False).named_parameters())
    # columns: method s/step tokens/s model peak step dense-trained rows/step opt-state time-ratio step-ratio
    assert rows["smft"][6:9] == ["0", "5", "0"], "smft trains its top-t rows with no dense parameters or state"
    assert rows["memory_ft"][6] == "0" and int(rows["memory_ft"][7]) > 5
    assert int(rows["full_ft"][6].replace(",", "")) == dense and rows["full_ft"][7] == "-"
    assert rows["full_ft"][9] == "1.00"
    assert 0 < int(rows["lora"][6].replace(",", "")) < dense
