"""The read-specificity replay: its per-fact selections equal what an smft run logged at each fact's
steps, and its figures on hand-made selections."""

from __future__ import annotations

import json

import pytest

from smft_dist.analysis.overlap import read_selection_log
from smft_dist.analysis.read_specificity import main, specificity
from tests.test_train import world  # noqa: F401  (a fixture)


def test_specificity_on_hand_made_selections():
    t = "mem_values_1"
    selections = [{(t, 0), (t, 1)}, {(t, 1), (t, 2)}]  # row 1 is shared
    read = {(t, i) for i in range(6)}
    known = [{(t, 1), (t, 5)}, {(t, 4), (t, 3)}]
    new = [{(t, 0), (t, 3)}, {(t, 2)}]
    r = specificity(selections, read, known, new)
    assert r == {"facts": 2, "rows_selected": 3, "rows_shared": 1, "rows_read": 6, "known_exposed": pytest.approx(0.25),
                 "known_exposed_shared": pytest.approx(0.25), "known_exposed_every_read": pytest.approx(1.0),
                 "new_covered": pytest.approx(0.75)}


@pytest.mark.parametrize("selection", [
    ["method.ranking=tf"],
    # every option the trainer's selectors have: scored positions, a share cap across facts, the step's seed
    ["method.ranking=random", "method.count_positions=scored", "method.row_share_cap=1"],
], ids=["tf", "random_scored_cap"])
def test_replayed_selections_equal_an_smft_runs_log(world, tmp_path, capsys, selection):  # noqa: F811
    from tests.multiproc import run_ranks
    from tests.test_train import _job, _train

    pre, run = tmp_path / "pre", tmp_path / "smft"
    run_ranks(_train, 1, _job(world, pre, "train.steps=2"))
    facts = f"{{path: {world}/facts_new.jsonl, schema: facts, max_examples: 3}}"
    tasks = (f"[{{name: new_facts, kind: qa, source: {facts}}}, "
             f"{{name: known_facts, kind: qa, source: {{path: {world}/facts_known.jsonl, schema: facts, max_examples: 4}}}}]")
    smft = [f"train.init_from={pre}/hf", "train.stream=continual", "method.name=smft", "method.top_t=5",
            f"data.continual.source={facts}", f"eval.tasks={tasks}", *selection]
    run_ranks(_train, 1, _job(world, run, *smft, "train.steps=3", "train.log_selected_slots=true", "eval.max_new_tokens=2"))
    logged = read_selection_log(run / "selected_slots.jsonl")  # unshuffled: step i trained fact i - 1

    main(["--config", str(run / "config.yaml")])
    report = json.loads(capsys.readouterr().out)
    assert report["facts"] == 3 and report["rows_selected"] == len(set().union(*logged.values()))
    shared = sum(1 for s in set().union(*logged.values()) if sum(s in v for v in logged.values()) >= 2)
    assert report["rows_shared"] == shared and 0 <= report["known_exposed"] <= report["known_exposed_every_read"] <= 1

    from smft_dist.analysis.read_specificity import replay
    from smft_dist.config import load_config
    from smft_dist.data.tokenizer import load_tokenizer
    from transformers import AutoModelForCausalLM

    import smft_dist.model  # noqa: F401

    cfg = load_config(run / "config.yaml")
    model = AutoModelForCausalLM.from_pretrained(f"{pre}/hf").eval().model
    selections, _ = replay(cfg, model, load_tokenizer(cfg.data.tokenizer))
    assert selections == [logged[1], logged[2], logged[3]]
    if "method.row_share_cap=1" in selection:
        assert shared == 0  # a cap of 1: no row trains for two facts
