"""Add each fact's own question-answer line to its rewrites: ``python examples/retrofit/qa_form.py FACTS.jsonl``.

``smft_dist.augment`` with the template fallback states a QA pair as "Q? A." framed by fixed prefixes
and suffixes. A model of a million parameters learns a fact only in the phrasing it is asked, so the
example appends "Question: Q\\nAnswer: A" (the form ``eval.qa_prompt`` asks in, and the synthetic
world's own paraphrases end with) to every line's ``paraphrases``, in place. With an instruct model
rewriting and a model of 0.5B parameters this step is left out (see README.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from smft_dist.config import EvalConfig


def main(path: str) -> None:
    prompt = EvalConfig.qa_prompt
    lines = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    for fact in lines:
        qa = f"{prompt.format(question=fact['question'])} {fact['answer']}"
        if qa not in fact["paraphrases"]:
            fact["paraphrases"].append(qa)
    Path(path).write_text("".join(json.dumps(f, ensure_ascii=False) + "\n" for f in lines), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
