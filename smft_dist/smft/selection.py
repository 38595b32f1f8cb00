"""Top-t slot selection: rank accessed slots by tfidf | tf | random | all and keep the best t.

TF-IDF(i) = c(i) / sum_j c(j) * log((|B| + 1) / (df(i) + 1)), with c the global access counts of
this batch and df, |B| the background statistics (SMFT paper, section 4). Only slots read by this
batch are candidates. Ties break towards the lower slot index, so every rank, given the same
counts, selects the same set.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from smft_dist.config import RANKINGS
from smft_dist.model.memory import MemoryAccess
from smft_dist.smft.slot_counts import SlotCounter


def tfidf(counts: torch.Tensor, df: torch.Tensor, num_batches: int) -> torch.Tensor:
    """float64 [N] TF-IDF of each slot for one batch."""
    tf = counts.double() / counts.sum().clamp(min=1)
    idf = torch.log((num_batches + 1) / (df.double() + 1))
    return tf * idf


def select_top_t(
    counts: torch.Tensor,
    t: int,
    ranking: str = "tfidf",
    df: torch.Tensor | None = None,
    num_batches: int = 0,
    seed: int = 0,
) -> torch.Tensor:
    """bool [N]: the top-t accessed slots under ``ranking`` (deterministic ties: lower index wins)."""
    accessed = counts > 0
    if ranking == "all":
        return accessed
    if ranking == "tfidf":
        if df is None:
            raise ValueError("ranking 'tfidf' needs background df statistics (method.background)")
        score = tfidf(counts, df.to(counts.device), num_batches)
    elif ranking == "tf":
        score = counts.double()
    elif ranking == "random":
        g = torch.Generator().manual_seed(seed)
        score = torch.rand(counts.numel(), generator=g, dtype=torch.float64).to(counts.device)
    else:
        raise ValueError(f"method.ranking: unknown ranking {ranking!r} (choose from {', '.join(RANKINGS)})")
    score = torch.where(accessed, score, torch.full_like(score, -math.inf))
    order = torch.sort(score, descending=True, stable=True).indices  # stable: lower index first on ties
    keep = order[: min(t, int(accessed.sum()))]
    mask = torch.zeros_like(accessed)
    mask[keep] = True
    return mask


class TopTSelector:
    """The per-batch trainable mask of one memory layer, installed as its ``trainable_selector``.

    Called inside the forward with the layer's (indices, valid): counts the global accesses,
    selects the top-t slots, and returns which entries of the bag may train.
    """

    def __init__(
        self,
        counter: SlotCounter,
        t: int,
        ranking: str,
        df: torch.Tensor | None = None,
        num_batches: int = 0,
        seed_fn: Callable[[], int] = lambda: 0,
    ):
        self.counter, self.t, self.ranking = counter, t, ranking
        self.df, self.num_batches, self.seed_fn = df, num_batches, seed_fn
        self.selected: torch.Tensor | None = None  # bool [N] of the last batch
        self.counts: torch.Tensor | None = None  # int64 [N] of the last batch

    def __call__(self, indices: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.counts = self.counter.global_counts(MemoryAccess(indices, valid))
        self.selected = select_top_t(self.counts, self.t, self.ranking, self.df, self.num_batches, self.seed_fn())
        return self.selected[indices]
