"""smft_dist.eval.answer_changes: which examples were lost and gained between two evaluations."""

from __future__ import annotations

import json

import pytest

from smft_dist.eval import answer_changes
from smft_dist.eval.answer_changes import changes


def _qa(index, prediction, contains, em=0.0):
    return {"index": index, "question": f"q{index}", "answers": [f"a{index}"], "prediction": prediction, "em": em, "f1": em,
            "contains": contains}


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


BEFORE = [_qa(0, "a0.", 1.0), _qa(1, "a1", 1.0, em=1.0), _qa(2, "x", 0.0), _qa(3, "a3", 1.0, em=1.0)]
AFTER = [_qa(0, "a0 b", 1.0), _qa(1, "y", 0.0), _qa(2, "a2", 1.0, em=1.0), _qa(3, "a3 is it", 1.0)]


def test_lost_and_gained_by_the_chosen_metric():
    assert changes(BEFORE, AFTER) == ([1], [2])
    assert changes(BEFORE, AFTER, "em") == ([1, 3], [2])  # exact match also loses the reworded answer
    choice = [{"index": 0, "context": "c", "label": 1, "picked": 1, "correct": True}]
    assert changes(choice, [{**choice[0], "picked": 2, "correct": False}]) == ([0], [])


def test_other_examples_are_refused():
    with pytest.raises(Exception, match="do not hold the same examples"):
        changes(BEFORE, AFTER[:3])
    with pytest.raises(Exception, match="do not hold the same examples"):
        changes(BEFORE, [{**AFTER[0], "question": "other"}, *AFTER[1:]])


def test_cli_reads_the_last_evaluation_of_run_directories(tmp_path, capsys):
    _write(tmp_path / "base" / "answers" / "step0" / "known_facts.jsonl", BEFORE)
    _write(tmp_path / "run" / "answers" / "step9" / "known_facts.jsonl", [_qa(i, "z", 0.0) for i in range(4)])
    _write(tmp_path / "run" / "answers" / "step12" / "known_facts.jsonl", AFTER)  # the last one: 12 > 9
    answer_changes.main([str(tmp_path / "base"), str(tmp_path / "run")])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "4 examples, 3 right before, 3 after: 1 lost, 1 gained"
    assert out[1:] == ["lost #1: 'q1' ['a1']: 'a1' -> 'y'", "gained #2: 'q2' ['a2']: 'x' -> 'a2'"]
    with pytest.raises(SystemExit, match="smft_dist.eval.answer_changes: .*no answers/step<N>/new_facts.jsonl"):
        answer_changes.main([str(tmp_path / "base"), str(tmp_path / "run"), "--task", "new_facts"])
