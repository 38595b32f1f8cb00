"""Memory value tables: the interface the memory layer reads through, and the local implementation.

A value table holds ``num_rows`` value vectors of size ``dim`` and answers one question: for each
token, the weighted sum of the rows it selected (a weighted, sum-pooled embedding bag). The memory
layer never touches rows directly, so a row-sharded TorchRec table
(:mod:`smft_dist.distributed.sharding`) slots in without changing model code. ``valid`` [T] marks
the tokens that read memory: padding reads nothing, gets zeros, and is no access for slot counting.

Deferred row updates (sparse memory finetuning, ``deferred_rows``): a training lookup reads every
row frozen (the scores still get gradients) and is kept, with its pooled output, until
:meth:`ValueTable.update_rows`. After the last backward of the optimizer step that call looks up
again, over all kept lookups of every layer reading the table, only the entries whose row is
selected, and backpropagates the captured d(loss)/d(pooled): each selected row gets the sum of all
its gradients in one update, and an unselected row never enters a backward, so it stays
bit-identical (for the row optimizers ``distributed.sharding.check_row_optimizer`` accepts).
``counted`` (set by the train step, [T] bool or None) narrows which of a lookup's reads the slot
counts see (``method.count_positions``); it never changes what is read or which gradient a row gets.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn


class PendingLookup(NamedTuple):
    """A training lookup awaiting its row update: entries (``keep`` None = all) and the pooled
    output whose ``.grad`` the backward fills."""

    indices: torch.Tensor
    weights: torch.Tensor
    keep: torch.Tensor | None
    pooled: torch.Tensor
    counted: torch.Tensor | None = None  # [T] bool: the tokens whose reads count for the selection (None = all)


class ValueTable(nn.Module, abc.ABC):
    """Pooled weighted lookup: ``out[t] = sum_j weights[t, j] * row[indices[t, j]]``.

    Implementations provide :meth:`lookup` (rows with or without gradient) and :meth:`step_rows`
    (apply a lookup's row gradient with the table's optimizer); the deferred update lives here.
    """

    num_rows: int
    dim: int

    def __init__(self) -> None:
        super().__init__()
        self.deferred_rows = False
        self.pending: list[PendingLookup] = []
        self.counted: torch.Tensor | None = None  # [T] bool for the next training lookups (None = every token counts)

    @abc.abstractmethod
    def lookup(self, indices: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None, rows_grad: bool) -> torch.Tensor:
        """indices/weights [T, K], ``keep`` [T, K] entries read (None = all) -> pooled [T, dim].
        ``rows_grad`` False: the rows get no gradient (weights still do)."""

    @abc.abstractmethod
    def step_rows(self, indices: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor, grad: torch.Tensor) -> None:
        """Look up ``keep``'s entries with row gradients and update their rows by ``grad`` = d(loss)/d(pooled)."""

    @abc.abstractmethod
    def full_weight(self) -> torch.Tensor:
        """The whole [num_rows, dim] table on this process (gathered if sharded)."""

    def forward(self, indices: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """indices/weights [T, K], valid [T] -> pooled [T, dim] in ``weights``' dtype."""
        keep = None if valid is None else valid[:, None].expand_as(indices)
        if not (self.deferred_rows and torch.is_grad_enabled()):
            return self.lookup(indices, weights, keep, rows_grad=True).to(weights.dtype)
        pooled = self.lookup(indices, weights, keep, rows_grad=False)
        if pooled.requires_grad:  # the scores carry gradient (a memory layer below trains)
            pooled.retain_grad()
        else:
            pooled.requires_grad_()
        self.pending.append(PendingLookup(indices, weights.detach(), keep, pooled, self.counted))
        return pooled.to(weights.dtype)

    def pending_slots(self) -> list[torch.Tensor]:
        """The slots each pending lookup read, for slot counting: its indices, -1 where nothing was
        read (padding) or the token does not count (``counted``), so the shapes follow the batch
        shape and not the data."""
        out = []
        for p in self.pending:
            keep = p.keep
            if p.counted is not None:
                counted = p.counted[:, None].expand_as(p.indices)
                keep = counted if keep is None else keep & counted
            out.append(read_slots(p.indices, keep))
        return out

    def update_rows(self, rows: torch.Tensor | None) -> None:
        """Apply every pending lookup's gradient to ``rows`` (slot ids; None = every row read) only,
        one update per row; clears the pending lookups. Collective for sharded tables: call it on
        every rank."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        indices = torch.cat([p.indices for p in pending])
        keep = torch.isin(indices, rows) if rows is not None else torch.ones_like(indices, dtype=torch.bool)
        for p, k in zip(pending, keep.split([p.indices.shape[0] for p in pending])):
            if p.keep is not None:
                k &= p.keep
        grad = torch.cat([p.pooled.grad if p.pooled.grad is not None else torch.zeros_like(p.pooled) for p in pending])
        self.step_rows(indices, torch.cat([p.weights for p in pending]), keep, grad)


def read_slots(indices: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``indices`` with -1 at the entries outside ``keep`` (None = every entry was read): the slot
    ids as the slot-count service takes them, padding marked rather than dropped."""
    return indices if keep is None else indices.masked_fill(~keep, -1)


def init_values_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reference init of value rows: N(0, dim^-1/2)."""
    return nn.init.normal_(weight, mean=0.0, std=weight.shape[-1] ** -0.5, generator=generator)


@dataclass(frozen=True)
class SeededRows:
    """Initial rows of a value table generated chunk by chunk from a seed (N(0, dim^-1/2)).

    Any row range comes out without building the whole table, and the same rows come out however
    the table is split over ranks, so a row-sharded table of 1M+ rows initializes its own shard only.
    """

    num_rows: int
    dim: int
    seed: int
    chunk: int = 65536

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_rows, self.dim)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) as a float32 [hi - lo, dim] tensor."""
        parts = []
        for c in range(lo // self.chunk, (max(hi, lo + 1) - 1) // self.chunk + 1):
            start = c * self.chunk
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + c)
            n = min(self.chunk, self.num_rows - start)
            block = init_values_(torch.empty(n, self.dim), generator=g)
            parts.append(block[max(lo - start, 0) : min(hi - start, n)])
        if len(parts) == 1:  # a range inside one chunk (how shards initialize): no second copy
            return parts[0]
        return torch.cat(parts) if parts else torch.empty(0, self.dim)


@dataclass(frozen=True)
class SavedRows:
    """Rows of a value table saved as tensor ``name`` of the safetensors file ``path``.

    Any row range is read from the file (a slice of the memory-mapped tensor), so each rank of a
    row-sharded table loads its own shard without the whole table ever being in memory.
    """

    path: str
    name: str
    shape: tuple[int, int]

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) as a float32 [hi - lo, dim] tensor."""
        with safe_open(self.path, framework="pt") as f:
            return f.get_slice(self.name)[lo:hi].float()


def bag_entries(indices: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten [T, K] bags into jagged ``(values, lengths, weights)``, only the ``keep`` entries
    (None = all), in bag order."""
    T, K = indices.shape
    if keep is None:
        return indices.flatten(), indices.new_full((T,), K), weights.flatten()
    return indices[keep], keep.sum(1), weights[keep]


