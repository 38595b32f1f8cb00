"""Timing helpers shared by the benchmarks: best-of-N wall time and a same-run copy bandwidth."""

from __future__ import annotations

import time
from typing import Callable

import torch


def best_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 2) -> float:
    """Minimum wall time of ``fn`` over ``repeats`` runs (seconds), after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved_best_times(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 2) -> dict[str, float]:
    """Best wall time of each function, timing them round-robin so load spikes hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], best_time(fn, repeats=1, warmup=0))
    return best


def copy_bandwidth(num_bytes: int = 256 * 2**20, device: str = "cpu") -> float:
    """Bytes moved (read + written) per second by a plain copy of ``num_bytes``, STREAM-style."""
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * num_bytes / best_time(lambda: dst.copy_(src))
