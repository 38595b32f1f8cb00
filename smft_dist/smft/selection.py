"""Top-t row selection per value table: rank the accessed slots by tfidf | tf | kl | random | all.

TF-IDF(i) = c(i) / sum_j c(j) * log((|B| + 1) / (df(i) + 1)), with c the global access counts of
this optimizer step and df, |B| the background statistics (SMFT paper, section 4); the idf factor
is computed once per run. KL(i) = p(i) * log(p(i) / q(i)), the slot's term of KL(p || q) with
p = c / sum(c) the step's access distribution and q the background's (the "surprise" ranking of
Goyal et al. 2026): q(i) = (counts(i) + 1) / (sum_j counts(j) + N), add-one (Laplace) smoothing so a
slot the background never read has a finite, small q. Only slots read in this step are candidates. Ties break towards the lower
slot index, so every rank, given the same counts, selects the same set.

One :class:`RowSelector` serves one *table*: the counts add up over every memory layer that reads
it and every micro-batch of the step, and :func:`apply_sparse_updates` updates the selected rows
once (see ``ValueTable.update_rows``).

Options of the method (``method.count_positions``, ``method.row_share_cap``):

* count_positions ``all`` (the paper) counts the reads of every token of the batch; ``scored`` only
  those at the positions whose next-token loss is scored (:func:`~smft_dist.smft.slot_counts.count_scored`,
  marked on the tables by :func:`mark_counted_positions` before each training forward).
* row_share_cap K: each selector keeps, per row, the number of steps whose selection trained it
  (``shares``, int32 [N], the same on every rank because every rank selects the same rows; saved in
  checkpoints). A row whose count reached K is ranked out: the top-t is taken over the other
  accessed slots only, so a step may train fewer than t rows. On a facts stream a step is one fact,
  so within one pass the count is the number of distinct facts that trained the row; over P passes
  a fact counts once per pass.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.distributed as dist

from smft_dist.config import RANKINGS
from smft_dist.model.value_table import ValueTable
from smft_dist.smft.slot_counts import SlotCounter, count_scored


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


def step_seed(train_seed: int, step: int) -> int:
    """The seed of the ``random`` ranking at 0-based optimizer step ``step`` of a run seeded ``train_seed``."""
    return train_seed * 1_000_003 + step


def select_top_t(
    slots: torch.Tensor,
    counts: torch.Tensor,
    t: int,
    ranking: str = "tfidf",
    idf: torch.Tensor | None = None,
    seed: int = 0,
    eligible: torch.Tensor | None = None,
) -> torch.Tensor:
    """int64 ascending slot ids: the top-t of the accessed ``slots`` (ascending, with their global
    ``counts``) under ``ranking``; deterministic ties, lower slot first. ``idf`` holds the per-slot
    background weights: idf for tfidf, log q for kl. ``eligible`` (bool [m], None = all): the slots
    that may be selected; the scores still see every count (kl's p is the whole step's)."""
    if ranking == "all":
        return slots if eligible is None else slots[eligible]
    c = counts.double()
    if ranking == "tfidf":
        if idf is None:
            raise ValueError("ranking 'tfidf' needs background df statistics (method.background)")
        score = c / c.sum() * idf[slots]
    elif ranking == "kl":
        if idf is None:
            raise ValueError("ranking 'kl' needs background access counts (method.background)")
        score = kl_scores(c, idf[slots])
    elif ranking == "tf":
        score = c
    elif ranking == "random":
        g = torch.Generator().manual_seed(seed)
        score = torch.rand(slots.numel(), generator=g, dtype=torch.float64).to(slots.device)
    else:
        raise ValueError(f"method.ranking: unknown ranking {ranking!r} (choose from {', '.join(RANKINGS)})")
    order = torch.sort(score, descending=True, stable=True).indices  # stable: lower slot first on ties
    if eligible is not None:
        order = order[eligible[order]]
    return slots[order[:t]].sort().values


class RowSelector:
    """The rows of one value table that train in an optimizer step (smft: top-t; memory_ft: all
    accessed). Keeps the last step's ``slots``/``counts`` (counted), ``selected`` and ``ranked_out``
    (accessed slots the share cap excluded) for logging; ``shares`` [num_rows] under a share cap."""

    def __init__(
        self,
        t: int,
        ranking: str,
        idf: torch.Tensor | None = None,
        seed_fn: Callable[[], int] = lambda: 0,
        group: dist.ProcessGroup | None = None,
        count_positions: str = "all",
        share_cap: int | None = None,
        num_rows: int = 0,
    ):
        self.counter, self.t, self.ranking, self.idf, self.seed_fn = SlotCounter(group), t, ranking, idf, seed_fn
        self.count_positions, self.share_cap = count_positions, share_cap or None
        self.shares = torch.zeros(num_rows, dtype=torch.int32) if self.share_cap else None
        self.slots: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.selected: torch.Tensor | None = None
        self.ranked_out = 0

    @property
    def trains_every_read(self) -> bool:
        """Every row the step read trains (ranking 'all' without a share cap)."""
        return self.ranking == "all" and self.shares is None

    def __call__(self, reads: list[torch.Tensor]) -> torch.Tensor:
        """Selected slot ids (ascending) from this rank's reads in the step; collective."""
        self.slots, self.counts = self.counter.global_counts(reads)
        if self.idf is not None and self.idf.device != self.slots.device:
            self.idf = self.idf.to(self.slots.device)  # once: the first step tells the device
        eligible = None
        if self.shares is not None:
            if self.shares.device != self.slots.device:
                self.shares = self.shares.to(self.slots.device)
            eligible = self.shares[self.slots] < self.share_cap
            self.ranked_out = int(self.slots.numel() - eligible.sum())
        self.selected = select_top_t(self.slots, self.counts, self.t, self.ranking, self.idf, self.seed_fn(), eligible)
        if self.shares is not None:
            self.shares[self.selected] += 1
        return self.selected


def mark_counted_positions(tables: Mapping[str, ValueTable], selectors: Mapping[str, RowSelector], labels: torch.Tensor | None) -> None:
    """Before a training forward over ``labels`` [B, S]: the tables whose selector counts only scored
    positions count the reads of :func:`count_scored`'s positions; None clears the marks."""
    for name, selector in selectors.items():
        if selector.count_positions == "scored":
            tables[name].counted = None if labels is None else count_scored(labels).flatten()


def apply_sparse_updates(
    tables: Mapping[str, ValueTable],
    selectors: Mapping[str, RowSelector],
    before_update: Callable[[str, torch.Tensor], None] | None = None,
) -> None:
    """End of an optimizer step (after its last backward): select each table's rows from every
    lookup since the last call and update them once. Same table order on every rank.
    ``before_update(table name, rows)``, if given, sees the rows (global ids, the same on every rank;
    under ranking 'all' every slot the global batch read) just before they change."""
    for name in sorted(selectors):
        table = tables[name]
        reads = table.pending_slots()
        if reads:
            selected = selectors[name](reads)
            if before_update is not None:
                before_update(name, selected)
            table.update_rows(None if selectors[name].trains_every_read else selected)
