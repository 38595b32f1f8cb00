"""Sources: malformed files fail with file and line; hub formats convert; synthetic world and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from smft_dist.config import SourceConfig
from smft_dist.data import DataError, load_records
from smft_dist.data.synthetic import SIZES, generate

FIXTURES = Path(__file__).parent / "fixtures"
FACT = {"fact": "A is B.", "paraphrases": ["A is B.", "B is what A is."], "question": "What is A?", "answer": "B"}


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_bad_json_line_names_file_and_line(tmp_path):
    f = _write(tmp_path / "facts.jsonl", [json.dumps(FACT), json.dumps(FACT), '{"fact": "broken", '])
    with pytest.raises(DataError, match=rf"^{f}:3: invalid JSON"):
        load_records(SourceConfig(path=f, schema="facts"), "facts", cache_dir=str(tmp_path / "cache"))


def test_missing_field_names_file_and_line(tmp_path):
    bad = {k: v for k, v in FACT.items() if k != "answer"}
    f = _write(tmp_path / "facts.jsonl", [json.dumps(FACT), "", json.dumps(bad), json.dumps(FACT)])
    with pytest.raises(DataError, match=rf"^{f}:3: missing field 'answer'$"):
        load_records(SourceConfig(path=f, schema="facts"), "facts", cache_dir=str(tmp_path / "cache"))


def test_missing_field_in_every_line_and_in_parquet(tmp_path):
    f = _write(tmp_path / "qa.jsonl", [json.dumps({"question": "q"})])
    with pytest.raises(DataError, match=rf"^{f}:1: missing field 'answer'$"):
        load_records(SourceConfig(path=f, schema="nq_open"), "qa", cache_dir=str(tmp_path / "cache"))
    pq_path = tmp_path / "nq.parquet"
    datasets.Dataset.from_dict({"question": ["q"]}).to_parquet(str(pq_path))
    with pytest.raises(DataError, match=rf"^{pq_path}: missing field 'answer'"):
        load_records(SourceConfig(path=str(pq_path), schema="nq_open"), "qa", cache_dir=str(tmp_path / "cache"))


def test_local_formats_and_max_examples(tmp_path):
    cache = str(tmp_path / "cache")
    txt = _write(tmp_path / "corpus.txt", ["first line", "second line", "third line"])
    assert load_records(SourceConfig(path=txt), "text", cache)["text"] == ["first line", "second line", "third line"]
    pq_path = tmp_path / "nq.parquet"
    datasets.Dataset.from_dict({"question": ["q1", "q2"], "answer": [["a", "b"], ["c"]]}).to_parquet(str(pq_path))
    ds = load_records(SourceConfig(path=str(pq_path), schema="nq_open", max_examples=1), "qa", cache)
    assert ds.to_list() == [{"question": "q1", "answers": ["a", "b"]}]


@pytest.mark.parametrize(
    "schema,want,first",
    [
        ("triviaqa", "qa", {"question": "Which city hosted the 1908 Summer Olympics?", "answers": ["London", "London, England", "City of London"]}),
        ("nq_open", "qa", {"question": "where is the eiffel tower located", "answers": ["Paris", "Paris, France"]}),
        ("simpleqa", "qa", {"question": "Who received the IEEE Frank Rosenblatt Award in 2010?", "answers": ["Michio Sugeno"]}),
        ("dclm", "text", {"text": "The river flows slowly through the old town. Boats pass under the stone bridge."}),
    ],
)
def test_hub_formats_convert(tmp_path, schema, want, first):
    ds = load_records(SourceConfig(path=str(FIXTURES / f"{schema}.jsonl"), schema=schema), want, str(tmp_path))
    assert len(ds) == 2 and ds[0] == first


def test_hellaswag_and_gsm8k_formats(tmp_path):
    hs = load_records(SourceConfig(path=str(FIXTURES / "hellaswag.jsonl"), schema="hellaswag"), "choice", str(tmp_path))
    assert hs[0] == {
        "context": "Roof shingle removal: A man is sitting on a roof. He",
        "endings": [" is using wrap to wrap a pair of skis.", " is ripping level tiles off.", " is holding a rubik's cube.", " starts pulling up roofing on a roof."],
        "label": 3,
    }
    assert hs[1]["context"] == "Home and Garden: How to clean a kettle. Fill the kettle with water. Add vinegar"
    assert hs[1]["endings"][0] == " and boil it. Rinse the kettle."
    gsm = load_records(SourceConfig(path=str(FIXTURES / "gsm8k.jsonl"), schema="gsm8k"), "lm_pair", str(tmp_path))
    assert gsm[0]["prompt"].startswith("Question: Natalia sold clips") and gsm[0]["prompt"].endswith("\nAnswer:")
    assert gsm[0]["target"].endswith("#### 72") and gsm[0]["target"].startswith(" Natalia")


def test_schema_mismatch_is_rejected(tmp_path):
    with pytest.raises(DataError, match="cannot read schema 'hellaswag' as 'qa'"):
        load_records(SourceConfig(path=str(FIXTURES / "hellaswag.jsonl"), schema="hellaswag"), "qa", str(tmp_path))


def test_synthetic_world_is_deterministic_and_split(tmp_path):
    a = generate(tmp_path / "a", SIZES["tiny"], seed=3, vocab_size=300)
    b = generate(tmp_path / "b", SIZES["tiny"], seed=3, vocab_size=0)
    for key in ("pretrain", "facts_new", "facts_known", "documents", "choice", "heldout"):
        assert a[key].read_text() == b[key].read_text(), key
    new = [json.loads(line) for line in a["facts_new"].read_text().splitlines()]
    known = [json.loads(line) for line in a["facts_known"].read_text().splitlines()]
    pretrain = a["pretrain"].read_text()
    new_names = {f["question"] for f in new}
    assert new and known and not new_names & {f["question"] for f in known}
    assert all(f["fact"] not in pretrain and f["answer"] in f["fact"] for f in new)  # new facts are never pretrained
    assert all(f["question"] in pretrain for f in known)  # known facts are, with their Q/A form
    assert all(len(f["paraphrases"]) >= 8 and len(set(f["paraphrases"])) == len(f["paraphrases"]) for f in new)
    tok = AutoTokenizer.from_pretrained(str(a["tokenizer"]))
    assert len(tok) == 300 and {tok.pad_token, tok.bos_token, tok.eos_token} == {"<pad>", "<s>", "</s>"}
    assert tok.decode(tok(new[0]["fact"], add_special_tokens=False)["input_ids"]) == new[0]["fact"]


def test_data_config_defaults_survive_partial_overrides():
    from smft_dist.config import ConfigError, load_config

    cfg = load_config(None, ["data.continual.source.path=facts.jsonl", "data.pretrain.source.path=p.jsonl"])
    c = cfg.data.continual
    assert (c.source.schema, c.seq_len, c.batch_size, c.pack, c.shuffle) == ("facts", 64, 64, False, False)
    with pytest.raises(ConfigError, match=r"^data\.continual\.source\.schema: 'qa' cannot be trained on"):
        load_config(None, ["data.continual.source={path: f.jsonl, schema: qa}"])
