"""smft_dist.eval.related: known facts split by a shared (normalized) answer with the stream's new facts."""

from __future__ import annotations

import json

import pytest

from smft_dist.eval.related import main, split_known


def _fact(q, a):
    return {"fact": f"{q} {a}", "paraphrases": [f"{q} {a}"], "question": q, "answer": a}


def test_split_by_normalized_answer_keeps_order():
    known = [_fact("k1", "The Violin"), _fact("k2", "piano"), _fact("k3", "violin."), _fact("k4", "Paris")]
    new = [_fact("n1", "violin"), _fact("n2", "Rome")]
    splits = split_known(known, new)
    assert [r["question"] for r in splits["same_answer"]] == ["k1", "k3"]
    assert [r["question"] for r in splits["other"]] == ["k2", "k4"]


def test_cli_reads_the_first_records_as_the_eval_and_stream_do(tmp_path, capsys):
    (tmp_path / "known.jsonl").write_text("".join(json.dumps(_fact(f"k{i}", a)) + "\n" for i, a in enumerate(["x", "y", "z", "x"])))
    (tmp_path / "new.jsonl").write_text(json.dumps(_fact("n0", "x")) + "\n" + json.dumps(_fact("n1", "y")) + "\n")
    main(["--known", str(tmp_path / "known.jsonl"), "--new", str(tmp_path / "new.jsonl"), "--max-known", "3", "--max-new", "1",
          "--out", str(tmp_path / "out")])
    read = lambda name: [json.loads(x)["question"] for x in (tmp_path / "out" / f"facts_known_{name}.jsonl").read_text().splitlines()]
    assert read("same_answer") == ["k0"] and read("other") == ["k1", "k2"]
    with pytest.raises(SystemExit, match="missing.jsonl not found"):
        main(["--known", str(tmp_path / "missing.jsonl"), "--new", str(tmp_path / "new.jsonl"), "--out", str(tmp_path)])
