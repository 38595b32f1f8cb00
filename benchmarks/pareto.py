"""Learning vs forgetting Pareto fronts of the finetuning methods, over a grid and seeds.

    python -m benchmarks.pareto [--grid benchmarks/grids/cpu_scale.yaml] [--out runs/pareto] [--workers N] [--quick]
    python -m benchmarks.pareto --grid G --out O --task I     # run one (point, seed) only: SLURM array task I
    python -m benchmarks.pareto --grid G --out O --report     # table + plot from results.jsonl only

The grid file (YAML, ``benchmarks/grids/``) names the stage-2 config (starting model in
``train.init_from``, background statistics, eval tasks new_facts / known_facts / heldout), the seeds,
and per method fixed overrides plus a grid of values; ``quick:`` overrides it for ``--quick``. Each
(point, seed) is one ``python -m smft_dist.train`` run with ``data.seed = train.seed = seed`` and the
continual stream shuffled (seed = data order and selection/adapter seed). Finished runs are appended
to ``OUT/results.jsonl``; a rerun skips them. ``OUT/pareto.md`` holds the front points and the
matched-learning comparisons (against full_ft's and lora's best-learning points), ``OUT/pareto.png`` the plot (x: new-fact F1, y: known-fact F1 drop in %
of the starting model; second panel: held-out NLL change), mean ± std over seeds.

Per run, beside F1 and NLL:

* FUAR (Jang et al. 2022, CKL): sum of forgotten score over the sum of updated + acquired score,
  each gap clipped at 0. Here T_F = known facts (F1 points lost), T_U = none (the synthetic world
  changes no fact), T_A = new facts (F1 points gained): FUAR = max(0, known F1 drop) / max(0, new F1
  gain); undefined (null) when nothing was acquired. < 1: more acquired than forgotten.
* rows changed: value-table rows that differ between the starting model and the exported result.
* trainable parameters per step: trainable dense (or LoRA) parameters + v_dim x the value rows a
  step trains (smft: the selected rows; memory_ft / full_ft: the distinct slots read, from the
  run's memory-usage log; lora: none).
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

from smft_dist.eval.report import last_eval

DEFAULT_GRID = "benchmarks/grids/cpu_scale.yaml"
MATCH_REFERENCES = ("full_ft", "lora")  # baselines the matched-learning comparison is read against
METRICS = ("new_f1", "known_drop_pct", "nll_delta", "fuar", "rows_changed", "trainable_per_step")


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


def load_grid(path: str | Path, quick: bool = False) -> Grid:
    """The grid file, with its ``quick:`` section merged over it when ``quick``."""
    data = yaml.safe_load(Path(path).read_text())
    if quick:
        data = {**data, **(data.get("quick") or {})}
    return Grid(data["config"], list(data["seeds"]), data["methods"], list(data.get("overrides") or []))


def expand(grid: Grid) -> list[Run]:
    """Every (method, grid point, seed), points in grid order, seeds innermost."""
    runs = []
    for method, spec in grid.methods.items():
        axes = spec.get("grid") or {}
        for values in itertools.product(*axes.values()):
            for seed in grid.seeds:
                runs.append(Run(method, dict(zip(axes, values)), seed))
    return runs


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


def trainable_per_step(run_dir: Path) -> float:
    """Trainable dense / adapter parameters + v_dim x value rows trained per step (see module doc)."""
    import torch

    from smft_dist.config import load_config
    from smft_dist.model.transformer import Transformer
    from smft_dist.smft.methods import apply_method

    cfg = load_config(run_dir / "config.yaml")
    with torch.device("meta"):
        model = Transformer(cfg.model, build_value_tables=False)
    plan = apply_method(model, dataclasses.replace(cfg.method, ranking="all"))
    dense = sum(p.numel() for p in plan.dense_params)
    if not plan.values_train:
        return float(dense)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if cfg.method.name == "smft":
        steps = [sum(v for k, v in x.items() if k.startswith("rows_trained/")) for x in lines if x["split"] == "train"]
    else:
        steps = [sum(v for k, v in x.items() if k.endswith("/slots_per_forward")) for x in lines if x["split"] == "memory"]
    return dense + cfg.model.value_dim * (sum(steps) / max(len(steps), 1))


def measure(run: Run, run_dir: Path, base: dict, base_model: Path, seconds: float) -> dict:
    """The result record of a finished run."""
    after = last_eval(run_dir / "metrics.jsonl")
    known_drop = base["known_facts/f1"] - after["known_facts/f1"]
    new_gain = after["new_facts/f1"] - base["new_facts/f1"]
    return {
        "key": run.key, "method": run.method, "params": run.params, "seed": run.seed,
        "new_f1": after["new_facts/f1"], "known_f1": after["known_facts/f1"],
        "known_drop_pct": 100 * known_drop / max(base["known_facts/f1"], 1e-9),
        "nll_delta": after["heldout/nll"] - base["heldout/nll"], "fuar": fuar(known_drop, new_gain),
        "rows_changed": rows_changed(base_model, run_dir / "hf"), "trainable_per_step": trainable_per_step(run_dir),
        "seconds": seconds,
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
        record = measure(run, run_dir, self.base, self.base_model, time.perf_counter() - t0)
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
    """A grid point's figures over its seeds: metric -> (mean, std); std is the sample std (0 for one seed)."""

    method: str
    params: dict
    seeds: int
    stats: dict

    def mean(self, metric: str) -> float:
        return self.stats[metric][0]


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return (math.nan, math.nan)
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return (m, math.sqrt(var))


