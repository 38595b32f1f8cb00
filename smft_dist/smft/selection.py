"""Top-t slot selection: rank accessed slots by tfidf | tf | random | all and keep the best t.

TF-IDF(i) = c(i) / sum_j c(j) * log((|B| + 1) / (df(i) + 1)), with c the global access counts of
this batch and df, |B| the background statistics (SMFT paper, section 4); the idf factor is computed
once per run. Only slots read by this batch are candidates. Ties break towards the lower slot index,
so every rank, given the same counts, selects the same set.
"""

from __future__ import annotations

from typing import Callable

import torch

from smft_dist.config import RANKINGS
from smft_dist.model.memory import MemoryAccess
from smft_dist.smft.slot_counts import SlotCounter


def idf(df: torch.Tensor, num_batches: int) -> torch.Tensor:
    """float64 [N] inverse document frequency log((|B| + 1) / (df + 1)); fixed during finetuning."""
    return torch.log((num_batches + 1) / (df.double() + 1))


def select_top_t(
    counts: torch.Tensor,
    t: int,
    ranking: str = "tfidf",
    idf: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """bool [N]: the top-t accessed slots under ``ranking`` (deterministic ties: lower index wins).

    Only the accessed slots are scored and sorted, not all N.
    """
    accessed = counts.nonzero().flatten()  # ascending slot ids
    mask = torch.zeros_like(counts, dtype=torch.bool)
    if ranking == "all":
        mask[accessed] = True
        return mask
    c = counts[accessed].double()
    if ranking == "tfidf":
        if idf is None:
            raise ValueError("ranking 'tfidf' needs background df statistics (method.background)")
        score = c / c.sum() * idf[accessed]
    elif ranking == "tf":
        score = c
    elif ranking == "random":
        g = torch.Generator().manual_seed(seed)
        score = torch.rand(accessed.numel(), generator=g, dtype=torch.float64).to(counts.device)
    else:
        raise ValueError(f"method.ranking: unknown ranking {ranking!r} (choose from {', '.join(RANKINGS)})")
    order = torch.sort(score, descending=True, stable=True).indices[:t]  # stable: lower slot first on ties
    mask[accessed[order]] = True
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
        idf: torch.Tensor | None = None,
        seed_fn: Callable[[], int] = lambda: 0,
    ):
        self.counter, self.t, self.ranking, self.idf, self.seed_fn = counter, t, ranking, idf, seed_fn
        self.selected: torch.Tensor | None = None  # bool [N] of the last batch
        self.counts: torch.Tensor | None = None  # int64 [N] of the last batch

    def __call__(self, indices: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        self.counts = self.counter.global_counts(MemoryAccess(indices, valid))
        if self.idf is not None and self.idf.device != self.counts.device:
            self.idf = self.idf.to(self.counts.device)  # once: the first batch tells the device
        self.selected = select_top_t(self.counts, self.t, self.ranking, self.idf, self.seed_fn())
        return self.selected[indices]
