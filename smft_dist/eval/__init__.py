"""Held-out evaluation: QA EM / F1 / answer containment, multiple-choice accuracy, NLL / perplexity."""

from __future__ import annotations

from smft_dist.eval.qa_metrics import contains_answer, exact_match, normalize_answer, token_f1
from smft_dist.eval.runner import evaluate_choice, evaluate_nll, evaluate_qa, greedy_generate, run_eval, run_task

__all__ = ["contains_answer", "evaluate_choice", "evaluate_nll", "evaluate_qa", "exact_match", "greedy_generate", "normalize_answer", "run_eval", "run_task", "token_f1"]
