"""The slot overlap analysis on a hand-built selection log and hand-made answer slots."""

from __future__ import annotations

import json

import pytest

import torch

from smft_dist.analysis.overlap import facts_per_slot, overlap_report, pearson, read_selection_log, record_of_steps, restore_rows
from smft_dist.data.streams import IndexedStream
from tests.test_train import world  # noqa: F401  (a fixture)


def test_selection_log_keeps_the_last_record_of_a_repeated_step(tmp_path):
    log = tmp_path / "selected_slots.jsonl"
    t = "mem_values_2"
    rows = [(1, t, [0, 1]), (2, t, [5]), (2, t, [1, 2]), (3, t, [7])]  # step 2 repeated after a resume
    log.write_text("".join(json.dumps({"step": s, "table": table, "slots": sl}) + "\n" for s, table, sl in rows))
    steps = read_selection_log(log)
    assert steps == {1: {("mem_values_2", 0), ("mem_values_2", 1)}, 2: {("mem_values_2", 1), ("mem_values_2", 2)},
                     3: {("mem_values_2", 7)}}


@pytest.mark.parametrize("shuffle", [False, True])
def test_record_of_steps_replays_the_stream_order(shuffle):
    stream = IndexedStream(4, 1, lambda indices: indices[0], shuffle=shuffle, seed=3)
    seen = [r for _ in range(3) for r in stream]  # three epochs
    assert record_of_steps(list(range(1, 13)), 4, shuffle, 3) == {s: seen[s - 1] for s in range(1, 13)}


def test_overlap_report_on_a_hand_built_log():
    t = "mem_values_1"
    trained = {1: {(t, 0), (t, 1)}, 2: {(t, 2)}, 3: {(t, 1), (t, 3)}, 4: {(t, 2)}}
    fact_of_step = {1: 0, 2: 1, 3: 0, 4: 1}  # two new facts, two passes
    answers = {10: {(t, 1), (t, 9)}, 11: {(t, 8)}, 12: {(t, 0), (t, 2), (t, 3)}}
    f1_loss = {10: 0.5, 11: 0.0, 12: 1.0}
    contains_loss = {10: 0.0, 11: 0.0, 12: 1.0}  # fact 10 changed its answer's format only
    r = overlap_report(trained, fact_of_step, answers, {"f1": f1_loss, "contains": contains_loss})
    assert r["new_facts"] == 2 and r["slots_per_new_fact"] == {"min": 1, "median": 3, "max": 3}  # fact 0: {0, 1, 3}; fact 1: {2}
    assert r["slots_updated"] == 4
    assert r["updates_per_slot"] == {1: 2, 2: 2}  # slots 0, 3 once; 1, 2 twice
    assert r["answer_slots_updated"] == {"10": 1, "11": 0, "12": 3}
    assert r["answer_slots_updated_fraction"] == {"10": 0.5, "11": 0.0, "12": 1.0}
    assert r["overlap_histogram"] == {0: 1, 1: 1, 3: 1} and r["known_facts_touched"] == 2
    assert r["f1_loss_vs_answer_slots_updated"] == pytest.approx(pearson([1, 0, 3], [0.5, 0.0, 1.0]))
    assert r["contains_loss_vs_answer_slots_updated"] == pytest.approx(pearson([1, 0, 3], [0.0, 0.0, 1.0]))
    assert r["lost_vs_kept_answer_slots_updated_fraction"] == {
        "f1": {"lost": {"facts": 2, "mean": 0.75}, "kept": {"facts": 1, "mean": 0.0}},
        "contains": {"lost": {"facts": 1, "mean": 1.0}, "kept": {"facts": 2, "mean": 0.25}}}
    assert pearson([1, 0, 3], [0.5, 0.0, 1.0]) == pytest.approx(0.9820, abs=1e-4)
    assert pearson([1, 1], [0.0, 1.0]) is None


def test_restoring_the_rows_shared_by_facts():
    t = "mem_values_1"
    trained = {1: {(t, 0), (t, 1)}, 2: {(t, 1), (t, 2)}, 3: {(t, 1), (t, 0)}}
    fact_of_step = {1: 0, 2: 1, 3: 0}  # slot 0: fact 0 twice; slot 1: facts 0 and 1; slot 2: fact 1
    assert facts_per_slot(trained, fact_of_step) == {(t, 0): 1, (t, 1): 2, (t, 2): 1}

    class Model(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.value_tables = torch.nn.ModuleDict({t: torch.nn.Embedding(4, 2, _weight=weight.clone())})
            self.dense = torch.nn.Linear(2, 2)

    start = Model(torch.zeros(4, 2))
    end = Model(torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0], [1.0, 1.0]]))
    dense_before = end.dense.weight.clone()
    share = restore_rows(end, start, {(t, 1), ("other_table", 0)})
    assert share == pytest.approx(4 / (9 + 16 + 2) ** 0.5)  # row 1's part of the update norm
    assert torch.equal(end.value_tables[t].weight, torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
    assert torch.equal(end.dense.weight, dense_before), "only value rows are put back"


@pytest.mark.slow
def test_overlap_cli_on_a_tiny_smft_run(world, tmp_path):  # noqa: F811
    from smft_dist.analysis.overlap import main
    from tests.multiproc import run_ranks
    from tests.test_train import _job, _train

    pre, run = tmp_path / "pre", tmp_path / "smft"
    run_ranks(_train, 1, _job(world, pre, "train.steps=2"))
    tasks = f"[{{name: known_facts, kind: qa, source: {{path: {world}/facts_known.jsonl, schema: facts, max_examples: 4}}}}]"
    run_ranks(_train, 1, _job(world, run, f"train.init_from={pre}/hf", "train.stream=continual", "train.steps=3", "method.name=smft",
                              "method.ranking=tf", "method.top_t=5", "train.log_selected_slots=true", "eval.max_new_tokens=2",
                              f"eval.tasks={tasks}"))
    main(["--run", str(run), "--max-known", "4"])
    report = json.loads((run / "overlap.json").read_text())
    assert report["known_facts"] == 4 and report["new_facts"] == 3 and 0 < report["slots_updated"] <= 15
    assert sum(report["overlap_histogram"].values()) == 4
