"""Learning vs forgetting Pareto fronts of the finetuning methods, over a grid and seeds.

    python -m benchmarks.pareto [--grid benchmarks/grids/cpu_scale.yaml] [--out runs/pareto] [--workers N] [--quick]
    python -m benchmarks.pareto --grid G --out O --task I     # run one (point, seed) only: SLURM array task I
    python -m benchmarks.pareto --grid G --out O --report     # table + plot from results.jsonl only
    python -m benchmarks.pareto --grid G --budgets 256        # only the runs of one pass budget (the rest later)

The grid file (YAML, ``benchmarks/grids/``) names the stage-2 config (starting model in
``train.init_from``, background statistics, eval tasks new_facts / known_facts / heldout), the seeds,
the pass budgets every method is swept over (``budgets: {train.steps: [...]}``, crossed with every
method's grid, so no method gets more passes than another), the new-fact F1 ``levels`` at which the
fronts are compared, the known-fact metric forgetting is measured on (``known_metric``: ``f1``, the
default, ``em`` or ``contains``, the share of known answers still inside the model's answer, which a
change of answer format alone does not move), and per method fixed overrides plus a grid of values;
``quick:`` overrides it for ``--quick``. Each (point, seed) is one ``python -m smft_dist.train`` run with
``data.seed = train.seed = seed`` and the continual stream shuffled (seed = data order and
selection/adapter seed). Finished runs are appended to ``OUT/results.jsonl``; a rerun skips them.

``OUT/pareto.md`` lists every point (those on their method's front marked) and compares the fronts
**at equal learning**: for each pass budget, and over all budgets, each method's known-fact drop
interpolated linearly along its front at the common new-fact F1 levels (seed std interpolated the
same way; a level outside a front's span is reported as not reached, never extrapolated), and the
drop of every method over full_ft's and lora's at each level. ``OUT/pareto.png`` plots known-fact F1
drop (% of the starting model) and held-out NLL change against new-fact F1, mean ± std over seeds,
fronts as lines, the pass budget as the marker.

Per run, beside F1 and NLL:

* FUAR (Jang et al. 2022, CKL): sum of forgotten score over the sum of updated + acquired score,
  each gap clipped at 0. Here T_F = known facts (points of the known metric lost), T_U = none (the synthetic world
  changes no fact), T_A = new facts (F1 points gained): FUAR = max(0, known F1 drop) / max(0, new F1
  gain); undefined (null) when nothing was acquired. < 1: more acquired than forgotten.
* rows changed: value-table rows that differ between the starting model and the exported result.
* trainable parameters per step: trainable dense (or LoRA) parameters + v_dim x the value rows a
  step trains (smft: the selected rows; memory_ft / full_ft: the distinct slots read, from the
  run's memory-usage log; lora: none).
* optimizer-state bytes: fp32 AdamW moments of the trainable dense (or LoRA) parameters plus the
  value-row optimizer's state (exact_sgd: none; exact_rowwise_adagrad: one float per row; adamw and
  adam: two per element; partial_rowwise_adam: one per element and one per row).
* seconds: the run's wall time (training and its final evaluation).
* known_lost: the indices of the known facts the run lost (right at the start, wrong after: from
  both evaluations' ``answers/`` files), so runs can be compared fact by fact.
* code: the git commit (and whether tracked files had uncommitted changes) the run recorded in its
  ``run.json``; ``pareto.md`` says how many code versions its points come from.
* how concentrated the change of the value rows is (``row_change.json`` of the run): the share of the
  squared update norm the largest 1% / 10% of the changed rows carry, the Gini coefficient of the
  changed rows' norms and, where the run logged its selections (``train.log_selected_slots``), the
  share carried by rows trained by more than one fact.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, NamedTuple

import yaml

from smft_dist.data.schemas import DataError
from smft_dist.eval.answer_changes import answer_metric, answers_file, load_answers
from smft_dist.eval.answer_changes import changes as answer_changes
from smft_dist.eval.report import last_eval

DEFAULT_GRID = "benchmarks/grids/cpu_scale.yaml"
REFERENCES = ("full_ft", "lora")  # baselines every method's drop is divided by, at equal learning
BUDGET = "train.steps"  # the pass budget: optimizer steps over the continual stream
DEFAULT_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9)
KNOWN_METRICS = {"f1": "F1", "em": "EM", "contains": "answer-contained"}  # qa metric -> its name in tables


class Probe(NamedTuple):
    """An optional eval task of the stage-2 config, recorded as a drop in % of the start or a change."""

    key: str  # task/metric
    relative: bool  # drop in % of the starting model's value (else: the change)
    header: str
    digits: int


PROBES = {
    "known_f1_drop_pct": Probe("known_facts/f1", True, "known F1 drop % (format-sensitive)", 1),  # grids on another known_metric
    "same_answer_drop_pct": Probe("known_same_answer/f1", True, "drop %, same answer as a new fact", 1),
    "other_drop_pct": Probe("known_other/f1", True, "drop %, other known facts", 1),
    "choice_acc_delta": Probe("choice/acc", False, "choice acc Δ", 3),
    "arithmetic_nll_delta": Probe("arithmetic/nll", False, "arithmetic NLL Δ", 4),
}
ROW_CHANGE = {  # figures of the run's row_change.json (smft_dist.analysis.row_change), over all its value tables
    "row_top1pct_share": "top1pct_share", "row_top10pct_share": "top10pct_share", "row_gini": "gini"}
METRICS = ("new_f1", "known_drop_pct", "nll_delta", "fuar", "rows_changed", "trainable_per_step", "optimizer_state_bytes", "seconds",
           *PROBES, *ROW_CHANGE, "shared_rows_norm_sq_share")


class Run(NamedTuple):
    """One training run of the sweep: a method, its grid values (override -> value) and a seed."""

    method: str
    params: dict
    seed: int

    @property
    def key(self) -> str:
        return json.dumps([self.method, sorted(self.params.items()), self.seed])

    @property
    def name(self) -> str:
        vals = "_".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in sorted(self.params.items()))
        return f"{self.method}_{vals}_s{self.seed}".replace("/", "-")


class Grid(NamedTuple):
    config: str
    seeds: list[int]
    methods: dict  # method -> {"fixed": [overrides], "grid": {override: [values]}}
    overrides: list[str]  # applied to every run
    budgets: dict = {}  # override -> values crossed with every method's grid (the pass budgets)
    levels: tuple = DEFAULT_LEVELS  # new-fact F1 levels the fronts are compared at
    known_metric: str = "f1"  # the known-fact metric forgetting is measured on (KNOWN_METRICS)


def load_grid(path: str | Path, quick: bool = False) -> Grid:
    """The grid file, with its ``quick:`` section merged over it when ``quick``. A method whose
    ``fixed`` or ``grid`` sets a ``budgets`` key is refused: budgets are the same for every method."""
    data = yaml.safe_load(Path(path).read_text())
    if quick:
        data = {**data, **(data.get("quick") or {})}
    grid = Grid(data["config"], list(data["seeds"]), data["methods"], list(data.get("overrides") or []),
                dict(data.get("budgets") or {}), tuple(data.get("levels") or DEFAULT_LEVELS), data.get("known_metric", "f1"))
    if grid.known_metric not in KNOWN_METRICS:
        raise SystemExit(f"benchmarks.pareto: {path}: known_metric {grid.known_metric!r} is not one of {sorted(KNOWN_METRICS)}")
    for method, spec in grid.methods.items():
        own = set(spec.get("grid") or {}) | {o.split("=", 1)[0] for o in spec.get("fixed") or []}
        if own & set(grid.budgets):
            raise SystemExit(f"benchmarks.pareto: {path}: method {method} sets {sorted(own & set(grid.budgets))}, "
                             "which budgets: sets for every method")
    return grid


def expand(grid: Grid) -> list[Run]:
    """Every (method, budget, grid point, seed), in grid order, seeds innermost."""
    runs = []
    for method, spec in grid.methods.items():
        axes = {**grid.budgets, **(spec.get("grid") or {})}
        for values in itertools.product(*axes.values()):
            for seed in grid.seeds:
                runs.append(Run(method, dict(zip(axes, values)), seed))
    return runs


def budget_of(grid: Grid, method: str, params: dict) -> int:
    """The pass budget (``train.steps``) a point of ``method`` ran with: its own value, else the last
    override setting it, else the stage-2 config's."""
    if BUDGET in params:
        return int(params[BUDGET])
    for override in reversed([*grid.overrides, *(grid.methods.get(method, {}).get("fixed") or [])]):
        key, _, value = override.partition("=")
        if key == BUDGET:
            return int(value)
    from smft_dist.config import load_config

    return load_config(grid.config).train.steps


