"""Before / after table of eval metrics: ``python -m smft_dist.eval.report BEFORE AFTER``.

Each file is a ``metrics.jsonl`` (of a training run or of ``smft_dist.evaluate --out``): its
``"split": "eval"`` lines carry ``task/metric`` keys. The last eval line of each file is compared.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smft_dist.data.schemas import DataError


def last_eval(path: str | Path) -> dict[str, float]:
    """The last line of ``path`` that carries eval metrics, without its bookkeeping keys."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split") == "eval"]
    if not rows:
        raise DataError(f"{path}: no eval results")
    return {k: v for k, v in rows[-1].items() if k not in ("step", "split")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after")
    args = p.parse_args(argv)
    try:
        before, after = last_eval(args.before), last_eval(args.after)
    except (DataError, OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"smft_dist.eval.report: {e}") from None
    print(f"{'metric':<24}{'before':>10}{'after':>10}{'change':>10}")
    for key in sorted(before.keys() & after.keys()):
        if key.endswith(("/count", "/tokens")):
            continue
        print(f"{key:<24}{before[key]:>10.4f}{after[key]:>10.4f}{after[key] - before[key]:>+10.4f}")


if __name__ == "__main__":
    main()
