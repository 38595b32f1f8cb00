"""benchmarks.pareto: the front (dominance, ties, error bars), FUAR, fronts compared at equal learning
(interpolation, spans that do not overlap, per pass budget), equal budgets for every method, the
resumable sweep runner, the table and the plot."""

from __future__ import annotations

import json
import math
import sys
import threading
import time

import pytest

from benchmarks.pareto import (Grid, Point, Run, below_front, budget_of, drop_at, equal_learning, expand, fronts, fuar, load_grid, load_results,
                               main, markdown, pareto_front, plot, ratio, summarize, sweep)
from smft_dist.eval.report import last_eval
from tests.multiproc import run_ranks
from tests.test_train import _job, _train, world  # noqa: F401  (world is a fixture)

BASE = {"new_facts/f1": 0.1, "known_facts/f1": 0.5, "heldout/nll": 1.0}


def _result(method, params, seed, new_f1, drop, nll=0.01):
    return {"key": Run(method, params, seed).key, "method": method, "params": params, "seed": seed, "new_f1": new_f1,
            "known_drop_pct": drop, "nll_delta": nll, "fuar": fuar(drop / 100 * 0.5, new_f1 - 0.1), "rows_changed": 10,
            "trainable_per_step": 640.0, "optimizer_state_bytes": 2**20, "seconds": 60.0}


def _front(*xy_std):
    """A hand-made front: (new F1, drop %, drop std) per point, by increasing new F1."""
    return [Point("m", {"i": i}, 3, {"new_f1": (x, 0.0), "known_drop_pct": (y, s)}) for i, (x, y, s) in enumerate(xy_std)]


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


def test_fuar():
    assert fuar(0.1, 0.2) == pytest.approx(0.5)
    assert fuar(-0.1, 0.2) == 0.0  # known facts improved: nothing forgotten
    assert fuar(0.1, 0.0) is None  # nothing acquired: undefined (CKL's n.d.)


def test_drop_at_interpolates_inside_the_front_bounds_below_it_and_never_extrapolates_above():
    front = _front((0.4, 10.0, 1.0), (0.6, 20.0, 3.0), (0.9, 50.0, 5.0))
    assert drop_at(front, 0.5) == pytest.approx((15.0, 2.0))
    assert drop_at(front, 0.8) == pytest.approx((40.0, 13 / 3))
    assert drop_at(front, 0.6) == (20.0, 3.0) and drop_at(front, 0.4) == (10.0, 1.0) and drop_at(front, 0.9) == (50.0, 5.0)
    assert drop_at(front, 0.91) is None  # above the span: not reached
    assert drop_at(front, 0.39) == (10.0, 1.0) and below_front(front, 0.39) and not below_front(front, 0.4)  # a point learning more
    assert drop_at(_front((0.7, 5.0, 0.0)), 0.7) == (5.0, 0.0) and drop_at(_front((0.7, 5.0, 0.0)), 0.6) == (5.0, 0.0)
    assert drop_at([], 0.5) is None
    assert ratio((10.0, 1.0), (20.0, 2.0)) == pytest.approx((0.5, 0.5 * math.hypot(0.1, 0.1)))
    assert math.isnan(ratio((10.0, 1.0), (0.0, 1.0))[0])  # a reference that forgets nothing: no ratio
    assert ratio((-0.4, 0.1), (20.0, 2.0)) == (0.0, 0.0)  # known facts rose: nothing forgotten, not a negative ratio