def train_args(grid: Grid, run: Run, out: Path) -> list[str]:
    """``smft_dist.train`` arguments of ``run``, writing to ``out``."""
    return ["--config", grid.config, f"train.out_dir={out}", f"checkpoint.dir={out}/ckpt", "checkpoint.interval=0",
            "checkpoint.keep_last=1", "train.export_hf=true", "train.log_every=1", f"data.seed={run.seed}",
            f"train.seed={run.seed}", "data.continual.shuffle=true", *grid.overrides,
            *grid.methods[run.method].get("fixed", []), *(f"{k}={v}" for k, v in run.params.items())]


# ------------------------------------------------------------------------------- per-run figures
def fuar(known_drop: float, new_gain: float) -> float | None:
    """FUAR with no updated set: forgotten / acquired, each clipped at 0; None when nothing acquired."""
    acquired = max(0.0, new_gain)
    return max(0.0, known_drop) / acquired if acquired > 0 else None


def rows_changed(before: Path, after: Path) -> int:
    """Value-table rows that differ between two exported models (``model.safetensors``)."""
    from safetensors import safe_open

    changed = 0
    with safe_open(str(before / "model.safetensors"), "pt") as a, safe_open(str(after / "model.safetensors"), "pt") as b:
        for name in a.keys():
            if ".value_tables." in name:
                changed += int((a.get_tensor(name) != b.get_tensor(name)).any(1).sum())
    return changed


