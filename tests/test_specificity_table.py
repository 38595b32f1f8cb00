"""benchmarks.specificity_table: shipped grids are valid replay configs, bad grids are refused, the
table's figures come from the results."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.specificity_table import load_grid, replay_args, table
from smft_dist.config import load_config

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("path", sorted(ROOT.glob("benchmarks/specificity_grids/*.yaml")), ids=lambda p: p.name)
def test_every_row_of_a_shipped_grid_is_a_valid_smft_config(path):
    grid = load_grid(path)
    assert grid.rows and len({r.key for r in grid.rows}) == len(grid.rows)
    for row in grid.rows:
        args = replay_args(grid, row)
        cfg = load_config(ROOT / args[args.index("--config") + 1], args[args.index("--config") + 2 :])
        assert cfg.method.name == "smft" and cfg.train.init_from in grid.memories[row.memory][0]


def test_a_row_naming_an_undefined_memory_is_refused(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("config: c.yaml\nmemories: {a: [x=1]}\nrows: [[a, method.top_t=5], [b, method.top_t=5]]\n")
    with pytest.raises(SystemExit, match="does not define: b"):
        load_grid(path)


def test_table_ratio_is_known_over_own():
    r = {"memory": "m", "selection": "method.top_t=5", "rows_selected": 1200, "rows_shared": 30, "known_exposed": 0.05,
         "new_covered": 0.25, "known_exposed_every_read": 0.5, "rows_read": 4000}
    line = table([r]).splitlines()[-1]
    assert line == "| m | method.top_t=5 | 1,200 (30) | 5.0% | 25.0% | 0.20 | 50.0% | 4,000 |"
