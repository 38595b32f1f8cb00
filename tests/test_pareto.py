"""benchmarks.pareto: the front (dominance, ties, error bars), FUAR, matched learning, the resumable
sweep runner, the table and the plot."""

from __future__ import annotations

import json
import math
import sys
import threading

import pytest

from benchmarks.pareto import (Grid, Run, drop_ratio, expand, fronts, fuar, load_results, markdown, matched_learning, pareto_front, plot,
                               summarize, sweep)
from tests.multiproc import run_ranks
from tests.test_train import _job, _train, world  # noqa: F401  (world is a fixture)

BASE = {"new_facts/f1": 0.1, "known_facts/f1": 0.5, "heldout/nll": 1.0}


def _result(method, params, seed, new_f1, drop, nll=0.01):
    return {"key": Run(method, params, seed).key, "method": method, "params": params, "seed": seed, "new_f1": new_f1,
            "known_drop_pct": drop, "nll_delta": nll, "fuar": fuar(drop / 100 * 0.5, new_f1 - 0.1), "rows_changed": 10,
            "trainable_per_step": 640.0}


def test_front_dominance_and_ties():
    points = [(0.5, 10), (0.5, 10), (0.6, 20), (0.4, 30), (0.6, 15), (0.7, 50), (0.3, 10)]
    # (0.6, 20) is beaten by (0.6, 15) at equal learning; (0.4, 30) by (0.5, 10); (0.3, 10) by (0.5, 10)
    # at equal forgetting; the two equal points dominate neither, so both stay
    assert pareto_front(points) == [0, 1, 4, 5]
    assert pareto_front([]) == [] and pareto_front([(0.2, 5)]) == [0]


def test_error_bars_are_the_std_over_seeds_and_fronts_per_method():
    results = [_result("smft", {"method.value_lr": 1}, s, f1, drop) for s, (f1, drop) in enumerate([(0.2, 10), (0.4, 20)])]
    results += [_result("smft", {"method.value_lr": 2}, 0, 0.1, 30), _result("full_ft", {"method.dense_lr": 1}, 0, 0.9, 80)]
    points = {(p.method, json.dumps(p.params)): p for p in summarize(results)}
    a = points[("smft", '{"method.value_lr": 1}')]
    assert a.seeds == 2 and a.stats["new_f1"] == pytest.approx((0.3, math.sqrt(0.02)))
    assert a.stats["known_drop_pct"] == pytest.approx((15, math.sqrt(50)))
    assert points[("smft", '{"method.value_lr": 2}')].stats["new_f1"] == (0.1, 0.0)
    front = fronts(list(points.values()))
    assert [p.params for p in front["smft"]] == [{"method.value_lr": 1}] and len(front["full_ft"]) == 1


def test_fuar_and_matched_learning():
    assert fuar(0.1, 0.2) == pytest.approx(0.5)
    assert fuar(-0.1, 0.2) == 0.0  # known facts improved: nothing forgotten
    assert fuar(0.1, 0.0) is None  # nothing acquired: undefined (CKL's n.d.)
    results = [_result("full_ft", {"lr": 1}, 0, 0.60, 80), _result("full_ft", {"lr": 2}, 0, 0.30, 40),
               _result("smft", {"lr": 1}, 0, 0.57, 30), _result("smft", {"lr": 2}, 0, 0.64, 20), _result("smft", {"lr": 3}, 0, 0.50, 5),
               _result("lora", {"lr": 1}, 0, 0.20, 10), _result("lora", {"lr": 2}, 0, 0.68, 50)]
    matched = matched_learning(summarize(results))
    assert {m: p.params for m, p in matched.items()} == {"full_ft": {"lr": 1}, "smft": {"lr": 2}}  # lora (0.68) is 0.08 away
    table = markdown(summarize(results), BASE)
    assert "smft (lr=2): new F1 0.640, known F1 drop 20.0% (× 0.25 ± 0.00 of full_ft's)" in table
    lora_section = table[table.index("within 0.05 of lora's best, 0.680"):]
    assert "smft (lr=2): new F1 0.640, known F1 drop 20.0% (× 0.40 ± 0.00 of lora's)" in lora_section
    assert "full_ft (" not in lora_section  # full_ft's best (0.60) is 0.08 from lora's
    assert table.count("| smft |") == 3 and table.count("| yes |") == 6  # every point listed; on the fronts:
    assert "| smft | lr=1 |  |" in table and "| smft | lr=2 | yes |" in table  # smft lr=2, 3; full_ft and lora: both
    ratio = drop_ratio(*[p for p in summarize([_result("smft", {}, 0, 0.5, 20), _result("smft", {}, 1, 0.5, 40),
                                                _result("full_ft", {}, 0, 0.5, 60), _result("full_ft", {}, 1, 0.5, 60)])])
    assert ratio == pytest.approx((0.5, 0.5 * math.sqrt(200) / 30))  # std 14.1 of mean 30; full_ft's std 0