def summarize(results: list[dict]) -> list[Point]:
    """Group results by (method, params) and reduce every metric over the seeds."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        groups[json.dumps([r["method"], sorted(r["params"].items())])].append(r)
    return [Point(rs[0]["method"], rs[0]["params"], len(rs), {m: mean_std([r[m] for r in rs]) for m in METRICS})
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
    """Each method's front on the seed means of (new F1, known-fact drop %)."""
    by_method: dict[str, list[Point]] = defaultdict(list)
    for p in points:
        by_method[p.method].append(p)
    return {m: [ps[i] for i in pareto_front([(p.mean("new_f1"), p.mean("known_drop_pct")) for p in ps])] for m, ps in by_method.items()}


def matched_learning(points: list[Point], reference: str = "full_ft", tolerance: float = 0.05) -> dict[str, Point]:
    """Per method, its least-forgetting point whose new F1 is within ``tolerance`` of the
    ``reference`` method's best-learning point (the reference's own entry is that point)."""
    ref = [p for p in points if p.method == reference]
    if not ref:
        return {}
    best = max(ref, key=lambda p: p.mean("new_f1"))
    matched = {reference: best}
    for method in sorted({p.method for p in points} - {reference}):
        near = [p for p in points if p.method == method and abs(p.mean("new_f1") - best.mean("new_f1")) <= tolerance]
        if near:
            matched[method] = min(near, key=lambda p: p.mean("known_drop_pct"))
    return matched


def _fmt(stat: tuple[float, float], digits: int) -> str:
    m, s = stat
    return "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _setting(p: Point) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in p.params.items())


def drop_ratio(p: Point, ref: Point) -> tuple[float, float]:
    """p's known-fact drop over ref's, mean and std (the two seed stds propagated to first order)."""
    (a, sa), (b, sb) = p.stats["known_drop_pct"], ref.stats["known_drop_pct"]
    if p is ref:
        return 1.0, 0.0
    if b <= 0:
        return math.nan, math.nan
    r = a / b
    return r, abs(r) * math.hypot(sa / a if a else 0.0, sb / b)


def markdown(points: list[Point], base: dict) -> str:
    """Every point (those on their method's front marked), then the matched-learning comparisons."""
    lines = [f"Starting model: new-fact F1 {base['new_facts/f1']:.3f}, known-fact F1 {base['known_facts/f1']:.3f}, "
             f"held-out NLL {base['heldout/nll']:.4f}. Mean ± std over seeds; front: on its method's Pareto front.", "",
             "| method | setting | front | seeds | new F1 | known F1 drop % | held-out NLL Δ | FUAR | rows changed | trainable / step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    on_front = {id(p) for front in fronts(points).values() for p in front}
    for p in sorted(points, key=lambda p: p.method):
        lines.append(f"| {p.method} | {_setting(p)} | {'yes' if id(p) in on_front else ''} | {p.seeds} | {_fmt(p.stats['new_f1'], 3)} | "
                     f"{_fmt(p.stats['known_drop_pct'], 1)} | {_fmt(p.stats['nll_delta'], 4)} | {_fmt(p.stats['fuar'], 2)} | "
                     f"{_fmt(p.stats['rows_changed'], 0)} | {_fmt(p.stats['trainable_per_step'], 0)} |")
    for reference in MATCH_REFERENCES:
        matched = matched_learning(points, reference)
        if not matched:
            continue
        ref = matched[reference]
        lines += ["", f"Matched learning (new F1 within 0.05 of {reference}'s best, {ref.mean('new_f1'):.3f}):", ""]
        for method, p in matched.items():
            ratio = _fmt(drop_ratio(p, ref), 2)
            lines.append(f"- {method} ({_setting(p)}): new F1 {p.mean('new_f1'):.3f}, known F1 drop {p.mean('known_drop_pct'):.1f}% "
                         f"(× {ratio} of {reference}'s), held-out NLL Δ {p.mean('nll_delta'):+.4f}")
    return "\n".join(lines) + "\n"


def plot(points: list[Point], path: Path) -> None:
    """Two panels against new-fact F1: known-fact F1 drop % (with each method's front as a line) and
    held-out NLL change; error bars are the std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    front_of = fronts(points)
    for i, method in enumerate(sorted({p.method for p in points})):
        color = f"C{i}"
        ps = [p for p in points if p.method == method]
        for ax, metric in ((ax1, "known_drop_pct"), (ax2, "nll_delta")):
            ax.errorbar([p.mean("new_f1") for p in ps], [p.mean(metric) for p in ps], xerr=[p.stats["new_f1"][1] for p in ps],
                        yerr=[p.stats[metric][1] for p in ps], fmt="o", color=color, alpha=0.6, capsize=2,
                        label=method if ax is ax1 else None)
        front = front_of[method]
        ax1.plot([p.mean("new_f1") for p in front], [p.mean("known_drop_pct") for p in front], "-", color=color)
    ax1.set(xlabel="new-fact F1 (learning)", ylabel="known-fact F1 drop, % of start (forgetting)", title="learning vs forgetting")
    ax2.set(xlabel="new-fact F1 (learning)", ylabel="held-out NLL change", title="held-out text")
    ax1.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: list[dict], base: dict, out: Path) -> None:
    """Write ``out/pareto.md`` and ``out/pareto.png``."""
    points = summarize(results)
    (out / "pareto.md").write_text(markdown(points, base))
    print((out / "pareto.md").read_text())
    plot(points, out / "pareto.png")
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
    p.add_argument("--list", action="store_true", help="print the number of runs and exit")
    p.add_argument("--report", action="store_true", help="only write the table and plot from results.jsonl")
    args = p.parse_args(argv)
    grid = load_grid(args.grid, args.quick)
    runs = expand(grid)
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
    report(load_results(out / "results.jsonl"), base, out)


if __name__ == "__main__":
    main()
