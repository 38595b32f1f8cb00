"""Run metrics: stdout, ``metrics.jsonl`` and TensorBoard, written by rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class MetricLogger:
    """Logs scalar dicts under a step; a no-op on ranks other than 0."""

    def __init__(self, out_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            self.out_dir = Path(out_dir)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))
            self.jsonl = open(self.out_dir / "metrics.jsonl", "a")

    def log(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        for key, value in scalars.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.jsonl.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
        self.jsonl.flush()
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scalars.items())
        print(f"[{prefix}] step {step:>6}  {shown}", flush=True)

    def histogram(self, step: int, tag: str, values) -> None:
        """A TensorBoard histogram of ``values`` (a tensor) under ``tag``."""
        if self.enabled:
            self.writer.add_histogram(tag, values, step)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
