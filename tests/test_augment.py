"""python -m smft_dist.augment: QA pairs -> facts, documents -> chunks with augmentations, through a
tiny random HF chat model or the templates; the output is what the continual stream reads, one
line per unit with its source, and an interrupted run resumes to the same file."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from smft_dist.augment import main
from smft_dist.config import SourceConfig, StreamConfig
from smft_dist.data import build_stream, load_records, train_tokenizer
from smft_dist.data.augment import chunk_document

CHAT = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
DOCS = [
    {"text": "The Ilsen bridge opened in 1921. It spans the river Mor. Its architect was Dana Vell. "
             "The bridge is 300 metres long. Trams crossed it until 1970."},
    {"text": "Kettle Lake freezes every winter. Skaters gather there in January."},
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE tokenizer and a chat template."""
    path = tmp_path_factory.mktemp("chat")
    tok = train_tokenizer(["Which city hosted the Olympics? London is a city.", "The bridge spans a river."] * 20, 300, path)
    tok.chat_template = CHAT
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _facts(out, *extra):
    main(["--kind", "facts", "--input", "tests/fixtures/triviaqa.jsonl", "--schema", "triviaqa", "--out", str(out),
          "-n", "6", "--max-new-tokens", "12", "--max-chars", "80", "--batch-size", "4", *extra])


def test_facts_from_a_chat_model_have_the_schema_and_resume(chat_model, tmp_path):
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    _facts(whole, "--model", str(chat_model))
    lines = _lines(whole)
    assert len(lines) == 2  # one per QA pair
    for i, line in enumerate(lines):
        assert set(line) == {"fact", "paraphrases", "question", "answer", "source"}
        assert line["source"]["record"] == i and line["source"]["generator"] == str(chat_model)
        texts = [line["fact"], *line["paraphrases"]]
        assert len(line["paraphrases"]) == 6 and len({t.casefold() for t in texts}) == 7, "duplicates kept"
        assert all(0 < len(t) <= 80 and "\n" not in t for t in texts)
    assert lines[0]["answer"] == "London"

    _facts(resumed, "--model", str(chat_model), "--limit", "1")
    assert len(_lines(resumed)) == 1
    with resumed.open("a") as fh:
        fh.write('{"fact": "torn')  # a crash in the middle of a line
    _facts(resumed, "--model", str(chat_model))
    assert resumed.read_text() == whole.read_text()

    records = load_records(SourceConfig(path=str(whole), schema="facts"), "facts")
    stream = build_stream(StreamConfig(source=SourceConfig(path=str(whole), schema="facts"), seq_len=32, batch_size=4, pack=False, shuffle=False),
                          AutoTokenizer.from_pretrained(chat_model))
    assert len(records) == len(stream) == 2


def test_documents_become_chunks_with_augmentations(chat_model, tmp_path):
    src, out = tmp_path / "docs.jsonl", tmp_path / "aug.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    main(["--kind", "documents", "--input", str(src), "--out", str(out), "--model", str(chat_model), "-n", "3",
          "--max-new-tokens", "8", "--chunk-words", "12"])
    lines = _lines(out)
    chunks = [c for d in DOCS for c in chunk_document(d["text"], 12)]
    assert [x["document"] for x in lines] == chunks and len(chunks) > len(DOCS)
    assert [(x["source"]["record"], x["source"]["chunk"]) for x in lines] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    for x in lines:
        assert len(x["augmentations"]) == 3 and x["document"] not in x["augmentations"]
    assert len(load_records(SourceConfig(path=str(out), schema="documents"), "documents")) == len(chunks)


def test_a_chunk_longer_than_max_chars_still_gets_its_augmentations():
    from smft_dist.data.augment import AugmentConfig, TemplateRewriter, fill

    chunk = " ".join(f"Sentence number {i} of a long chunk says something." for i in range(12))
    assert len(chunk) > 400
    kept, from_templates = fill(chunk, "", TemplateRewriter(), AugmentConfig(n=4), seed=0)
    assert len(kept) == 4 and all(len(k) <= 2 * len(chunk) for k in kept)


def test_chunks_keep_whole_sentences_under_the_cap():
    text = DOCS[0]["text"]
    chunks = chunk_document(text, 12)
    assert " ".join(chunks) == text
    assert all(len(c.split()) <= 12 and c.endswith(".") for c in chunks)


def test_templates_are_deterministic_and_bad_input_is_one_line(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (a, b):
        _facts(out, "--model", "template", "--seed", "3")
    assert a.read_text() == b.read_text() and all(len(x["paraphrases"]) == 6 for x in _lines(a))
    for bad, text in ((["--schema", "text"], "--schema"), (["--model", str(tmp_path / "nope")], "--model"), (["-n", "0"], "-n")):
        with pytest.raises(SystemExit, match=text) as e:
            _facts(tmp_path / "c.jsonl", *bad)
        assert "\n" not in str(e.value)
    (tmp_path / "d.jsonl").write_text("not json\n")
    with pytest.raises(SystemExit, match="not augment output"):
        _facts(tmp_path / "d.jsonl")