def _method_plan(run_dir: Path):
    """The run's config, its model on the meta device (no memory allocated) and its method's plan."""
    import torch

    from smft_dist.config import load_config
    from smft_dist.model.transformer import Transformer
    from smft_dist.smft.methods import apply_method

    cfg = load_config(run_dir / "config.yaml")
    with torch.device("meta"):
        model = Transformer(cfg.model, build_value_tables=False)
    return cfg, model, apply_method(model, dataclasses.replace(cfg.method, ranking="all"))


def trainable_per_step(run_dir: Path) -> float:
    """Trainable dense / adapter parameters + v_dim x value rows trained per step (see module doc)."""
    cfg, model, plan = _method_plan(run_dir)
    dense = sum(p.numel() for p in plan.dense_params)
    if not plan.values_train:
        return float(dense)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if cfg.method.name == "smft":
        steps = [sum(v for k, v in x.items() if k.startswith("rows_trained/")) for x in lines if x["split"] == "train"]
    else:
        steps = [sum(v for k, v in x.items() if k.endswith("/slots_per_forward")) for x in lines if x["split"] == "memory"]
    return dense + cfg.model.value_dim * (sum(steps) / max(len(steps), 1))


FP32 = 4
ROW_STATE_FLOATS = {  # value-row optimizer: fp32 state per (element, row) of a table
    "exact_sgd": (0, 0), "exact_rowwise_adagrad": (0, 1), "adamw": (2, 0), "adam": (2, 0), "partial_rowwise_adam": (1, 1)}


def optimizer_state_bytes(run_dir: Path) -> int:
    """Bytes of optimizer state the run's method keeps (:func:`method_state_bytes`)."""
    return method_state_bytes(*_method_plan(run_dir))


def method_state_bytes(cfg, model, plan) -> int:
    """Bytes of optimizer state a method keeps (see module doc): AdamW's two fp32 moments per
    trainable dense / adapter parameter, plus the value-row optimizer's state over every table."""
    total = 2 * FP32 * sum(p.numel() for p in plan.dense_params)
    if plan.values_train:
        per_element, per_row = ROW_STATE_FLOATS[cfg.sparse_optim.type]
        rows = cfg.model.memory.num_slots * len({layer.table_name for layer in model.memory_layers()})
        total += FP32 * rows * (per_element * cfg.model.value_dim + per_row)
    return total


def probes(base: dict, after: dict, skip: tuple = ()) -> dict:
    """The optional probes (:data:`PROBES`) both evaluations have: known facts that share an answer
    with the new facts vs the others (drop in % of the start), multiple choice, arithmetic NLL."""
    out = {}
    for field, probe in PROBES.items():
        if probe.key in base and probe.key in after and probe.key not in skip:
            change = after[probe.key] - base[probe.key]
            out[field] = -100 * change / max(base[probe.key], 1e-9) if probe.relative else change
    return out


