"""Eval metrics of runs: ``python -m smft_dist.eval.report BEFORE AFTER`` (before / after table) or
``python -m smft_dist.eval.report RUN`` (every evaluation of one run, step by step).

Each file is a ``metrics.jsonl`` (of a training run or of ``smft_dist.evaluate --out``): its
``"split": "eval"`` lines carry ``task/metric`` keys. Two files: the last eval line of each is
compared. One file: a row per evaluation, and for each NLL its last value over its minimum in the
run (a model that overfits its corpus shows here: held-out NLL rising while training loss falls).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smft_dist.data.schemas import DataError


def evals(path: str | Path) -> list[dict]:
    """Every line of ``path`` that carries eval metrics, in order."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split") == "eval"]
    if not rows:
        raise DataError(f"{path}: no eval results")
    return rows


def last_eval(path: str | Path) -> dict[str, float]:
    """The last line of ``path`` that carries eval metrics, without its bookkeeping keys."""
    return {k: v for k, v in evals(path)[-1].items() if k not in ("step", "split")}


def _shown(key: str) -> bool:
    return not key.endswith(("/count", "/tokens", "/ppl"))


def over_run(rows: list[dict]) -> str:
    """A row per evaluation (step, then every metric), then each NLL's last value over its minimum."""
    keys = sorted({k for r in rows for k in r if k not in ("step", "split") and _shown(k)})
    lines = [f"{'step':>8}" + "".join(f"{k:>22}" for k in keys)]
    lines += [f"{r.get('step', ''):>8}" + "".join(f"{r[k]:>22.4f}" if k in r else f"{'':>22}" for k in keys) for r in rows]
    for k in (k for k in keys if k.endswith("/nll")):
        values = [r[k] for r in rows if k in r]
        best = min(values)
        lines.append(f"{k}: last {values[-1]:.4f}, minimum {best:.4f} (x{values[-1] / best:.3f} of it)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", metavar="METRICS", help="RUN, or BEFORE AFTER")
    args = p.parse_args(argv)
    if len(args.files) > 2:
        p.error("give one metrics.jsonl (a run's evaluations) or two (before, after)")
    try:
        if len(args.files) == 1:
            print(over_run(evals(args.files[0])))
            return
        before, after = last_eval(args.files[0]), last_eval(args.files[1])
    except (DataError, OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"smft_dist.eval.report: {e}") from None
    print(f"{'metric':<24}{'before':>10}{'after':>10}{'change':>10}")
    for key in sorted(before.keys() & after.keys()):
        if key.endswith(("/count", "/tokens")):
            continue
        print(f"{key:<24}{before[key]:>10.4f}{after[key]:>10.4f}{after[key] - before[key]:>+10.4f}")


if __name__ == "__main__":
    main()
