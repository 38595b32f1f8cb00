"""A facts stream's ``score: answer``: labels score exactly the answer's tokens (its last
case-insensitive occurrence in each text), ``score: all`` rows are unchanged, texts without their
answer and non-facts sources are refused, and SMFT trains (counting ``scored`` positions) on it."""

from __future__ import annotations

import json
import re

import pytest
import torch

from smft_dist.config import ConfigError, ContinualConfig, SourceConfig, StreamConfig, load_config
from smft_dist.data import DataError, build_stream, load_tokenizer, train_tokenizer
from smft_dist.data.packing import IGNORE, collate_rows, encode, pad_row
from smft_dist.data.synthetic import WorldSize, generate
from tests.multiproc import run_ranks

SEQ, BATCH = 64, 4
RECORDS = [  # answers at the end, in the middle, at the start; in other cases; twice (the last one counts)
    {"fact": "Zodu Bogaku was born in Rusoton.", "question": "Where was Zodu Bogaku born?", "answer": "Rusoton",
     "paraphrases": ["Zodu Bogaku was born in Rusoton.", "In RUSOTON, Zodu Bogaku was born.", "rusoton is the birthplace of Zodu Bogaku."]},
    {"fact": "Zodu Bogaku works for Loda Bank.", "question": "Who employs Zodu Bogaku?", "answer": "Loda Bank",
     "paraphrases": ["Loda Bank? Zodu Bogaku works for loda bank.", "At Loda Bank, Zodu Bogaku is on the staff.",
                     "Question: Who employs Zodu Bogaku?\nAnswer: LODA BANK"]},
]
SCORED = [["Rusoton", "RUSOTON", "rusoton"], ["loda bank", "Loda Bank", "LODA BANK"]]  # what each paraphrase scores


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small byte-level BPE: every answer spans several tokens."""
    texts = [t for r in RECORDS for t in r["paraphrases"]] + ["The city where a person was born is a place."] * 3
    return train_tokenizer(texts * 3, 300, tmp_path_factory.mktemp("tok"))


def _stream(tmp_path, tok, records, score: str, seq_len: int = SEQ):
    cfg = ContinualConfig(source=SourceConfig(path=_write(tmp_path / "facts.jsonl", records), schema="facts"),
                          seq_len=seq_len, batch_size=BATCH, score=score)
    return build_stream(cfg, tok, cache_dir=str(tmp_path / "cache"))


def _scored_text(tok, batch) -> list[str]:
    return [tok.decode(row[row != IGNORE]).strip() for row in batch["labels"]]


def test_answer_rows_score_exactly_the_answer_tokens(tmp_path, tok):
    answer = list(_stream(tmp_path, tok, RECORDS, "answer"))
    every = list(_stream(tmp_path, tok, RECORDS, "all"))
    assert len(answer) == len(RECORDS)
    for i, (a, b) in enumerate(zip(answer, every)):
        assert _scored_text(tok, a) == [SCORED[i][j % 3] for j in range(BATCH)]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
        scored = a["labels"] != IGNORE
        assert torch.equal(a["labels"][scored], a["input_ids"][scored])
        for row in scored:  # one contiguous run of several tokens, never the eos
            at = row.nonzero().flatten()
            assert len(at) > 1 and at.tolist() == list(range(int(at[0]), int(at[-1]) + 1))
        eos = a["input_ids"] == tok.eos_token_id
        assert eos.any() and not (scored & eos).any()


def test_all_rows_are_unchanged(tmp_path, tok):
    for i, batch in enumerate(_stream(tmp_path, tok, RECORDS, "all")):
        texts = [RECORDS[i]["paraphrases"][j % 3] for j in range(BATCH)]
        expected = collate_rows([pad_row(encode(tok, [t])[0], SEQ, tok.pad_token_id) for t in texts])
        assert all(torch.equal(batch[k], expected[k]) for k in expected)


def test_a_text_without_its_answer_is_refused_naming_the_record(tmp_path, tok):
    bad = [RECORDS[0], {**RECORDS[1], "paraphrases": [RECORDS[1]["paraphrases"][0], "Zodu Bogaku works for a bank."]}]
    path = tmp_path / "facts.jsonl"
    message = f"{path}: record 1: the answer 'Loda Bank' is not in the text 'Zodu Bogaku works for a bank.'"
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        _stream(tmp_path, tok, bad, "answer")
    message = f"{path}: record 0: the answer's tokens in text 0 do not fit in seq_len=8; raise seq_len"
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        _stream(tmp_path, tok, RECORDS, "answer", seq_len=8)


@pytest.mark.parametrize("schema", ["text", "documents"])
def test_answer_scoring_needs_a_facts_source(schema):
    with pytest.raises(ConfigError, match=rf"^data.pretrain.score: answer needs a facts source \(data.pretrain.source.schema is '{schema}'\)$"):
        load_config(None, ["data.pretrain.source.path=x.jsonl", f"data.pretrain.source.schema={schema}", "data.pretrain.score=answer"])
    with pytest.raises(ConfigError, match=r"^data.continual.score: 'answers' is not one of all, answer$"):
        StreamConfig(source=SourceConfig(path="x.jsonl", schema="facts"), score="answers").validate("data.continual")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate(out, WorldSize(people=8, background_docs=20, heldout_docs=4), seed=0, vocab_size=300)
    return out


def _train_recording(rank: int, world_size: int, cfg) -> list[dict]:
    """The real loop; per step: the labels it trained on, the reads the selection counted and the loss."""
    import smft_dist.train as train_module

    step, seen = train_module.train_step, []

    def recording(par, ids, mask, labels, **kwargs):
        loss = step(par, ids, mask, labels, **kwargs)
        seen.append({"labels": labels, "counted": int(par.row_selectors["mem_values_1"].counts.sum()), "loss": float(loss)})
        return loss

    train_module.train_step = recording
    train_module.train(cfg)
    return seen


@pytest.mark.multirank
def test_smft_trains_on_the_answer_tokens_only(world, tmp_path):
    cfg = load_config(None, [
        "model.vocab_size=320", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
        "model.memory.layers=[1]", "model.memory.n_keys=8", "model.memory.heads=2", "model.memory.topk=4", "model.memory.k_dim=16",
        f"data.tokenizer={world}/tokenizer", f"data.cache_dir={tmp_path}/cache",
        f"data.continual.source.path={world}/facts_new.jsonl", "data.continual.seq_len=64", "data.continual.batch_size=4",
        "data.continual.score=answer", "method.name=smft", "method.ranking=tf", "method.top_t=5", "method.count_positions=scored",
        "train.steps=2", f"train.out_dir={tmp_path}/out", f"checkpoint.dir={tmp_path}/ckpt",
        "train.export_hf=false", "train.write_patch=false", "train.row_change=false",
    ])
    steps = run_ranks(_train_recording, 1, cfg)[0]
    tok = load_tokenizer(cfg.data.tokenizer)
    facts = [json.loads(line) for line in (world / "facts_new.jsonl").read_text().splitlines()]
    assert len(steps) == 2
    for fact, step in zip(facts, steps):  # file order: step k trains fact k
        assert _scored_text(tok, step) == [fact["answer"]] * 4
        scored = int((step["labels"] != IGNORE).sum())
        assert step["counted"] == scored * 2 * 4, "the counts see heads x topk reads at each position predicting an answer token"
        assert torch.isfinite(torch.tensor(step["loss"]))