def test_equal_learning_reads_fronts_at_common_levels_and_reports_where_they_do_not_overlap():
    results = [_result("full_ft", {"lr": 1}, 0, 0.50, 40), _result("full_ft", {"lr": 2}, 0, 0.70, 60),
               _result("full_ft", {"lr": 3}, 0, 0.60, 70),  # dominated by lr 2: off the front, not interpolated
               _result("smft", {"lr": 1}, 0, 0.55, 5), _result("smft", {"lr": 2}, 0, 0.95, 25),
               _result("lora", {"lr": 1}, 0, 0.20, 30), _result("lora", {"lr": 2}, 0, 0.30, 50)]  # no overlap with either
    drops = equal_learning(summarize(results), (0.5, 0.6, 0.7, 0.9))
    assert drops["full_ft"] == {0.5: (40.0, 0.0), 0.6: pytest.approx((50.0, 0.0)), 0.7: (60.0, 0.0), 0.9: None}
    assert drops["smft"][0.5] == (5.0, 0.0) and drops["smft"][0.6] == pytest.approx((7.5, 0.0)) and drops["smft"][0.9] == pytest.approx((22.5, 0.0))
    assert all(v is None for v in drops["lora"].values())
    table = markdown(summarize(results), BASE, (0.5, 0.6, 0.7, 0.9))
    row = next(line for line in table.splitlines() if line.startswith("| 0.60 |"))
    # methods in name order (full_ft, lora, smft); ratios: full_ft / lora, lora / full_ft, smft / full_ft, full_ft / lora, ...
    assert row.startswith("| 0.60 | 50.0 ± 0.0 | — | 7.5 ± 0.0 |") and "| 0.15 ± 0.00 |" in row
    row = next(line for line in table.splitlines() if line.startswith("| 0.50 |"))  # smft's front starts at 0.55
    assert row.startswith("| 0.50 | 40.0 ± 0.0 | — | ≤ 5.0 ± 0.0 |") and "| ≤ 0.12 ± 0.00 |" in row
    assert "lora 0.200–0.300" in table and "smft 0.550–0.950" in table
    assert table.count("| smft |") == 2 and "| full_ft | lr=3 |  |  |" in table  # every point listed; lr 3 off the front


def test_budgets_are_crossed_with_every_method_and_compared_per_budget(tmp_path, capsys):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("config: unused.yaml\nseeds: [0]\nbudgets: {train.steps: [8, 16]}\nlevels: [0.5]\n"
                         "methods:\n  smft: {fixed: [method.name=smft], grid: {method.value_lr: [1, 2]}}\n"
                         "  full_ft: {fixed: [method.name=full_ft]}\n")
    grid = load_grid(grid_file)
    runs = expand(grid)
    assert sorted((r.method, r.params.get("train.steps")) for r in runs) == [("full_ft", 8), ("full_ft", 16)] + [("smft", 8)] * 2 + [("smft", 16)] * 2
    assert budget_of(grid, "smft", {"train.steps": 16}) == 16
    grid_file.write_text(grid_file.read_text().replace("seeds: [0]", "seeds: [0, 1]"))
    main(["--grid", str(grid_file), "--budgets", "16", "--seeds", "1", "--list"])
    assert capsys.readouterr().out.strip() == "3"  # smft's two points and full_ft at budget 16, seed 1
    with pytest.raises(SystemExit, match="--seeds \\[2\\] not in the grid's seeds \\[0, 1\\]"):
        main(["--grid", str(grid_file), "--seeds", "2", "--list"])
    assert budget_of(grid._replace(overrides=["train.steps=4"]), "smft", {}) == 4
    assert budget_of(Grid("unused.yaml", [0], {"m": {"fixed": ["train.steps=7"]}}, ["train.steps=4"]), "m", {}) == 7
    grid_file.write_text(grid_file.read_text().replace("[method.name=full_ft]", "[method.name=full_ft, train.steps=32]"))
    with pytest.raises(SystemExit, match="full_ft sets \\['train.steps'\\]"):
        load_grid(grid_file)
    # at budget 8 smft learns 0.5 at a 10% drop, full_ft at 40%; at budget 16 both learn more
    results = [_result("smft", {"train.steps": 8}, 0, 0.5, 10), _result("full_ft", {"train.steps": 8}, 0, 0.5, 40),
               _result("smft", {"train.steps": 16}, 0, 0.5, 20), _result("full_ft", {"train.steps": 16}, 0, 0.5, 30)]
    table = markdown(summarize(results), BASE, (0.5,))
    per_budget = table.split("### Budget train.steps=")
    assert per_budget[1].startswith("8") and "| 0.50 | 40.0 ± 0.0 | 10.0 ± 0.0 | 0.25 ± 0.00 |" in per_budget[1]
    assert per_budget[2].startswith("16") and "| 0.50 | 30.0 ± 0.0 | 20.0 ± 0.0 | 0.67 ± 0.00 |" in per_budget[2]
    assert "### Any budget" in table and "not an equal-budget comparison" not in table
    unequal = markdown(summarize(results[:3]), BASE, (0.5,))
    assert "### Budget train.steps=16" not in unequal and "not an equal-budget comparison" in unequal


