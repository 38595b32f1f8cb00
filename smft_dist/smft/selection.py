"""Top-t slot selection: rank accessed slots by tfidf | tf | kl | random | all and keep the best t.

TF-IDF(i) = c(i) / sum_j c(j) * log((|B| + 1) / (df(i) + 1)), with c the global access counts of
this batch and df, |B| the background statistics (SMFT paper, section 4); the idf factor is computed
once per run. KL(i) = p(i) * log(p(i) / q(i)), the slot's term of KL(p || q) with p = c / sum(c) the
batch's access distribution and q the background's (the "surprise" ranking of Goyal et al. 2026):
q(i) = (counts(i) + 1) / (sum_j counts(j) + N), add-one (Laplace) smoothing so a slot the background
never read has a finite, small q. Only slots read by this batch are candidates. Ties break towards the lower slot index,
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


def background_log_q(counts: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """float64 [N] log q(i) of the background's access distribution, add-``alpha`` smoothed:
    q(i) = (counts(i) + alpha) / (sum_j counts(j) + alpha * N); fixed during finetuning."""
    c = counts.double() + alpha
    return torch.log(c / c.sum())


def kl_scores(counts: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """float64: p(i) * log(p(i) / q(i)) of each accessed slot, given its batch counts (all > 0) and
    its background log q(i)."""
    p = counts.double() / counts.sum()
    return p * (torch.log(p) - log_q)


def select_top_t(
    counts: torch.Tensor,
    t: int,
    ranking: str = "tfidf",
    idf: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """bool [N]: the top-t accessed slots under ``ranking`` (deterministic ties: lower index wins).
    ``idf`` holds the per-slot background weights: idf for tfidf, log q for kl.

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
    elif ranking == "kl":
        if idf is None:
            raise ValueError("ranking 'kl' needs background access counts (method.background)")
        score = kl_scores(c, idf[accessed])
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
