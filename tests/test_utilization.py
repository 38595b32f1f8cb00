"""Memory utilization over a log window, on hand-made accesses: read fraction, entropy, distinct
slots per forward, merged over ranks."""

from __future__ import annotations

import math

import pytest
import torch

from smft_dist.config import MemoryConfig
from smft_dist.model.memory import MemoryAccess, MemoryLayer
from smft_dist.smft.utilization import MemoryUsage, usage_stats
from tests.multiproc import run_ranks


def _layer() -> MemoryLayer:
    return MemoryLayer(8, MemoryConfig(layers=[0], n_keys=2, heads=1, topk=2, k_dim=4), "mem_values_0")  # 4 slots


def _read(usage: MemoryUsage, layer: MemoryLayer, indices: list[list[int]], valid: list[bool] | None = None) -> None:
    layer.last_access = MemoryAccess(torch.tensor(indices), None if valid is None else torch.tensor(valid))
    usage._record(layer, (), None)  # what the forward hook does after a training forward


def test_usage_stats_on_hand_made_counts():
    stats = usage_stats(torch.tensor([3, 1, 0, 0]), torch.tensor([2, 1]))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert stats == pytest.approx({"read_fraction": 0.5, "entropy": entropy, "entropy_ratio": entropy / math.log(4),
                                   "slots_per_forward": 1.5})
    uniform = usage_stats(torch.tensor([2, 2, 2, 2]), torch.tensor([4]))
    assert uniform["entropy_ratio"] == pytest.approx(1.0)


def test_window_counts_skip_padding_and_eval_and_reset():
    layer = _layer()
    usage = MemoryUsage([layer])
    _read(usage, layer, [[0, 1], [0, 0], [3, 3]], valid=[True, True, False])  # slot 3 only on padding
    _read(usage, layer, [[1, 1]])
    with torch.no_grad():
        _read(usage, layer, [[2, 2]])  # an eval forward (no grad): not counted
    scalars, hists = usage.summary()
    assert hists["mem_values_0/access_counts"].tolist() == [3, 3, 0, 0]
    assert scalars["mem_values_0/read_fraction"] == 0.5
    assert scalars["mem_values_0/slots_per_forward"] == 1.5  # {0, 1} then {1}
    assert scalars["mem_values_0/entropy"] == pytest.approx(math.log(2))
    assert usage.summary()[1]["mem_values_0/access_counts"].tolist() == [0, 0, 0, 0]


def _two_rank_window(rank: int, world_size: int) -> tuple[dict, list]:
    layer = _layer()
    usage = MemoryUsage([layer])
    per_rank = {0: [[[0, 1]], [[1, 1]]], 1: [[[1, 2]], [[3, 3]]]}[rank]  # two forwards, this rank's half of each batch
    for indices in per_rank:
        _read(usage, layer, indices)
    scalars, hists = usage.summary()
    return scalars, hists["mem_values_0/access_counts"].tolist()


@pytest.mark.multirank
def test_two_ranks_log_the_global_window():
    (s0, c0), (s1, c1) = run_ranks(_two_rank_window, 2)
    assert c0 == c1 == [1, 4, 1, 2]
    assert s0 == s1
    assert s0["mem_values_0/read_fraction"] == 1.0
    assert s0["mem_values_0/slots_per_forward"] == 2.5  # global forwards read {0, 1, 2} and {1, 3}