class LocalValueTable(ValueTable):
    """Single-process table on ``torch.nn.EmbeddingBag`` (mode="sum", per-sample weights).

    Gradients flow to the rows and to the weights (scores), so keys and queries learn through it.
    Entries outside ``keep`` get weight 0. Its optimizer is the caller's: a deferred update
    (:meth:`step_rows`) accumulates the selected rows' gradient into ``weight.grad`` (zeros elsewhere).
    """

    def __init__(self, num_rows: int, dim: int, device: torch.device | str | None = None):
        super().__init__()
        self.num_rows, self.dim = num_rows, dim
        self.bag = nn.EmbeddingBag(num_rows, dim, mode="sum", device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            init_values_(self.bag.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.bag.weight

    def lookup(self, indices, weights, keep, rows_grad):
        w = weights.to(self.bag.weight.dtype)
        if keep is not None:
            w = w * keep
        rows = self.bag.weight if rows_grad else self.bag.weight.detach()
        return F.embedding_bag(indices, rows, per_sample_weights=w, mode="sum")

    def step_rows(self, indices, weights, keep, grad):
        self.lookup(indices, weights, keep, rows_grad=True).backward(grad)

    def full_weight(self) -> torch.Tensor:
        return self.bag.weight.detach()

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim} ({self.num_rows * self.dim * 4 / 2**20:.1f} MiB fp32)"
