"""Run metrics: stdout, ``metrics.jsonl`` and TensorBoard, written by rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class MetricLogger:
    """Logs scalar dicts under a step; a no-op on ranks other than 0.

    ``resume_step``: the run (re)starts after this step, so what an earlier attempt logged past it is
    dropped from ``metrics.jsonl`` and hidden in TensorBoard (``purge_step``); steps never repeat.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        if enabled:
            self.out_dir = Path(out_dir)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / "metrics.jsonl"
            purge = resume_step + 1 if resume_step is not None and path.is_file() else None
            if purge is not None:
                kept = [line for line in path.read_text().splitlines(keepends=True) if _step(line) <= resume_step]
                part = path.with_name(path.name + ".part")
                part.write_text("".join(kept))
                part.replace(path)
            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge)
            self.jsonl = open(path, "a")

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


def _step(line: str) -> float:
    """The step of a metrics.jsonl line (a torn last line counts as past every step)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
