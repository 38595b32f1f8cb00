"""Memory value tables: the interface the memory layer reads through, and the local implementation.

A value table holds ``num_rows`` value vectors of size ``dim`` and answers one question: for each
token, the weighted sum of the rows it selected (a weighted, sum-pooled embedding bag). The memory
layer never touches rows directly, so a row-sharded TorchRec table
(:mod:`smft_dist.distributed.sharding`) slots in without changing model code.

Two optional masks shape a lookup:

* ``valid`` [T]: tokens that read memory. Invalid tokens (padding) read nothing and get zeros; they
  are no access for slot counting either.
* ``trainable`` [T, K]: entries whose row may receive gradient. The rest still contribute to the
  output but are detached, so their rows get no gradient at all (sparse memory finetuning).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn


class ValueTable(nn.Module, abc.ABC):
    """Pooled weighted lookup: ``out[t] = sum_j weights[t, j] * row[indices[t, j]]``."""

    num_rows: int
    dim: int

    @abc.abstractmethod
    def forward(
        self,
        indices: torch.Tensor,
        weights: torch.Tensor,
        valid: torch.Tensor | None = None,
        trainable: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """indices/weights [T, K] -> pooled [T, dim]; see the module docstring for the masks."""

    @abc.abstractmethod
    def full_weight(self) -> torch.Tensor:
        """The whole [num_rows, dim] table on this process (gathered if sharded)."""


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


def split_bags(
    indices: torch.Tensor,
    weights: torch.Tensor,
    valid: torch.Tensor | None,
    trainable: torch.Tensor | None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]]:
    """Flatten [T, K] bags into jagged features ``(values, lengths, weights, carries_grad)``.

    Returns one feature when ``trainable`` is None, else two (trainable first, then frozen) that
    read the same table; the order inside each bag is preserved.
    """
    T, K = indices.shape
    if valid is None and trainable is None:  # every bag whole: no compaction
        return [(indices.flatten(), indices.new_full((T,), K), weights.flatten(), True)]
    keep = torch.ones_like(indices, dtype=torch.bool) if valid is None else valid[:, None].expand(T, K)
    if trainable is None:
        masks = [(keep, True)]
    else:
        masks = [(keep & trainable, True), (keep & ~trainable, False)]
    return [(indices[m], m.sum(1), weights[m], grad) for m, grad in masks]


class LocalValueTable(ValueTable):
    """Single-process table on ``torch.nn.EmbeddingBag`` (mode="sum", per-sample weights).

    Gradients flow to the rows and to the weights (scores), so keys and queries learn through it.
    Masks zero the per-sample weights of the [T, K] bags (no flattening); the frozen part of a
    split lookup runs without autograd.
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

    def forward(self, indices, weights, valid=None, trainable=None):
        w = weights.to(self.bag.weight.dtype)
        if valid is not None:
            w = w * valid[:, None]
        if trainable is None:
            return self.bag(indices, per_sample_weights=w)
        with torch.no_grad():
            frozen = self.bag(indices, per_sample_weights=w * ~trainable)
        return self.bag(indices, per_sample_weights=w * trainable) + frozen

    def full_weight(self) -> torch.Tensor:
        return self.bag.weight.detach()

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim} ({self.num_rows * self.dim * 4 / 2**20:.1f} MiB fp32)"
