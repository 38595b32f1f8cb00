"""benchmarks.lost_facts: facts lost per point, how many runs lose each fact, the fragile ones."""

from __future__ import annotations

import json

import pytest

from benchmarks.lost_facts import lost_facts_table, main


def _base(n=5):
    return [{"index": i, "question": f"q{i}", "answers": [f"a{i}"], "prediction": f" a{i}.", "em": 0.0, "f1": 0.5,
             "contains": 1.0 if i < 4 else 0.0} for i in range(n)]


def _run(method, lr, seed, lost):
    return {"method": method, "params": {"lr": lr}, "seed": seed, "known_metric": "contains", "known_lost": lost}


RESULTS = [_run("smft", 1, 0, [0]), _run("smft", 1, 1, [0, 2]), _run("full_ft", 3, 0, [0, 1]), _run("full_ft", 3, 1, [0, 1, 3]),
           {**_run("lora", 1, 0, None)}]  # a run from before answers were written: left out


def test_points_fragile_facts_and_histogram():
    text = lost_facts_table(RESULTS, _base())
    assert text.startswith("4 of 5 runs recorded which known facts they lost; 4 known facts right at the start (contains). "
                           "Fragile: lost by at least 50% of these runs, whatever their method: 2 facts.")
    assert "| full_ft lr=3 | 2 | 2.5 ± 0.7 | 2 | 0.80 |" in text  # losses 0,1 / 0,1,3: fragile {0, 1} -> 4 of 5
    assert "| smft lr=1 | 2 | 1.5 ± 0.7 | 1 | 0.67 |" in text  # 0 / 0,2 -> 2 of 3
    assert "| 0 | 0 |" not in text and "| 1 | 2 |" in text and "| 2 | 1 |" in text and "| 4 | 1 |" in text  # facts 2, 3 once; 1 twice; 0 by all
    assert text.index("| q0 | a0 | 'a0.' | 4 of 4 |") < text.index("| q1 | a1 | 'a1.' | 2 of 4 |")
    assert "q2 | a2" not in text.split("Fragile facts:")[1]


def test_cli_writes_the_report_and_refuses_sweeps_without_answers(tmp_path, capsys):
    (tmp_path / "base" / "answers" / "step0").mkdir(parents=True)
    (tmp_path / "base" / "answers" / "step0" / "known_facts.jsonl").write_text("".join(json.dumps(b) + "\n" for b in _base()))
    (tmp_path / "results.jsonl").write_text(json.dumps(RESULTS[-1]) + "\n")
    with pytest.raises(SystemExit, match="benchmarks.lost_facts: no result recorded known_lost"):
        main(["--out", str(tmp_path)])
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RESULTS))
    main(["--out", str(tmp_path)])
    assert (tmp_path / "lost_facts.md").read_text() == capsys.readouterr().out
    assert "4 of 5 runs recorded" in (tmp_path / "lost_facts.md").read_text()
    run_dir = tmp_path / "runs" / "lora_lr1_s0" / "answers" / "step9"  # the record without known_lost: from its answers
    run_dir.mkdir(parents=True)
    run_dir.joinpath("known_facts.jsonl").write_text("".join(json.dumps({**b, "contains": 0.0}) + "\n" for b in _base()))
    main(["--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "5 of 5 runs recorded" in text and "| lora lr=1 | 1 | 4.0 ± 0.0 | 4 |" in text