def row_change(run_dir: Path) -> dict:
    """How concentrated the run's change of the value rows is (its ``row_change.json``): the squared
    update norm carried by the largest 1% / 10% of the changed rows, the Gini coefficient of their
    norms and, where the run logged its selections, the share carried by rows trained by more than
    one fact. Empty where the run wrote none (no value row trains: lora)."""
    path = run_dir / "row_change.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    out = {field: report["all"][key] for field, key in ROW_CHANGE.items()}
    splits = [t["by_sharing"]["buckets"] for t in report["tables"].values() if "by_sharing" in t]
    if splits and len(splits) == len(report["tables"]) == 1:
        out["shared_rows_norm_sq_share"] = sum(b["norm_sq_share"] for b in splits[0] if b["trained_by"] not in ("0", "1"))
    return out


def run_code(run_dir: Path) -> dict | None:
    """The git commit and dirty flag a run recorded in ``run.json`` (None where it recorded none)."""
    path = run_dir / "run.json"
    return json.loads(path.read_text()).get("git") if path.is_file() else None


def known_lost(base_dir: Path, run_dir: Path, known_metric: str) -> list[int] | None:
    """Indices of the known facts right at the start and wrong after the run (by ``known_metric``, or
    containment where that is F1); None where either evaluation wrote no answers."""
    try:
        files = [answers_file(d, "known_facts") for d in (base_dir, run_dir)]
    except DataError:
        return None
    return answer_changes(*(load_answers(f) for f in files), answer_metric(known_metric))[0]


def measure(run: Run, run_dir: Path, base: dict, base_model: Path, seconds: float, known_metric: str = "f1",
            base_dir: Path | None = None) -> dict:
    """The result record of a finished run; forgetting is the drop of ``known_facts/<known_metric>``
    (``base_dir``: the starting model's evaluation, whose answers name the facts lost)."""
    after = last_eval(run_dir / "metrics.jsonl")
    known = f"known_facts/{known_metric}"
    known_drop = base[known] - after[known]
    new_gain = after["new_facts/f1"] - base["new_facts/f1"]
    return {**probes(base, after, skip=(known,)), **row_change(run_dir),
        "key": run.key, "method": run.method, "params": run.params, "seed": run.seed,
        "new_f1": after["new_facts/f1"], "known_f1": after["known_facts/f1"], "known_metric": known_metric,
        "known_drop_pct": 100 * known_drop / max(base[known], 1e-9),
        "nll_delta": after["heldout/nll"] - base["heldout/nll"], "fuar": fuar(known_drop, new_gain),
        "rows_changed": rows_changed(base_model, run_dir / "hf"), "trainable_per_step": trainable_per_step(run_dir),
        "optimizer_state_bytes": optimizer_state_bytes(run_dir), "seconds": seconds, "code": run_code(run_dir),
        "known_lost": known_lost(base_dir, run_dir, known_metric) if base_dir is not None else None,
    }


# ------------------------------------------------------------------------------- sweep runner
def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def sweep(runs: list[Run], out: Path, run_one: Callable[[Run], dict], workers: int = 1) -> list[dict]:
    """Run every run not yet in ``out/results.jsonl`` (``workers`` at a time), appending each result
    as it finishes; returns all results."""
    path = out / "results.jsonl"
    done = {r["key"] for r in load_results(path)}
    todo = [r for r in runs if r.key not in done]
    total = len(done) + len(todo)
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=workers) as pool, open(path, "a") as f:
        futures = {pool.submit(run_one, r): r for r in todo}
        for future in as_completed(futures):
            if future.exception() is not None:  # runs already going finish; none starts, the error ends the sweep
                pool.shutdown(wait=True, cancel_futures=True)
                future.result()
            f.write(json.dumps(future.result()) + "\n")
            f.flush()
            done.add(futures[future].key)
            print(f"pareto: finished {futures[future].name} ({len(done)}/{total})", flush=True)
    return load_results(path)


