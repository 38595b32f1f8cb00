"""Which examples a model answered right before and wrong after (lost), and the reverse (gained),
from the answer files two evaluations wrote (``answers/step<N>/<task>.jsonl``).

    python -m smft_dist.eval.answer_changes BEFORE AFTER --task known_facts [--metric contains] [--show 20]

BEFORE and AFTER are answer files, or run directories (``train.out_dir``, ``evaluate --out``), whose
last evaluation's file of ``--task`` is read. A qa example is right when its ``--metric`` (``contains``,
the default, or ``em``) is 1; a choice example when it picked the labelled ending.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from smft_dist.data.schemas import DataError

METRICS = ("contains", "em")


def answers_file(path: str | Path, task: str) -> Path:
    """``path`` itself, or the file of ``task`` in the last evaluation of the run directory ``path``."""
    path = Path(path)
    if path.is_file():
        return path
    steps = sorted(path.glob(f"answers/step*/{task}.jsonl"), key=lambda p: int(re.sub(r"\D", "", p.parent.name)))
    if not steps:
        raise DataError(f"{path}: no answers/step<N>/{task}.jsonl (evaluations write them since this tool exists)")
    return steps[-1]


def answer_metric(known_metric: str) -> str:
    """The per-answer metric that decides right or wrong for a grid's ``known_metric`` (F1 is not
    all-or-nothing: containment stands in for it)."""
    return known_metric if known_metric in METRICS else "contains"


def load_answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_right(example: dict, metric: str) -> bool:
    return bool(example["correct"]) if "picked" in example else example[metric] >= 1.0


def changes(before: list[dict], after: list[dict], metric: str = "contains") -> tuple[list[int], list[int]]:
    """Indices of the examples lost (right before, wrong after) and gained; both files must hold the
    same examples in the same order."""
    key = lambda e: (e["index"], e.get("question", e.get("context")))  # noqa: E731
    if [key(e) for e in before] != [key(e) for e in after]:
        raise DataError("the two answer files do not hold the same examples (another task or data set?)")
    lost = [b["index"] for b, a in zip(before, after) if is_right(b, metric) and not is_right(a, metric)]
    gained = [b["index"] for b, a in zip(before, after) if not is_right(b, metric) and is_right(a, metric)]
    return lost, gained


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", help="answer file or run directory")
    p.add_argument("after", help="answer file or run directory")
    p.add_argument("--task", default="known_facts", help="eval task name (when BEFORE / AFTER are directories)")
    p.add_argument("--metric", default="contains", choices=METRICS, help="what makes a qa answer right")
    p.add_argument("--show", type=int, default=20, help="lost and gained examples to print (each)")
    args = p.parse_args(argv)
    try:
        before, after = (load_answers(answers_file(x, args.task)) for x in (args.before, args.after))
        lost, gained = changes(before, after, args.metric)
    except (DataError, FileNotFoundError, json.JSONDecodeError, KeyError) as e:
        raise SystemExit(f"smft_dist.eval.answer_changes: {e}") from None
    right = sum(is_right(e, args.metric) for e in before)
    print(f"{len(before)} examples, {right} right before, {right - len(lost) + len(gained)} after: {len(lost)} lost, {len(gained)} gained")
    by_index = {e["index"]: (b, e) for b, e in zip(before, after)}
    for name, ids in (("lost", lost), ("gained", gained)):
        for i in ids[: args.show]:
            b, a = by_index[i]
            if "picked" in b:
                print(f"{name} #{i}: {b['context']!r} label {b['label']}: picked {b['picked']} -> {a['picked']}")
            else:
                print(f"{name} #{i}: {b['question']!r} {b['answers']}: {b['prediction']!r} -> {a['prediction']!r}")


if __name__ == "__main__":
    main()
