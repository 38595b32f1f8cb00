"""The paper's datasets in their hub formats, converted to the canonical schemas.

=========== ===================================================== =========== =======================
format      hub dataset (config)                                  raw fields  canonical schema
=========== ===================================================== =========== =======================
triviaqa    mandarjoshi/trivia_qa (rc.nocontext)                  question,   qa (answers = aliases,
                                                                  answer{}    value first)
nq_open     google-research-datasets/nq_open                      question,   qa
                                                                  answer[]
simpleqa    basicv8vc/SimpleQA                                    problem,    qa
                                                                  answer
hellaswag   Rowan/hellaswag                                       ctx_a, ...  choice
gsm8k       openai/gsm8k (main)                                   question,   lm_pair (NLL of the
                                                                  answer      answer given the question)
dclm        mlfoundations/dclm-baseline-1.0                       text        text
=========== ===================================================== =========== =======================

Canonical schemas pass through unchanged; ``facts`` also converts to ``qa``.
"""

from __future__ import annotations

import re
from typing import Callable

import datasets

from smft_dist.data.schemas import FIELDS, DataError


def _triviaqa(r: dict) -> dict:
    answer = r["answer"]
    answers = [answer["value"], *answer.get("aliases", [])]
    return {"question": r["question"], "answers": list(dict.fromkeys(answers))}


def _nq_open(r: dict) -> dict:
    return {"question": r["question"], "answers": list(r["answer"])}


def _simpleqa(r: dict) -> dict:
    return {"question": r["problem"], "answers": [r["answer"]]}


def _facts_qa(r: dict) -> dict:
    return {"question": r["question"], "answers": [r["answer"]]}


def _hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow markup removed, as in the standard lm-eval preprocessing."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(r: dict) -> dict:
    context = f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"
    label = int(r["label"]) if str(r["label"]).strip() else -1  # the test split is unlabeled
    return {"context": _hellaswag_clean(context), "endings": [" " + _hellaswag_clean(e) for e in r["endings"]], "label": label}


def _gsm8k(r: dict) -> dict:
    return {"prompt": f"Question: {r['question']}\nAnswer:", "target": " " + r["answer"]}


def _dclm(r: dict) -> dict:
    return {"text": r["text"]}


# (source schema, wanted schema) -> (raw fields, record converter)
CONVERTERS: dict[tuple[str, str], tuple[tuple[str, ...], Callable[[dict], dict]]] = {
    ("triviaqa", "qa"): (("question", "answer"), _triviaqa),
    ("nq_open", "qa"): (("question", "answer"), _nq_open),
    ("simpleqa", "qa"): (("problem", "answer"), _simpleqa),
    ("facts", "qa"): (("question", "answer"), _facts_qa),
    ("hellaswag", "choice"): (("activity_label", "ctx_a", "ctx_b", "endings", "label"), _hellaswag),
    ("gsm8k", "lm_pair"): (("question", "answer"), _gsm8k),
    ("dclm", "text"): (("text",), _dclm),
}


def raw_fields(schema: str, want: str) -> tuple[str, ...]:
    """The fields a ``schema`` record must carry to become a ``want`` record."""
    if schema == want:
        return FIELDS[want]
    if (schema, want) not in CONVERTERS:
        raise DataError(f"cannot read schema {schema!r} as {want!r}")
    return CONVERTERS[(schema, want)][0]


def convert(ds: datasets.Dataset | datasets.IterableDataset, schema: str, want: str):
    """``ds`` (records of ``schema``) as records of the canonical schema ``want``."""
    fields = FIELDS[want]
    if schema != want:
        ds = ds.map(CONVERTERS[(schema, want)][1])
    return ds.select_columns(list(fields))