def test_error_bars_and_optimizer_state_in_the_table():
    results = [_result("smft", {"lr": 1}, s, 0.5, 10 + s) for s in range(3)]
    results[0].pop("optimizer_state_bytes")  # an older record: missing, not zero
    (p,) = summarize(results)
    assert p.stats["optimizer_state_bytes"] == (2**20, 0.0) and p.stats["known_drop_pct"] == pytest.approx((11.0, 1.0))
    assert "| 1.0 | 60 ± 0 |" in markdown([p], BASE)


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


def test_sweep_stops_at_the_first_failed_run_keeping_the_finished_ones(tmp_path):
    grid = Grid("unused.yaml", [0], {"smft": {"fixed": ["method.name=smft"], "grid": {"method.value_lr": [1, 2, 3, 4, 5, 6]}}}, [])
    runs, calls = expand(grid), []

    def fails_second(run):
        calls.append(run.key)
        if run.params["method.value_lr"] == 2:
            raise SystemExit(f"benchmarks.pareto: {run.name} failed (exit 1)")
        time.sleep(0.3)  # a run takes a while: the sweep sees the failure before the queue is done
        return _result(run.method, run.params, run.seed, 0.1, 10)

    with pytest.raises(SystemExit, match="failed"):
        sweep(runs, tmp_path, fails_second, workers=1)
    assert len(calls) <= 3, f"runs kept starting after a failure: {len(calls)} of {len(runs)}"
    assert [r["params"] for r in load_results(tmp_path / "results.jsonl")] == [{"method.value_lr": 1}]


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
        "config": str(tmp_path / "stage2.yaml"), "seeds": [0], "known_metric": "contains",
        "methods": {"smft": {"fixed": ["method.name=smft", "method.ranking=tf"], "grid": {"method.top_t": [5]}},
                    "lora": {"fixed": ["method.name=lora", "method.lora_rank=2"], "grid": {"method.dense_lr": [1e-3]}}}}))
    grid = load_grid(tmp_path / "grid.yaml")
    out = tmp_path / "sweep"
    base, model = base_eval(grid, out, threads=1)
    results = {r["method"]: r for r in sweep(expand(grid), out, Subprocesses(grid, out, base, model, 1, [sys.executable]))}
    smft, lora = results["smft"], results["lora"]
    assert 0 < smft["rows_changed"] <= 3 * 5 and lora["rows_changed"] == 0
    assert smft["trainable_per_step"] == 5 * 32  # top_t rows x v_dim, no dense parameter
    assert smft["optimizer_state_bytes"] == 0  # exact_sgd keeps no state, the dense model is frozen
    assert 0 < smft["row_top1pct_share"] <= smft["row_top10pct_share"] <= 1 and 0 <= smft["row_gini"] < 1
    assert "row_gini" not in lora  # no value row trains: no row_change.json
    # LoRA rank 2 on q, k, v, o (32 x 32) of both blocks and the SwiGLU of block 0 (32 <-> 96): r * (in + out) each
    assert lora["trainable_per_step"] == 2 * 4 * 2 * (32 + 32) + 3 * 2 * (32 + 96)
    assert lora["optimizer_state_bytes"] == 2 * 4 * lora["trainable_per_step"]  # AdamW: two fp32 moments per adapter weight
    assert set(smft) >= {"new_f1", "known_drop_pct", "nll_delta", "fuar"} and smft["params"] == {"method.top_t": 5}
    base_answers = [json.loads(x) for x in (out / "base" / "answers" / "step0" / "known_facts.jsonl").read_text().splitlines()]
    run_answers = [json.loads(x) for x in (out / "runs" / "smft_top_t5_s0" / "answers" / "step3" / "known_facts.jsonl").read_text().splitlines()]
    assert smft["known_lost"] == [b["index"] for b, a in zip(base_answers, run_answers) if b["contains"] == 1 and a["contains"] < 1]
    assert len(base_answers) == len(run_answers) == 4  # (the 2-step model knows none: fact by fact in the test below)
    assert smft["code"] == json.loads((out / "runs" / "smft_top_t5_s0" / "run.json").read_text())["git"] and smft["code"]["commit"]
    after = last_eval(out / "runs" / "smft_top_t5_s0" / "metrics.jsonl")  # forgetting measured on answer containment,
    assert smft["known_metric"] == "contains" and smft["known_drop_pct"] == pytest.approx(  # F1 kept as a probe
        100 * (base["known_facts/contains"] - after["known_facts/contains"]) / max(base["known_facts/contains"], 1e-9))
    assert smft["known_f1_drop_pct"] == pytest.approx(100 * (base["known_facts/f1"] - after["known_facts/f1"]) / max(base["known_facts/f1"], 1e-9))


