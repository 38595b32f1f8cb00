"""Packing / padding preserve tokens; streams resume exactly and shard disjointly over ranks."""

from __future__ import annotations

import json
import random

import datasets
import pytest
import torch

from smft_dist.config import ContinualConfig, SourceConfig, StreamConfig
from smft_dist.data import build_stream, load_records, train_tokenizer
from smft_dist.data.packing import IGNORE, encode, pack, pad_row, tokenize_pairs, tokenize_text

SEQ = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer and a text file of 40 distinct documents."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "bright", "slow", "seven", "north"]
    docs = [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for i in range(40)]
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok = train_tokenizer(docs * 3, 300, d / "tok")
    return {"dir": d, "docs": docs, "tok": tok, "path": str(d / "docs.jsonl"), "cache": str(d / "cache")}


def _real_tokens(batch_ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return batch_ids[mask.bool()].tolist()


def test_pack_and_pad_preserve_every_token_and_mask():
    rng = random.Random(1)
    seqs = [[rng.randrange(3, 100) for _ in range(rng.randint(1, 40))] for _ in range(25)]
    rows = pack(seqs, SEQ, pad_id=0)
    flat = [t for s in seqs for t in s]
    assert all(len(r[k]) == SEQ for r in rows for k in r)
    assert [t for r in rows for t, m in zip(r["input_ids"], r["attention_mask"]) if m] == flat
    assert sum(sum(r["attention_mask"]) for r in rows) == len(flat)
    assert all(r["attention_mask"] == [1] * SEQ for r in rows[:-1])  # only the last row is padded
    last = rows[-1]
    n = len(flat) % SEQ or SEQ
    assert last["attention_mask"] == [1] * n + [0] * (SEQ - n) and last["input_ids"][n:] == [0] * (SEQ - n)
    for r in rows:
        assert r["labels"] == [t if m else IGNORE for t, m in zip(r["input_ids"], r["attention_mask"])]
    row = pad_row([5, 6, 7], 5, pad_id=0, labels=[IGNORE, 6, 7])
    assert row == {"input_ids": [5, 6, 7, 0, 0], "attention_mask": [1, 1, 1, 0, 0], "labels": [IGNORE, 6, 7, IGNORE, IGNORE]}


def test_tokenized_packing_keeps_the_token_stream(corpus):
    tok = corpus["tok"]
    ds = load_records(SourceConfig(path=corpus["path"]), "text", corpus["cache"])
    rows = tokenize_text(ds, tok, SEQ, packed=True)
    expected = [t for ids in encode(tok, corpus["docs"]) for t in ids]
    assert expected[0] == tok.bos_token_id and tok.eos_token_id in expected
    got = [t for r in rows for t, m in zip(r["input_ids"], r["attention_mask"]) if m]
    assert got == expected
    padded = tokenize_text(ds, tok, 64, packed=False)
    assert len(padded) == len(corpus["docs"])
    assert [sum(r["attention_mask"]) for r in padded] == [min(len(e), 64) for e in encode(tok, corpus["docs"])]


def test_pairs_score_only_the_target(corpus):
    tok = corpus["tok"]
    ds = datasets.Dataset.from_dict({"prompt": ["doc 1: alpha"], "target": [" beta gamma"]})
    row = tokenize_pairs(ds, tok, 32)[0]
    prompt = encode(tok, ["doc 1: alpha"], eos=False)[0]
    target = encode(tok, [" beta gamma"], bos=False)[0]
    n = len(prompt) + len(target)
    assert row["input_ids"][:n] == prompt + target
    assert row["labels"][:n] == [IGNORE] * len(prompt) + target and set(row["labels"][n:]) <= {IGNORE}


def _stream(corpus, world=1, rank=0, batch=4, shuffle=True, pack=False):
    cfg = StreamConfig(source=SourceConfig(path=corpus["path"]), seq_len=32, batch_size=batch, pack=pack, shuffle=shuffle)
    return build_stream(cfg, corpus["tok"], rank=rank, world_size=world, seed=7, cache_dir=corpus["cache"])


def _rows(batch) -> list[tuple[int, ...]]:
    return [tuple(r) for r in batch["input_ids"].tolist()]


def test_resume_mid_epoch_continues_with_the_next_batch(corpus):
    ref = _stream(corpus)
    ref_batches = [b for _ in range(2) for b in ref]  # two epochs
    assert len(ref_batches) == 20
    assert _rows(ref_batches[0]) != _rows(ref_batches[10])  # a new order each epoch
    for stop in (3, 12):  # mid first epoch, mid second epoch
        a = _stream(corpus)
        it = iter(a)
        for _ in range(stop % 10):
            next(it)
        if stop >= 10:
            list(it)
            it = iter(a)
            for _ in range(stop - 10):
                next(it)
        state = a.state_dict()
        b = _stream(corpus)
        b.load_state_dict(state)
        resumed = list(b)
        assert [_rows(x) for x in resumed] == [_rows(x) for x in ref_batches[stop : (stop // 10 + 1) * 10]]


def test_two_ranks_are_disjoint_and_cover_the_data(corpus):
    one = list(_stream(corpus, world=1, batch=4))
    r0, r1 = list(_stream(corpus, world=2, rank=0, batch=4)), list(_stream(corpus, world=2, rank=1, batch=4))
    assert len(r0) == len(r1) == len(one) == 10
    seen = []
    for full, a, b in zip(one, r0, r1):
        assert a["input_ids"].shape == (2, 32)
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(torch.cat([a[key], b[key]]), full[key])  # W ranks x b == 1 rank x W*b
        seen += _rows(a) + _rows(b)
    expected = [tuple(r["input_ids"]) for r in tokenize_text(load_records(SourceConfig(path=corpus["path"]), "text", corpus["cache"]), corpus["tok"], 32, False)]
    assert len(set(expected)) == 40 and sorted(seen) == sorted(expected)
    assert not set(_rows(r0[0])) & set(_rows(r1[0]))


def test_fact_stream_one_fact_per_batch_in_order(tmp_path, corpus):
    facts = [{"fact": f"fact {i}.", "paraphrases": [f"fact {i} version {j}." for j in range(3)], "question": f"q{i}?", "answer": str(i)} for i in range(5)]
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in facts))
    cfg = ContinualConfig(source=SourceConfig(path=str(path), schema="facts"), seq_len=24, batch_size=8)
    tok = corpus["tok"]
    full = list(build_stream(cfg, tok, cache_dir=str(tmp_path)))
    assert len(full) == 5
    for i, batch in enumerate(full):
        texts = tok.batch_decode(batch["input_ids"], skip_special_tokens=True)
        assert texts == [f"fact {i} version {j % 3}." for j in range(8)]  # paraphrases cycled, file order
        assert torch.equal(batch["labels"] == IGNORE, batch["attention_mask"] == 0)
        assert batch["attention_mask"].sum(1).tolist() == [len(encode(tok, [t])[0]) for t in texts]
    halves = [list(build_stream(cfg, tok, rank=r, world_size=2, cache_dir=str(tmp_path))) for r in range(2)]
    for i, batch in enumerate(full):
        assert torch.equal(torch.cat([halves[0][i]["input_ids"], halves[1][i]["input_ids"]]), batch["input_ids"])


def test_streaming_shards_and_resumes(corpus):
    def make(rank):
        cfg = StreamConfig(source=SourceConfig(path=corpus["path"], streaming=True), seq_len=32, batch_size=4, pack=False, shuffle=False)
        return build_stream(cfg, corpus["tok"], rank=rank, world_size=2, cache_dir=corpus["cache"])

    r0, r1 = list(make(0)), list(make(1))
    rows0 = {r for b in r0 for r in _rows(b)}
    rows1 = {r for b in r1 for r in _rows(b)}
    assert len(rows0) == len(rows1) == 20 and not rows0 & rows1
    a = make(0)
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()
    b = make(0)
    b.load_state_dict(state)
    assert [_rows(x) for x in b] == [_rows(x) for x in r0[2:]]