class Subprocesses:
    """Runs a (point, seed) as ``smft_dist.train`` in a subprocess with ``threads`` CPU threads."""

    def __init__(self, grid: Grid, out: Path, base: dict, base_model: Path, threads: int, launcher: list[str]):
        self.grid, self.out, self.base, self.base_model, self.threads, self.launcher = grid, out, base, base_model, threads, launcher

    def __call__(self, run: Run) -> dict:
        run_dir = self.out / "runs" / run.name
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run restarts, never resumes half-way
        t0 = time.perf_counter()
        log = self.out / "logs" / f"{run.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            proc = subprocess.run([*self.launcher, "-m", "smft_dist.train", *train_args(self.grid, run, run_dir)],
                                  env=run_env(self.threads), stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode:
            raise SystemExit(f"benchmarks.pareto: {run.name} failed (exit {proc.returncode}); see {log}")
        record = measure(run, run_dir, self.base, self.base_model, time.perf_counter() - t0, self.grid.known_metric, self.out / "base")
        shutil.rmtree(run_dir / "ckpt", ignore_errors=True)
        shutil.rmtree(run_dir / "hf", ignore_errors=True)
        return record


def run_env(threads: int) -> dict[str, str]:
    """Fixed thread counts (the CPU kernels' reduction order depends on them) and quiet libraries;
    DeepSpeed picks its accelerator itself (CUDA where there is one)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def base_eval(grid: Grid, out: Path, threads: int) -> tuple[dict, Path]:
    """Eval metrics of the starting model (cached in ``out/base``) and its path."""
    from smft_dist.config import load_config

    cfg = load_config(grid.config, grid.overrides)
    model = Path(cfg.train.init_from or "")
    if not (model / "config.json").is_file():
        raise SystemExit(f"benchmarks.pareto: starting model {model} not found (run the grid's stage-1 launcher first)")
    metrics = out / "base" / "metrics.jsonl"
    if not metrics.is_file():
        cmd = [sys.executable, "-m", "smft_dist.evaluate", "--config", grid.config, "--model", str(model), "--out", str(out / "base"), *grid.overrides]
        subprocess.run(cmd, check=True, env=run_env(threads), stdout=subprocess.DEVNULL)
    return last_eval(metrics), model


# ------------------------------------------------------------------------------- fronts
class Point(NamedTuple):
    """A grid point's figures over its seeds: metric -> (mean, std); std is the sample std (0 for one
    seed). ``budget``: the pass budget it ran with (None where unknown)."""

    method: str
    params: dict
    seeds: int
    stats: dict
    budget: int | None = None

    def mean(self, metric: str) -> float:
        return self.stats[metric][0]


def mean_std(values: list[float | None]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return (math.nan, math.nan)
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return (m, math.sqrt(var))


def summarize(results: list[dict], budget: Callable[[str, dict], int | None] = lambda method, params: params.get(BUDGET)) -> list[Point]:
    """Group results by (method, params) and reduce every metric over the seeds (a metric an older
    record lacks counts as missing); ``budget(method, params)`` names each point's pass budget."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        groups[json.dumps([r["method"], sorted(r["params"].items())])].append(r)
    return [Point(rs[0]["method"], rs[0]["params"], len(rs), {m: mean_std([r.get(m) for r in rs]) for m in METRICS},
                  budget(rs[0]["method"], rs[0]["params"]))
            for rs in groups.values()]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (maximize x = learning, minimize y = forgetting), by
    increasing x. A point is dominated when another is at least as good in both and better in one;
    equal points dominate neither, so both stay on the front."""
    front = [
        i for i, (x, y) in enumerate(points)
        if not any(x2 >= x and y2 <= y and (x2 > x or y2 < y) for x2, y2 in points)
    ]
    return sorted(front, key=lambda i: (points[i][0], points[i][1], i))


def fronts(points: list[Point]) -> dict[str, list[Point]]:
    """Each method's front on the seed means of (new F1, known-fact drop %), by increasing new F1."""
    by_method: dict[str, list[Point]] = defaultdict(list)
    for p in points:
        by_method[p.method].append(p)
    return {m: [ps[i] for i in pareto_front([(p.mean("new_f1"), p.mean("known_drop_pct")) for p in ps])] for m, ps in by_method.items()}


