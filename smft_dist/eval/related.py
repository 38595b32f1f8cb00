"""Split known facts by whether they share an answer with the new facts of a stream.

Forgetting may hit the known facts a stream's new facts resemble more than the others: a known fact
whose (normalized) answer is also a new fact's answer reads, and is scored on, the same answer
tokens. In the synthetic world no known fact shares a person with a new one and every relation occurs
in both, so the answer is the axis that separates them.

``python -m smft_dist.eval.related --known K --new N --max-known 256 --max-new 64 --out DIR`` writes
``DIR/facts_known_same_answer.jsonl`` and ``DIR/facts_known_other.jsonl`` (together the first
``max_known`` known facts, in their order) and prints the counts; they are ``facts`` files for eval
tasks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smft_dist.eval.qa_metrics import normalize_answer

SPLITS = ("same_answer", "other")


def _read(path: Path, limit: int | None) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records[:limit] if limit is not None else records


def split_known(known: list[dict], new: list[dict]) -> dict[str, list[dict]]:
    """``known`` facts in their order, by whether their normalized answer is any new fact's."""
    answers = {normalize_answer(r["answer"]) for r in new}
    out: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for r in known:
        out["same_answer" if normalize_answer(r["answer"]) in answers else "other"].append(r)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--known", required=True, type=Path, help="known facts (facts jsonl)")
    ap.add_argument("--new", required=True, type=Path, help="the stream's new facts (facts jsonl)")
    ap.add_argument("--max-known", type=int, default=None, help="the first N known facts (as the eval task reads them)")
    ap.add_argument("--max-new", type=int, default=None, help="the first N new facts (as the stream reads them)")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    for path in (args.known, args.new):
        if not path.is_file():
            raise SystemExit(f"smft_dist.eval.related: {path} not found")
    try:
        splits = split_known(_read(args.known, args.max_known), _read(args.new, args.max_new))
    except (json.JSONDecodeError, KeyError) as e:
        raise SystemExit(f"smft_dist.eval.related: not a facts file with 'answer' fields ({type(e).__name__}: {e})") from None
    args.out.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        with open(args.out / f"facts_known_{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"{name:12s} {len(records):5d} -> {args.out / f'facts_known_{name}.jsonl'}")


if __name__ == "__main__":
    main()
