"""The slot-count service: the slots a global batch read, and how often, exchanged sparsely.

c(i) is how often slot i was read in the *global* batch, over every token, head and lookup, padding
excluded. Each rank reduces its reads to (slot, count) pairs with ``unique``, the ranks all-gather
those pairs (int32, padded to the longest list), and every rank sums them with ``unique`` again: the
same sorted slots and counts on every rank, so every rank derives the same top-t set. Nothing is
sized by the number of slots N: the cost grows with the batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def local_counts(reads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots int64 [m] ascending, counts int64 [m]) of this rank's reads (flat slot-id tensors)."""
    return torch.cat([r.flatten() for r in reads]).unique(return_counts=True)


class SlotCounter:
    """Global access counts over a process group (all ranks when None)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group

    def global_counts(self, reads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots int64 [m] ascending, counts int64 [m]): every slot the global batch read, and how
        often. ``reads``: this rank's flat slot ids (padding already dropped), any number of lookups."""
        return self.merge(*local_counts(reads))

    def merge(self, slots: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (slots ascending, counts) -> the global batch's, the same on every rank."""
        world = dist.get_world_size(self.group) if dist.is_available() and dist.is_initialized() else 1
        if world == 1:
            return slots, counts
        size = torch.tensor([slots.numel()], device=slots.device)
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=self.group)
        width = int(max(sizes))
        pairs = torch.zeros(2, width, dtype=torch.int32, device=slots.device)  # padding: slot 0, count 0
        pairs[0, : slots.numel()] = slots
        pairs[1, : slots.numel()] = counts
        gathered = [torch.empty_like(pairs) for _ in range(world)]
        dist.all_gather(gathered, pairs, group=self.group)
        every = torch.cat(gathered, dim=1).long()
        every = every[:, every[1] > 0]  # drop padding
        slots, inverse = every[0].unique(return_inverse=True)
        return slots, torch.zeros_like(slots).index_add_(0, inverse, every[1])