def drop_at(front: list[Point], level: float) -> tuple[float, float] | None:
    """Known-fact drop (mean, std) at new F1 ``level`` on ``front`` (by increasing new F1): linear
    between the two front points around it; below the front's lowest point that point's drop (it
    learns more than ``level`` and forgets no more than the method need: an upper bound, see
    :func:`below_front`); None above the front (not reached, never extrapolated). Along a front the
    drop does not decrease with learning, so where points tie in new F1 the lowest drop counts."""
    xs = [p.mean("new_f1") for p in front]
    if not front or level > xs[-1]:
        return None
    if level < xs[0]:
        return front[0].stats["known_drop_pct"]
    at = [p.stats["known_drop_pct"] for p, x in zip(front, xs) if x == level]
    if at:
        return min(at)
    i = next(i for i, x in enumerate(xs) if x > level)
    w = (level - xs[i - 1]) / (xs[i] - xs[i - 1])
    (m0, s0), (m1, s1) = front[i - 1].stats["known_drop_pct"], front[i].stats["known_drop_pct"]
    return (m0 + w * (m1 - m0), s0 + w * (s1 - s0))


def below_front(front: list[Point], level: float) -> bool:
    """``level`` lies below the front's lowest new F1: :func:`drop_at` gives an upper bound there."""
    return bool(front) and level < front[0].mean("new_f1")


