"""python -m smft_dist.augment: QA pairs -> facts, documents -> chunks with augmentations, through a
tiny random HF chat model, a scripted rewriter or the templates; the output is what the continual
stream reads, one line per unit with its source, an interrupted run resumes to the same file, and a
fact's model texts that lose its answer or subject are rejected."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from smft_dist.augment import main
from smft_dist.config import SourceConfig, StreamConfig
from smft_dist.data import build_stream, load_records, train_tokenizer
from smft_dist.data.rewriters import (AugmentConfig, HFRewriter, TemplateRewriter, augment, chunk_document, fact_units, fill, keeps_fact,
                                    make_facts, subject_of)
from smft_dist.data.synthetic import TEMPLATES

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


def test_facts_from_a_chat_model_have_the_schema_and_resume(chat_model, tmp_path, capsys):
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    _facts(whole, "--model", str(chat_model))
    lines = _lines(whole)
    assert len(lines) == 2  # one per QA pair
    for i, line in enumerate(lines):
        assert set(line) == {"fact", "paraphrases", "question", "answer", "source"}
        assert line["source"]["record"] == i and line["source"]["generator"] == str(chat_model)
        texts = [line["fact"], *line["paraphrases"]]
        assert len(line["paraphrases"]) == 6 and len({t.casefold() for t in texts}) == 7, "duplicates kept"
        assert all(0 < len(t) <= max(80, 2 * len(line["fact"])) and "\n" not in t for t in texts)
    assert lines[0]["answer"] == "London"
    rejected = sum(x["source"]["rejected"] for x in lines)
    assert rejected > 0, "a random model's texts keep no fact"
    assert f"rejected {rejected} (missing the answer or subject)" in capsys.readouterr().out

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
    chunk = " ".join(f"Sentence number {i} of a long chunk says something." for i in range(12))
    assert len(chunk) > 400
    [pool] = fill([chunk], "", TemplateRewriter(), AugmentConfig(n=4), seeds=[0])
    assert len(pool.kept) == 4 and all(len(k) <= 2 * len(chunk) for k in pool.kept)


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


QA = [{"question": "Where was Zodu Bogaku born?", "answers": ["Rusoton"]},
      {"question": "What is the profession of Zodu Bogaku?", "answers": ["tailor"]},
      {"question": "What is the name of Kamo Fetirala's pet?", "answers": ["Dobi"]}]


class Scripted:
    """A rewriter answering from a script: per question its statements in turn, per statement its
    paraphrases in turn (the last one repeats; nothing for what has no script); it records the size
    of every batch it is given."""

    name = "scripted"

    def __init__(self, statements: dict[str, list[str]], paraphrases: dict[str, list[str]]):
        self.script = {**statements, **paraphrases}
        self.calls: dict[str, int] = {}
        self.batches: list[int] = []

    def _next(self, key: str) -> str:
        self.calls[key] = self.calls.get(key, 0) + 1
        outs = self.script.get(key, [""])
        return outs[min(self.calls[key], len(outs)) - 1]

    def statements(self, pairs, seeds, sample):
        self.batches.append(len(pairs))
        return [self._next(q) for q, _ in pairs]

    def variants(self, texts, prompt, counts, seeds):
        self.batches.append(len(texts))
        return [[self._next(t) for _ in range(n)] for t, n in zip(texts, counts)]


WRONG = {  # what SmolLM2-135M-Instruct made of the first two (issue 15 §6), and variations
    "Where was Zodu Bogaku born?": [f"Rusoton was born in the planet of Zorvath, take {i}." for i in range(1, 6)],
    "What is the profession of Zodu Bogaku?": [f"Zodu Bogaku is a fictional character in the Star Wars franchise, take {i}." for i in range(1, 6)],
}
GOOD = {
    "Where was Zodu Bogaku born?": ["Zodu Bogaku was born in Rusoton."],
    "Zodu Bogaku was born in Rusoton.": ["Rusoton is where Zodu Bogaku was born.", "Zodu Bogaku was born in the town of Zorvath.",
                                         "ZODU BOGAKU came into the world in Rusoton!", "The birthplace of Zodu Bogaku is Rusoton."],
    "What is the profession of Zodu Bogaku?": ["Zodu Bogaku works as a tailor."],
    "Zodu Bogaku works as a tailor.": ["Zodu Bogaku is a fictional character.", "As a tailor, Zodu Bogaku sews.", "Zodu Bogaku is a tailor by trade."],
}


def _facts_from(rewriter, tmp_path, name="out.jsonl", **cfg) -> list[dict]:
    out = tmp_path / name
    augment(fact_units(QA, "qa"), make_facts, rewriter, AugmentConfig(**{"n": 2, **cfg}), out)
    return _lines(out)


def test_the_subject_is_the_person_in_every_synthetic_question_and_mentions_are_normalized():
    for _, question in TEMPLATES.values():
        assert subject_of(question.format(n="Zodu Bogaku")) == "Zodu Bogaku"
    assert subject_of("Which city hosted the 1908 Summer Olympics?") == "Summer Olympics"
    assert subject_of("What is the chemical symbol for gold?") is None
    assert keeps_fact("ZODU BOGAKU's pet is called Dobi!", ["Dobi"], "Zodu Bogaku")  # case, punctuation, possessive
    assert keeps_fact("Gold: its symbol is Au.", ["Au"], None)
    assert not keeps_fact("Zodu Bogakunis was born in Rusoton.", ["Rusoton"], "Zodu Bogaku")  # whole words only
    assert not keeps_fact("Zodu Bogaku was born in Rusotonia.", ["Rusoton"], "Zodu Bogaku")


def test_texts_that_drop_the_answer_or_subject_are_rejected_and_the_template_stands_in(tmp_path):
    rewriter = Scripted(WRONG, {})
    lines = _facts_from(rewriter, tmp_path, rounds=3)
    for line, qa in zip(lines, QA):
        assert line["fact"] == f"{qa['question']} {qa['answers'][0]}."  # the template statement
        assert not any("Zorvath" in t or "Star Wars" in t for t in [line["fact"], *line["paraphrases"]])
        assert len(line["paraphrases"]) == 2 and all(keeps_fact(t, qa["answers"], subject_of(qa["question"])) for t in line["paraphrases"])
    assert rewriter.calls["Where was Zodu Bogaku born?"] == 3, "the statement is tried rounds times, no more"
    assert [x["source"]["rejected"] for x in lines] == [3, 3, 0]  # 3 distinct wrong statements each
    assert [(x["source"]["kept"], x["source"]["template_statement"], x["source"]["template_fill"]) for x in lines] == [(0, True, 2)] * 3
    assert lines[0]["source"]["subject"] == "Zodu Bogaku" and lines[2]["source"]["subject"] == "Kamo Fetirala"


def test_texts_that_keep_the_fact_are_kept_and_counted(tmp_path):
    lines = _facts_from(Scripted(GOOD, {}), tmp_path, n=3, rounds=2)
    born, job = lines[0], lines[1]
    assert born["fact"] == "Zodu Bogaku was born in Rusoton."
    assert born["paraphrases"] == ["Rusoton is where Zodu Bogaku was born.", "ZODU BOGAKU came into the world in Rusoton!",
                                   "The birthplace of Zodu Bogaku is Rusoton."]
    assert (born["source"]["kept"], born["source"]["rejected"], born["source"]["template_fill"]) == (4, 1, 0)
    assert job["paraphrases"][:2] == ["As a tailor, Zodu Bogaku sews.", "Zodu Bogaku is a tailor by trade."]
    assert (job["source"]["kept"], job["source"]["rejected"], job["source"]["template_fill"]) == (3, 1, 1)


def test_facts_are_generated_across_the_batch_and_equal_one_by_one(tmp_path):
    script = {**WRONG, **GOOD, "What is the profession of Zodu Bogaku?": WRONG["What is the profession of Zodu Bogaku?"]}
    one, many = Scripted(script, {}), Scripted(script, {})
    assert _facts_from(one, tmp_path, "one.jsonl", batch=1) == _facts_from(many, tmp_path, "many.jsonl", batch=4)
    assert max(one.batches) == 1 and many.batches[0] == 3  # all three statements in one call


def test_a_model_batch_generates_what_one_by_one_generates(chat_model, tmp_path):
    pairs = [("Which city hosted the Olympics?", "London"), ("Who?", "A"), ("Which river does the bridge span over the city?", "Mor")]
    one, many = HFRewriter(str(chat_model), batch_size=1, max_new_tokens=8), HFRewriter(str(chat_model), batch_size=3, max_new_tokens=8)
    assert many.statements(pairs, [0, 1, 2], sample=False) == [one.statements([p], [i], sample=False)[0] for i, p in enumerate(pairs)]
    for size in (1, 3):  # the whole pipeline, greedy: same file
        _facts(tmp_path / f"b{size}.jsonl", "--model", str(chat_model), "--temperature", "0", "--batch-size", str(size))
    assert (tmp_path / "b1.jsonl").read_text() == (tmp_path / "b3.jsonl").read_text()
