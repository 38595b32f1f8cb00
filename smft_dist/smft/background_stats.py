"""Background statistics per slot i: df(i) = number of background batches that read slot i (for
TF-IDF), and counts(i) = its total reads over those batches (the access distribution q for KL).

Collected once over background (pretraining) batches and stored with the checkpoint; fixed during
finetuning. ``python -m smft_dist.background`` runs the collection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from smft_dist.data.schemas import DataError


@dataclass
class BackgroundStats:
    """Per-table df and access counts over ``num_batches`` background batches."""

    df: dict[str, torch.Tensor]  # table name -> int64 [num_slots]
    num_batches: int = 0
    counts: dict[str, torch.Tensor] = field(default_factory=dict)  # table name -> int64 [num_slots] total reads

    @classmethod
    def empty(cls, num_slots: dict[str, int]) -> BackgroundStats:
        zeros = lambda n: torch.zeros(n, dtype=torch.int64)  # noqa: E731
        return cls({name: zeros(n) for name, n in num_slots.items()}, 0, {name: zeros(n) for name, n in num_slots.items()})

    def add_batch(self, global_counts: dict[str, torch.Tensor]) -> None:
        """Account one global batch given its all-reduced counts per table."""
        for name, counts in global_counts.items():
            self.df[name] += (counts.cpu() > 0).long()
            self.counts[name] += counts.cpu().long()
        self.num_batches += 1

    def save(self, path: str | Path) -> None:
        """Write atomically as safetensors (no pickles)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {f"df.{k}": v.contiguous() for k, v in self.df.items()} | {f"counts.{k}": v.contiguous() for k, v in self.counts.items()}
        save_file(tensors, str(tmp), metadata={"num_batches": str(self.num_batches)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> BackgroundStats:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"background statistics {path}: not found (run python -m smft_dist.background)")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any decoding failure means a bad file
            raise DataError(f"background statistics {path}: unreadable ({e})") from None
        if not meta.get("num_batches", "").isdigit() or int(meta["num_batches"]) <= 0:
            raise DataError(f"background statistics {path}: num_batches metadata is {meta.get('num_batches')!r}, not a positive count")
        return cls({k.removeprefix("df."): v for k, v in tensors.items() if k.startswith("df.")}, int(meta["num_batches"]),
                   {k.removeprefix("counts."): v for k, v in tensors.items() if k.startswith("counts.")})