def test_sweep_appends_each_run_and_a_rerun_skips_finished(tmp_path):
    grid = Grid("unused.yaml", [0], {"smft": {"fixed": ["method.name=smft"], "grid": {"method.value_lr": [1, 2]}}}, [])
    runs = expand(grid)
    assert [r.params for r in runs] == [{"method.value_lr": 1}, {"method.value_lr": 2}]
    calls, lock = [], threading.Lock()

    def fake(run):
        with lock:
            calls.append(run.key)
        return _result(run.method, run.params, run.seed, 0.2 * run.params["method.value_lr"], 10)

    results = sweep(runs, tmp_path, fake, workers=2)
    assert sorted(calls) == sorted(r.key for r in runs) and len(results) == 2
    assert len(load_results(tmp_path / "results.jsonl")) == 2
    assert len(sweep(runs, tmp_path, fake, workers=2)) == 2 and len(calls) == 2, "a rerun skips both"
    more = expand(grid._replace(seeds=[0, 1]))
    sweep(more, tmp_path, fake)
    assert len(calls) == 4 and len(load_results(tmp_path / "results.jsonl")) == 4, "only the new seed's runs ran"


def test_plot_is_written_for_a_tiny_grid(tmp_path):
    results = [_result("smft", {"lr": lr}, s, 0.1 * lr + 0.01 * s, 10 * lr) for lr in (1, 2) for s in (0, 1, 2)]
    results += [_result("full_ft", {"lr": 1}, s, 0.5, 60 + s) for s in (0, 1, 2)]
    plot(summarize(results), tmp_path / "pareto.png")
    data = (tmp_path / "pareto.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


@pytest.mark.slow
def test_real_runs_measure_rows_and_trainable_parameters(world, tmp_path):  # noqa: F811
    """Two real train runs (smft, lora) from a tiny pretrained model through the grid file."""
    import yaml

    from benchmarks.pareto import Subprocesses, base_eval, load_grid
    from smft_dist.config import to_dict

    pre = tmp_path / "pre"
    run_ranks(_train, 1, _job(world, pre, "train.steps=2"))
    tasks = (f"[{{name: new_facts, kind: qa, source: {{path: {world}/facts_new.jsonl, schema: facts, max_examples: 4}}}},"
             f" {{name: known_facts, kind: qa, source: {{path: {world}/facts_known.jsonl, schema: facts, max_examples: 4}}}},"
             f" {{name: heldout, kind: nll, source: {{path: {world}/heldout.jsonl}}, seq_len: 32}}]")
    cfg = _job(world, tmp_path / "unused", f"train.init_from={pre}/hf", "train.stream=continual", "train.steps=3",
               "eval.max_new_tokens=2", f"eval.tasks={tasks}")
    (tmp_path / "stage2.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({
        "config": str(tmp_path / "stage2.yaml"), "seeds": [0],
        "methods": {"smft": {"fixed": ["method.name=smft", "method.ranking=tf"], "grid": {"method.top_t": [5]}},
                    "lora": {"fixed": ["method.name=lora", "method.lora_rank=2"], "grid": {"method.dense_lr": [1e-3]}}}}))
    grid = load_grid(tmp_path / "grid.yaml")
    out = tmp_path / "sweep"
    base, model = base_eval(grid, out, threads=1)
    results = {r["method"]: r for r in sweep(expand(grid), out, Subprocesses(grid, out, base, model, 1, [sys.executable]))}
    smft, lora = results["smft"], results["lora"]
    assert 0 < smft["rows_changed"] <= 3 * 5 and lora["rows_changed"] == 0
    assert smft["trainable_per_step"] == 5 * 32  # top_t rows x v_dim, no dense parameter
    # LoRA rank 2 on q, k, v, o (32 x 32) of both blocks and the SwiGLU of block 0 (32 <-> 96): r * (in + out) each
    assert lora["trainable_per_step"] == 2 * 4 * 2 * (32 + 32) + 3 * 2 * (32 + 96)
    assert set(smft) >= {"new_f1", "known_drop_pct", "nll_delta", "fuar"} and smft["params"] == {"method.top_t": 5}
