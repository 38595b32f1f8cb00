"""Memory utilization: which value slots training reads, over a log window, merged over ranks; and
the log of the slots SMFT selected at every step (``train.log_selected_slots``).

A forward hook on each memory layer records the slots every training forward (grad enabled) read;
eval forwards (no grad) are skipped and padding is excluded. At each log step,
:meth:`MemoryUsage.log` merges each recorded forward over the ranks with the slot-count service's
sparse exchange (under row-wise sharding every rank saw only its own batch) and logs, per value table:

* ``read_fraction``: fraction of the table's slots read at least once in the window (dead slots
  show as a fraction well below 1 after long training);
* ``entropy`` (nats) and ``entropy_ratio`` = entropy / log N of the window's access distribution
  (1 = every slot read equally often);
* ``slots_per_forward``: distinct slots read by one layer forward of the global batch, averaged
  over the window (the rows a method that trains every accessed row updates per step);
* a TensorBoard histogram of the window's access counts over all N slots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from smft_dist.metrics import MetricLogger
from smft_dist.model.memory import MemoryLayer
from smft_dist.smft.selection import RowSelector
from smft_dist.smft.slot_counts import SlotCounter, local_counts


def usage_stats(counts: torch.Tensor, slots_per_forward: torch.Tensor) -> dict[str, float]:
    """Window figures of one table from its global access counts [N] and the distinct slots of each
    forward [F]."""
    n = counts.numel()
    total = counts.sum()
    p = counts[counts > 0].double() / max(int(total), 1)
    entropy = 0.0 - float((p * p.log()).sum())
    return {
        "read_fraction": float((counts > 0).sum()) / n,
        "entropy": entropy,
        "entropy_ratio": entropy / math.log(n) if n > 1 else 0.0,
        "slots_per_forward": float(slots_per_forward.double().mean()) if slots_per_forward.numel() else 0.0,
    }


class MemoryUsage:
    """Records the slots read by ``layers`` in training forwards until the next :meth:`log`.

    A forward keeps only its (slot, count) pairs (``unique``: the cost grows with the batch, not with
    N); the window becomes a dense [N] count once per log step."""

    def __init__(self, layers: list[MemoryLayer]):
        self.num_slots = {layer.table_name: layer.cfg.num_slots for layer in layers}
        self.reads: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in self.num_slots}
        self.counter = SlotCounter()
        self.hooks = [layer.register_forward_hook(self._record) for layer in layers]

    def _record(self, layer: nn.Module, args: object, output: object) -> None:
        # eval runs without grad; layer.training is no guide (from_pretrained leaves eval mode on)
        if not torch.is_grad_enabled() or layer.last_access is None:
            return
        self.reads[layer.table_name].append(local_counts([layer.last_access.slots()]))

    def summary(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """(scalars ``<table>/<figure>``, histograms ``<table>/access_counts``) of the window, the
        same on every rank (a collective per recorded forward when distributed: every rank records
        the same number of training forwards); resets the window."""
        scalars: dict[str, float] = {}
        hists: dict[str, torch.Tensor] = {}
        for name, n in self.num_slots.items():
            counts = torch.zeros(n, dtype=torch.int64)
            distinct = []
            for slots, local in self.reads[name]:
                slots, total = self.counter.merge(slots, local)  # the global batch of that forward
                counts.index_add_(0, slots.cpu(), total.cpu())
                distinct.append(slots.numel())
            scalars.update({f"{name}/{k}": v for k, v in usage_stats(counts, torch.tensor(distinct)).items()})
            hists[f"{name}/access_counts"] = counts
        self.reads = {name: [] for name in self.num_slots}
        return scalars, hists

    def log(self, logger: MetricLogger, step: int) -> None:
        """Log the window's figures under ``memory/`` (collective: call on every rank)."""
        if not self.num_slots:
            return
        scalars, hists = self.summary()
        logger.log(step, scalars, prefix="memory")
        for tag, values in hists.items():
            logger.histogram(step, f"memory/{tag}", values)


class SelectionLog:
    """Appends ``{"step", "table", "slots"}`` per value table and step to a jsonl file: the rows that
    step trained (global ids, the same on every rank). A resumed run appends again from its
    checkpoint, so readers keep the last record of a (step, table)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, selectors: dict[str, RowSelector]) -> None:
        with open(self.path, "a") as f:
            for table, sel in selectors.items():
                f.write(json.dumps({"step": step, "table": table, "slots": sel.selected.tolist()}) + "\n")
