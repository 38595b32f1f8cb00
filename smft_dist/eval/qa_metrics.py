"""QA metrics with SQuAD-style answer normalization."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a / an / the, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Bag-of-tokens F1 between the normalized prediction and answer, maximized over ``answers``."""
    pred = normalize_answer(prediction).split()
    return max((_f1(pred, normalize_answer(a).split()) for a in answers), default=0.0)


def contains_answer(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any normalized gold answer occurs in the normalized prediction as whole words, else
    0.0: the fact is known whatever the answer's format ("Lima, the capital of Peru" for "Lima")."""
    pred = f" {normalize_answer(prediction)} "
    golds = (normalize_answer(a) for a in answers)
    return float(any(f" {g} " in pred for g in golds if g))
