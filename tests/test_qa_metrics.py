"""EM / F1 with SQuAD normalization on hand-made cases."""

from __future__ import annotations

import pytest

from smft_dist.eval.qa_metrics import contains_answer, exact_match, normalize_answer, token_f1


def test_normalization():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a pear & THE plum.") == "apple pear plum"
    assert normalize_answer("Theory of an anathema") == "theory of anathema"  # articles only as words
    assert normalize_answer("U.S.A.") == "usa"


@pytest.mark.parametrize(
    "pred,golds,em",
    [
        ("the Paris.", ["paris"], 1.0),
        ("PARIS", ["Paris, France", "paris"], 1.0),  # max over gold answers
        ("Paris France", ["Paris"], 0.0),
        ("a  london", ["London", "Rome"], 1.0),
        ("", ["London"], 0.0),
    ],
)
def test_exact_match(pred, golds, em):
    assert exact_match(pred, golds) == em


@pytest.mark.parametrize(
    "pred,golds,f1",
    [
        ("Paris France", ["Paris"], 2 / 3),  # p = 1/2, r = 1
        ("a b c", ["b c d"], 0.8),  # "a" is an article: p = 1, r = 2/3
        ("paris paris", ["paris"], 2 / 3),  # repeated tokens count once each
        ("new york city", ["york", "New York City!"], 1.0),  # max over golds
        ("the", ["a"], 1.0),  # both normalize to empty
        ("x", ["y"], 0.0),
        ("", ["London"], 0.0),
    ],
)
def test_token_f1(pred, golds, f1):
    assert token_f1(pred, golds) == pytest.approx(f1)


@pytest.mark.parametrize(
    "pred,golds,contained",
    [
        ("Lima, the capital of Peru.", ["Lima"], 1.0),  # a sentence around the answer still knows it
        ("Lima.", ["Lima"], 1.0),
        ("The Republic of Niger", ["Nigeria"], 0.0),
        ("Nigeria's capital", ["Niger"], 0.0),  # whole words only
        ("New South Wales", ["South Wales"], 1.0),
        ("it is in south america", ["South America", "SA"], 1.0),
        ("Paris", ["Lyon", "Marseille"], 0.0),
        ("anything", ["the"], 0.0),  # an answer that normalizes to nothing matches nothing
    ],
)
def test_contains_answer(pred, golds, contained):
    assert contains_answer(pred, golds) == contained