def test_known_metric_is_chosen_by_the_grid_and_named_in_the_table(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("config: unused.yaml\nseeds: [0]\nknown_metric: contains\nmethods: {smft: {fixed: [method.name=smft]}}\n")
    assert load_grid(grid_file).known_metric == "contains"
    table = markdown(summarize([_result("smft", {"lr": 1}, 0, 0.5, 10)]), {**BASE, "known_facts/contains": 0.9}, (0.5,), "contains")
    assert "known-fact answer-contained 0.900" in table and "| known answer-contained drop % |" in table
    grid_file.write_text(grid_file.read_text().replace("contains", "recall"))
    with pytest.raises(SystemExit, match="known_metric 'recall' is not one of \\['contains', 'em', 'f1'\\]"):
        load_grid(grid_file)


def test_probes_are_recorded_where_both_evaluations_have_them():
    from benchmarks.pareto import probes

    base = {"known_same_answer/f1": 0.8, "known_other/f1": 0.5, "choice/acc": 0.6, "arithmetic/nll": 2.0}
    after = {"known_same_answer/f1": 0.6, "known_other/f1": 0.5, "choice/acc": 0.55}
    assert probes(base, after) == pytest.approx({"same_answer_drop_pct": 25.0, "other_drop_pct": 0.0, "choice_acc_delta": -0.05})
    with_probe = [{**_result("smft", {"lr": 1}, 0, 0.5, 10), "choice_acc_delta": -0.05}]
    table = markdown(summarize(with_probe), BASE)
    assert "choice acc Δ |" in table and "| -0.050 ± 0.000 |" in table and "arithmetic NLL Δ" not in table


def test_table_names_the_code_versions_its_runs_come_from(tmp_path):
    """From each record's ``code``, or (records written before it was kept) the run's run.json."""
    from benchmarks.pareto import code_versions, report

    clean, other = {"commit": "a" * 40, "dirty": False}, {"commit": "b" * 40, "dirty": True}
    results = [{**_result("smft", {"lr": 1}, s, 0.5, 10), "code": clean} for s in (0, 1)]
    assert code_versions(results) == "Code: every run at commit aaaaaaa (2 runs)."
    old = _result("smft", {"lr": 1}, 2, 0.5, 10)  # no "code": read from its run directory
    run_dir = tmp_path / "runs" / Run("smft", {"lr": 1}, 2).name
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"git": other, "world_size": 1}))
    line = code_versions([*results, old, _result("lora", {"lr": 1}, 0, 0.5, 10)], tmp_path / "runs")
    assert line.startswith("Code: the runs come from 3 code versions: aaaaaaa (2 runs), bbbbbbb (1 run, 1 with uncommitted changes), "
                           "unknown (1 run).")
    report([*results, old], BASE, tmp_path)
    assert (tmp_path / "pareto.md").read_text().startswith("Code: the runs come from 2 code versions: aaaaaaa (2 runs), bbbbbbb (1 run, 1 with")


def test_known_lost_names_the_facts_fact_by_fact(tmp_path):
    """From the base's and the run's answer files; F1 grids name the facts by containment."""
    from benchmarks.pareto import known_lost

    def write(d, contains, em):
        rows = [{"index": i, "question": f"q{i}", "answers": ["a"], "prediction": "p", "em": e, "f1": e, "contains": c}
                for i, (c, e) in enumerate(zip(contains, em))]
        (d / "answers" / "step0").mkdir(parents=True)
        (d / "answers" / "step0" / "known_facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    write(tmp_path / "base", [1, 1, 0, 1], [1, 0, 0, 1])
    write(tmp_path / "run", [0, 1, 1, 1], [0, 0, 1, 0])
    assert known_lost(tmp_path / "base", tmp_path / "run", "contains") == [0]
    assert known_lost(tmp_path / "base", tmp_path / "run", "em") == [0, 3]
    assert known_lost(tmp_path / "base", tmp_path / "run", "f1") == [0]
    assert known_lost(tmp_path / "base", tmp_path / "nothing", "contains") is None  # a run from before answers were written
