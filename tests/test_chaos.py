"""Faults on a schedule (benchmarks/chaos.py): the schedule itself, and a 2-rank SMFT run stopped by one
fault of each kind (SIGKILL, SIGTERM, SIGKILL during a save, a flipped byte in the newest
checkpoint) and restarted until it finishes, exporting what an uninterrupted run exports, bit for bit."""

from __future__ import annotations

import pytest

from benchmarks.chaos import KINDS, fault_schedule, run


def test_fault_schedule_deals_every_kind_and_is_fixed_by_its_seed():
    a = fault_schedule(0, 2 * len(KINDS))
    assert a == fault_schedule(0, 2 * len(KINDS)) and a != fault_schedule(1, 2 * len(KINDS))
    assert sorted(f.kind for f in a) == sorted(2 * KINDS)
    assert {f.rank for f in a} <= {0, 1}
    assert all(0 <= f.share < 1 and 0 <= f.delay < 1 for f in a)


@pytest.mark.slow
@pytest.mark.multirank
def test_run_killed_by_each_kind_of_fault_exports_the_uninterrupted_model(tmp_path):
    lines: list[str] = []
    result = run(seed=0, n_faults=len(KINDS), steps=8, tmp=tmp_path, log=lines.append)
    assert result["faults"] == len(KINDS), lines
    assert {line.split(": ")[1] for line in lines if line.startswith("fault ")} == set(KINDS), lines
    assert result["bit_equal"], lines
