"""Which known facts the runs of a pareto sweep lost, fact by fact. A fact that most runs lose,
whatever their method and learning rate, is fragile (nearly any change of the weights flips its
greedy answer); a point's losses outside that set are what its updates did to other facts.

    python -m benchmarks.lost_facts --out runs/pareto_smollm2_centered [--fragile 0.5]

Reads ``OUT/results.jsonl`` (each run's ``known_lost``, recorded by ``benchmarks.pareto`` where the
starting model's and the run's evaluations wrote answers; for a record without it, the run
directory's answers under ``OUT/runs/``) and the starting model's answers (``OUT/base/answers/``);
writes ``OUT/lost_facts.md``: per grid point the facts lost per run, those lost by every seed and
the share of its losses that are fragile; how many runs lose each fact; the fragile facts themselves.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from benchmarks.pareto import Run, known_lost, load_results, mean_std
from smft_dist.data.schemas import DataError
from smft_dist.eval.answer_changes import answer_metric, answers_file, is_right, load_answers


def point_name(result: dict) -> str:
    return " ".join([result["method"], *(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(result["params"].items()))])


def lost_facts_table(results: list[dict], base_answers: list[dict], fragile: float = 0.5) -> str:
    """The markdown report over the results that recorded ``known_lost``."""
    runs = [r for r in results if r.get("known_lost") is not None]
    if not runs:
        raise DataError("no result recorded known_lost (runs from before evaluations wrote answers, or no base answers)")
    metric = answer_metric(runs[0].get("known_metric", "f1"))
    known = [b for b in base_answers if is_right(b, metric)]
    times_lost = Counter(i for r in runs for i in r["known_lost"])
    brittle = {i for i, n in times_lost.items() if n >= fragile * len(runs)}
    lines = [f"{len(runs)} of {len(results)} runs recorded which known facts they lost; {len(known)} known facts right at the "
             f"start ({metric}). Fragile: lost by at least {fragile:.0%} of these runs, whatever their method: "
             f"{len(brittle)} facts.", "",
             "| point | runs | facts lost per run | lost by every run of the point | of the losses, fragile |", "|---|---|---|---|---|"]
    points: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        points[point_name(r)].append(r)
    for name, rs in sorted(points.items()):
        lost = [set(r["known_lost"]) for r in rs]
        m, s = mean_std([len(x) for x in lost])
        every = set.intersection(*lost)
        total = sum(len(x) for x in lost)
        share = f"{sum(len(x & brittle) for x in lost) / total:.2f}" if total else "–"
        lines.append(f"| {name} | {len(rs)} | {m:.1f} ± {s:.1f} | {len(every)} | {share} |")
    hist = Counter(times_lost.get(b["index"], 0) for b in known)
    lines += ["", "Known facts by the number of runs that lost them:", "", "| runs losing it | facts |", "|---|---|"]
    lines += [f"| {n} | {hist[n]} |" for n in sorted(hist)]
    by_index = {b["index"]: b for b in base_answers}
    lines += ["", "Fragile facts:", "", "| fact | answer | start answer | runs losing it |", "|---|---|---|---|"]
    for i in sorted(brittle, key=lambda i: (-times_lost[i], i)):
        b = by_index[i]
        lines.append(f"| {b['question']} | {', '.join(b['answers'])} | {b['prediction'].strip()!r} | {times_lost[i]} of {len(runs)} |")
    return "\n".join(lines) + "\n"


def with_known_lost(results: list[dict], out: Path) -> list[dict]:
    """``results``, each lacking ``known_lost`` given it from its run directory's answers where they exist."""
    return [r if r.get("known_lost") is not None else
            {**r, "known_lost": known_lost(out / "base", out / "runs" / Run(r["method"], r["params"], r["seed"]).name,
                                           r.get("known_metric", "f1"))}
            for r in results]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="a benchmarks.pareto output directory")
    p.add_argument("--fragile", type=float, default=0.5, help="share of all runs that must lose a fact for it to count as fragile")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        results = with_known_lost(load_results(out / "results.jsonl"), out)
        text = lost_facts_table(results, load_answers(answers_file(out / "base", "known_facts")), args.fragile)
    except (DataError, FileNotFoundError, json.JSONDecodeError) as e:
        raise SystemExit(f"benchmarks.lost_facts: {e}") from None
    (out / "lost_facts.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
