"""Product-key memory layer (Lample et al. 2019; Berges et al. 2024 "Memory+"; Lin et al. 2025).

A query per head is scored against two sets of ``n_keys`` half-keys; the top-k of each half are
combined into k*k candidate sums, the best k of those are the slots read (index = i1 * n_keys + i2),
their scores are softmaxed in fp32, and all heads' (index, score) pairs form one weighted bag per
token that a :class:`~smft_dist.model.value_table.ValueTable` pools. The output is
``W2(pooled * silu(W1 x))``. The N = n_keys**2 full keys are never built.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from smft_dist.config import MemoryConfig
from smft_dist.model.value_table import ValueTable, read_slots

class MemoryAccess(NamedTuple):
    """The slots one forward read: ``indices`` [T, heads*k] and ``valid`` [T] (False = padding;
    None = no padding)."""

    indices: torch.Tensor
    valid: torch.Tensor | None

    def slots(self) -> torch.Tensor:
        """``indices`` with -1 at padded tokens (the slot-count service's input)."""
        return read_slots(self.indices, None if self.valid is None else self.valid[:, None].expand_as(self.indices))


def product_key_topk(query: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k slots of the product key set for each query.

    Args:
        query: [T, H, k_dim] queries, one per head.
        keys: [H, 2, n_keys, k_dim // 2] the two half-key sets of each head.
        k: slots kept per head.
    Returns:
        (scores [T, H, k] raw dot products in descending order, indices [T, H, k] in [0, n_keys**2)).
    """
    n_keys = keys.shape[2]
    q1, q2 = query.chunk(2, dim=-1)
    s1 = torch.einsum("thd,hnd->thn", q1, keys[:, 0])
    s2 = torch.einsum("thd,hnd->thn", q2, keys[:, 1])
    v1, i1 = s1.topk(k, dim=-1)
    v2, i2 = s2.topk(k, dim=-1)
    cand = (v1[..., :, None] + v2[..., None, :]).flatten(-2)  # [T, H, k*k]
    scores, best = cand.topk(k, dim=-1)
    idx = i1.gather(-1, best // k) * n_keys + i2.gather(-1, best % k)
    return scores, idx


class MemoryLayer(nn.Module):
    """Memory+ block body: product-key retrieval, value bag, silu-gated projection.

    The value table is *bound* (not owned): the model keeps tables in one place so a sharded table
    can replace a local one, or several layers can share one pool.
    """

    def __init__(self, dim: int, cfg: MemoryConfig, table_name: str):
        super().__init__()
        self.cfg = cfg
        self.table_name = table_name
        self.v_dim = cfg.v_dim or dim
        self.query = nn.Linear(dim, cfg.heads * cfg.k_dim, bias=cfg.query_bias)
        self.query_norm = nn.RMSNorm(cfg.k_dim, eps=1e-6) if cfg.query_norm else None
        self.keys = nn.Parameter(torch.empty(cfg.heads, 2, cfg.n_keys, cfg.k_dim // 2))
        self.w1 = nn.Linear(dim, self.v_dim, bias=False)
        self.w2 = nn.Linear(self.v_dim, dim, bias=False)
        self._table: list[ValueTable] = []  # a list keeps the table out of this module's tree
        self.last_access: MemoryAccess | None = None

    def reset_parameters(self) -> None:
        """Reference init: keys U(+-1/sqrt(k_dim)), query xavier, W1/W2 N(0, dim^-1/2)."""
        bound = self.cfg.k_dim**-0.5
        nn.init.uniform_(self.keys, -bound, bound)
        nn.init.xavier_uniform_(self.query.weight)
        if self.query.bias is not None:
            nn.init.zeros_(self.query.bias)
        for w in (self.w1, self.w2):
            nn.init.normal_(w.weight, std=w.in_features**-0.5)

    def bind_table(self, table: ValueTable) -> None:
        if table.dim != self.v_dim:
            raise ValueError(f"value table {self.table_name!r} has dim {table.dim}, memory layer needs v_dim={self.v_dim}")
        if table.num_rows != self.cfg.num_slots:
            raise ValueError(f"value table {self.table_name!r} has {table.num_rows} rows, memory layer needs {self.cfg.num_slots}")
        self._table[:] = [table]

    @property
    def table(self) -> ValueTable:
        if not self._table:
            raise RuntimeError(f"memory layer reading {self.table_name!r} has no value table bound")
        return self._table[0]

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, dim] -> (indices [T, heads*k], scores [T, heads*k] softmaxed per head in >= fp32)."""
        q = self.query(x).view(x.shape[0], self.cfg.heads, self.cfg.k_dim)
        if self.query_norm is not None:
            q = self.query_norm(q)
        scores, indices = product_key_topk(q, self.keys.to(q.dtype), self.cfg.topk)
        scores = F.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
        return indices.flatten(1), scores.flatten(1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, dim], valid [B, S] (False = padding, reads no memory) -> [B, S, dim]."""
        B, S, D = x.shape
        flat = x.reshape(B * S, D)
        valid = None if valid is None else valid.reshape(B * S).bool()
        indices, scores = self.retrieve(flat)
        self.last_access = MemoryAccess(indices, valid)
        pooled = self.table(indices, scores, valid).to(x.dtype)
        return self.w2(pooled * F.silu(self.w1(flat))).view(B, S, D)