def ratio(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """a / b with the two stds propagated to first order; nan where b's mean is not positive; 0 where
    a's is not (known facts rose or held: nothing forgotten)."""
    (ma, sa), (mb, sb) = a, b
    if mb <= 0:
        return math.nan, math.nan
    if ma <= 0:
        return 0.0, 0.0
    r = ma / mb
    return r, abs(r) * math.hypot(sa / ma if ma else 0.0, sb / mb)


def equal_learning(points: list[Point], levels: tuple) -> dict[str, dict[float, tuple[float, float] | None]]:
    """Per method, its front's known-fact drop at each new-F1 level (None: not reached)."""
    return {m: {level: drop_at(front, level) for level in levels} for m, front in sorted(fronts(points).items())}


def _fmt(stat: tuple[float, float] | None, digits: int) -> str:
    if stat is None:
        return "—"
    m, s = stat
    return "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _setting(p: Point) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in p.params.items() if k != BUDGET)


def _mib(stat: tuple[float, float]) -> str:
    return "n/a" if math.isnan(stat[0]) else f"{stat[0] / 2**20:.1f}"


def equal_learning_table(points: list[Point], levels: tuple, title: str) -> list[str]:
    """Markdown: drop per method and level, then each method's drop over every reference's."""
    drops, method_fronts = equal_learning(points, levels), fronts(points)
    methods = list(drops)
    pairs = [(m, ref) for ref in REFERENCES if ref in drops for m in methods if m != ref]
    lines = ["", f"### {title}", "", "| new F1 | " + " | ".join(f"{m} drop %" for m in methods)
             + "".join(f" | {m} / {ref}" for m, ref in pairs) + " |", "|---" * (1 + len(methods) + len(pairs)) + "|"]
    for level in levels:
        bound = {m: below_front(method_fronts[m], level) for m in methods}
        cells = [("≤ " if bound[m] and drops[m][level] else "") + _fmt(drops[m][level], 1) for m in methods]
        for m, ref in pairs:
            if not (drops[m][level] and drops[ref][level]) or (bound[m] and bound[ref]):
                cells.append("—")
            else:  # a bound over an exact drop bounds the ratio from above, an exact drop over a bound from below
                cells.append({(True, False): "≤ ", (False, True): "≥ "}.get((bound[m], bound[ref]), "")
                             + _fmt(ratio(drops[m][level], drops[ref][level]), 2))
        lines.append(f"| {level:.2f} | " + " | ".join(cells) + " |")
    spans = []
    for m, front in sorted(method_fronts.items()):
        spans.append(f"{m} {front[0].mean('new_f1'):.3f}–{front[-1].mean('new_f1'):.3f}")
    lines += ["", "Front spans (new F1): " + ", ".join(spans) + ". — above a front's span: not reached (never "
              "extrapolated); ≤ below it: the drop of its lowest-learning point, which learns more than the level "
              "(the method reaches the level forgetting at most that)."]
    return lines


def markdown(points: list[Point], base: dict, levels: tuple = DEFAULT_LEVELS, known_metric: str = "f1") -> str:
    """Every point (those on their method's front marked), then the fronts compared at equal learning:
    per pass budget that at least two methods ran, then over all budgets."""
    known = KNOWN_METRICS[known_metric]
    lines = [f"Starting model: new-fact F1 {base['new_facts/f1']:.3f}, known-fact {known} {base[f'known_facts/{known_metric}']:.3f}, "
             f"held-out NLL {base['heldout/nll']:.4f}. Mean ± std over seeds; front: on its method's Pareto front over all budgets; "
             "budget: train.steps.", "",
             f"| method | setting | budget | front | seeds | new F1 | known {known} drop % | held-out NLL Δ | FUAR | rows changed "
             "| top 1% rows' share of Δ² | Gini of row Δ | trainable / step | optimizer state MiB | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    on_front = {id(p) for front in fronts(points).values() for p in front}
    shown = [f for f in PROBES if any(not math.isnan(p.mean(f)) for p in points)]
    if shown:
        lines[2] += "".join(f" {PROBES[f].header} |" for f in shown)
        lines[3] += "---|" * len(shown)
    for p in sorted(points, key=lambda p: (p.method, p.budget or 0)):
        lines.append(f"| {p.method} | {_setting(p)} | {p.budget if p.budget is not None else ''} | {'yes' if id(p) in on_front else ''} | "
                     f"{p.seeds} | {_fmt(p.stats['new_f1'], 3)} | {_fmt(p.stats['known_drop_pct'], 1)} | {_fmt(p.stats['nll_delta'], 4)} | "
                     f"{_fmt(p.stats['fuar'], 2)} | {_fmt(p.stats['rows_changed'], 0)} | {_fmt(p.stats['row_top1pct_share'], 2)} | "
                     f"{_fmt(p.stats['row_gini'], 2)} | {_fmt(p.stats['trainable_per_step'], 0)} | "
                     f"{_mib(p.stats['optimizer_state_bytes'])} | {_fmt(p.stats['seconds'], 0)} |"
                     + "".join(f" {_fmt(p.stats[f], PROBES[f].digits)} |" for f in shown))
    lines += ["", "## At equal learning", "",
              "Each method's known-fact drop (%) interpolated along its front at the same new-fact F1 (— and ≤: see "
              "below each table). Ratios: drop over the reference's at that level (seed stds propagated; 0 where the "
              f"method's known-fact {known} did not fall)."]
    budgets = defaultdict(set)
    for p in points:
        budgets[p.budget].add(p.method)
    for b in sorted((b for b, ms in budgets.items() if b is not None and len(ms) > 1)):
        lines += equal_learning_table([p for p in points if p.budget == b], levels, f"Budget train.steps={b}")
    if len(budgets) > 1 or None in budgets:
        shared = set.intersection(*(set(p.budget for p in points if p.method == m) for m in {p.method for p in points}))
        note = "" if all(set(p.budget for p in points if p.method == m) == shared for m in {p.method for p in points}) else \
            " (methods ran different budgets: not an equal-budget comparison)"
        lines += equal_learning_table(points, levels, f"Any budget: each method's front over all its points{note}")
    return "\n".join(lines) + "\n"


MARKERS = "osD^vP*X"


def plot(points: list[Point], path: Path, known_metric: str = "f1") -> None:
    """Two panels against new-fact F1: known-fact drop % (with each method's front as a line) and
    held-out NLL change; error bars are the std over seeds, the marker is the pass budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    front_of = fronts(points)
    budgets = sorted({p.budget for p in points}, key=lambda b: (b is None, b or 0))
    marker = {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(budgets)}
    for i, method in enumerate(sorted({p.method for p in points})):
        color = f"C{i}"
        for p in (p for p in points if p.method == method):
            for ax, metric in ((ax1, "known_drop_pct"), (ax2, "nll_delta")):
                ax.errorbar([p.mean("new_f1")], [p.mean(metric)], xerr=[p.stats["new_f1"][1]], yerr=[p.stats[metric][1]],
                            fmt=marker[p.budget], color=color, alpha=0.6, capsize=2)
        front = front_of[method]
        ax1.plot([p.mean("new_f1") for p in front], [p.mean("known_drop_pct") for p in front], "-", color=color, label=method)
    for b in budgets:
        ax1.plot([], [], marker[b], color="gray", label=f"{BUDGET}={b}" if b is not None else "budget unknown")
    ax1.set(xlabel="new-fact F1 (learning)", ylabel=f"known-fact {KNOWN_METRICS[known_metric]} drop, % of start (forgetting)", title="learning vs forgetting")
    ax2.set(xlabel="new-fact F1 (learning)", ylabel="held-out NLL change", title="held-out text")
    ax1.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def code_versions(results: list[dict], runs_dir: Path | None = None) -> str:
    """One line naming the code versions the results come from; a record without ``code`` (written
    before pareto recorded it) is read from its run directory's ``run.json`` under ``runs_dir``."""
    runs, dirty = defaultdict(int), defaultdict(int)  # commit -> runs, of which with uncommitted changes
    for r in results:
        code = r.get("code")
        if code is None and runs_dir is not None:
            code = run_code(runs_dir / Run(r["method"], r["params"], r["seed"]).name)
        commit = (code or {}).get("commit")
        commit = commit[:7] if commit else "unknown"
        runs[commit] += 1
        dirty[commit] += bool((code or {}).get("dirty"))
    parts = [f"{c} ({n} run{'s' * (n != 1)}{f', {dirty[c]} with uncommitted changes' if dirty[c] else ''})"
             for c, n in sorted(runs.items(), key=lambda kv: -kv[1])]
    if len(runs) == 1 and "unknown" not in runs and not any(dirty.values()):
        return f"Code: every run at commit {parts[0]}."
    return (f"Code: the runs come from {len(runs)} code version{'s' * (len(runs) != 1)}: {', '.join(parts)}. Differences between "
            "points are effects of their settings only where no change between these versions touched the numerics (check `git log`).")


def report(results: list[dict], base: dict, out: Path, grid: Grid | None = None) -> None:
    """Write ``out/pareto.md`` and ``out/pareto.png``; ``grid`` names each point's pass budget."""
    points = summarize(results, (lambda m, params: budget_of(grid, m, params)) if grid else (lambda m, params: params.get(BUDGET)))
    known_metric = grid.known_metric if grid else "f1"
    table = markdown(points, base, grid.levels if grid else DEFAULT_LEVELS, known_metric)
    (out / "pareto.md").write_text(f"{code_versions(results, out / 'runs')}\n\n{table}")
    print((out / "pareto.md").read_text())
    plot(points, out / "pareto.png", known_metric)
    print(f"pareto: plot -> {out / 'pareto.png'}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default=DEFAULT_GRID, help="grid YAML (benchmarks/grids/)")
    p.add_argument("--out", default=None, help="output directory (default runs/pareto_<grid name>[_quick])")
    p.add_argument("--quick", action="store_true", help="the grid file's quick: subset")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel processes")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: cores / workers)")
    p.add_argument("--launcher", default=sys.executable, help="command running python modules, e.g. 'torchrun --nproc-per-node 8'")
    p.add_argument("--task", type=int, default=None, help="run only the I-th (1-based) run of the grid (SLURM array)")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="run only these pass budgets of the grid (train.steps), e.g. one budget first")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="run only these seeds of the grid, e.g. one seed of every point first")
    p.add_argument("--list", action="store_true", help="print the number of runs and exit")
    p.add_argument("--report", action="store_true", help="only write the table and plot from results.jsonl")
    args = p.parse_args(argv)
    grid = load_grid(args.grid, args.quick)
    runs = expand(grid)
    if args.budgets:
        unknown = set(args.budgets) - set(grid.budgets.get(BUDGET, []))
        if unknown:
            raise SystemExit(f"benchmarks.pareto: --budgets {sorted(unknown)} not in the grid's budgets {grid.budgets.get(BUDGET, [])}")
        runs = [r for r in runs if r.params[BUDGET] in args.budgets]
    if args.seeds:
        if set(args.seeds) - set(grid.seeds):
            raise SystemExit(f"benchmarks.pareto: --seeds {sorted(set(args.seeds) - set(grid.seeds))} not in the grid's seeds {grid.seeds}")
        runs = [r for r in runs if r.seed in args.seeds]
    if args.list:
        print(len(runs))
        return
    out = Path(args.out or f"runs/pareto_{Path(args.grid).stem}{'_quick' if args.quick else ''}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    base, base_model = base_eval(grid, out, threads)
    if not args.report:
        if args.task is not None:
            if not 1 <= args.task <= len(runs):
                raise SystemExit(f"benchmarks.pareto: --task {args.task} is not in [1, {len(runs)}]")
            runs = [runs[args.task - 1]]
        sweep(runs, out, Subprocesses(grid, out, base, base_model, threads, shlex.split(args.launcher)), args.workers)
        if args.task is not None:
            return
    report(load_results(out / "results.jsonl"), base, out, grid)


if __name__ == "__main__":
    main()
