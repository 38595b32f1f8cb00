"""The slot-count service: per-rank access counts -> all-reduce -> global counts c(i).

c(i) is how often slot i was read in the *global* batch, over every token and head, padding
excluded. Every rank holds the same vector afterwards, so every rank derives the same top-t set.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from smft_dist.model.memory import MemoryAccess


class SlotCounter:
    """Counts accesses of one value table's ``num_slots`` slots, summed over a process group."""

    def __init__(self, num_slots: int, group: dist.ProcessGroup | None = None):
        self.num_slots = num_slots
        self.group = group

    def local_counts(self, access: MemoryAccess) -> torch.Tensor:
        """int64 [num_slots]: reads of each slot by this rank's valid tokens."""
        idx = access.indices if access.valid is None else access.indices[access.valid]
        return torch.bincount(idx.flatten(), minlength=self.num_slots)

    def global_counts(self, access: MemoryAccess) -> torch.Tensor:
        """int64 [num_slots]: reads of each slot in the global batch (all-reduced when distributed)."""
        counts = self.local_counts(access)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.group)
        return counts
