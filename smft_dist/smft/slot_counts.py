"""The slot-count service: the slots a global batch read, and how often.

c(i) is how often slot i was read in the *global* batch, over every token, head and lookup, padding
excluded. Each rank passes its reads as fixed-shape slot-id tensors with ``-1`` (any negative id)
where nothing was read (padding), so every rank holds the same number of entries (the batch shape
is the same on every rank: TorchRec's row-wise lookup requires it). One all-gather of those int32
entries and one sort give every rank the same sorted slots and counts, so every rank derives the
same top-t set. Nothing is sized by the number of slots N: the cost grows with the batch.

``method.count_positions=scored`` counts only the reads at the positions :func:`count_scored` marks
(the value table drops the others from its pending reads, as padding).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist


def _world(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _sorted(values: torch.Tensor) -> torch.Tensor:
    """``values`` (int32) in ascending order. On CPU through NumPy, whose SIMD sort is 4-6x torch's
    CPU sort on int32 (torch 2.13, NumPy 2.4: 2.7 vs 17 ms for 2^19 values, one thread)."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.sort(values.numpy()))
    return values.sort().values


def count_scored(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """bool [B, S]: the positions whose next-token loss is scored (``labels[:, p + 1] != ignore_index``;
    labels aligned with the inputs, as :func:`~smft_dist.model.transformer.lm_loss` shifts them):
    the reads that feed a scored prediction at their own position. The last position predicts
    nothing, and neither does a row's last real token when padding follows it."""
    scored = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    scored[:, :-1] = labels[:, 1:] != ignore_index
    return scored


def count_sorted(reads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots int64 [m] ascending, counts int64 [m]) of a flat slot-id tensor; negative ids (padding)
    are dropped. One int32 sort (twice as fast as int64) and a run-length count."""
    ordered = _sorted(reads.to(torch.int32))
    ordered = ordered[int(torch.searchsorted(ordered, 0)) :]  # padding sorts first
    slots, counts = torch.unique_consecutive(ordered, return_counts=True)
    return slots.long(), counts


def local_counts(reads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots int64 [m] ascending, counts int64 [m]) of this rank's reads (slot-id tensors, negative
    ids are padding)."""
    return count_sorted(torch.cat([r.flatten() for r in reads]))


class SlotCounter:
    """Global access counts over a process group (all ranks when None)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group

    def global_counts(self, reads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots int64 [m] ascending, counts int64 [m]): every slot the global batch read, and how
        often, the same on every rank. ``reads``: this rank's slot ids, any number of lookups, ``-1``
        where nothing was read; collective: every rank passes the same total number of entries."""
        flat = torch.cat([r.flatten() for r in reads]).to(torch.int32)
        world = _world(self.group)
        if world > 1:
            every = flat.new_empty(world * flat.numel())
            dist.all_gather_into_tensor(every, flat, group=self.group)
            flat = every
        return count_sorted(flat)

    def merge(self, slots: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (slots ascending, counts), of any length -> the global batch's, the same on
        every rank. Two collectives (the lengths, then the pairs padded to the longest): for pairs
        kept compactly over many forwards (memory usage), not for the per-step service."""
        world = _world(self.group)
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
