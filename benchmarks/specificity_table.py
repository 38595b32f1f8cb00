"""Read specificity of memories and selection rules before any training, as one table.

    python -m benchmarks.specificity_table [--grid benchmarks/specificity_grids/smollm2.yaml] [--out DIR] [--report]

The grid file names the finetuning config, the memories (name -> overrides pointing at a retrofitted
model, its tokenizer and its background df) and the rows: a memory and the selection overrides
replayed on it (``method.top_t``, ``method.ranking``, ``method.count_positions``,
``method.row_share_cap``). Each row is one ``python -m smft_dist.analysis.read_specificity`` process
(its own peak memory); finished rows are kept in ``OUT/results.jsonl`` and skipped by a rerun.
``OUT/specificity.md`` holds the table: rows selected (shared by >= 2 facts), the share of known
answer slots the selections train, the share of each new fact's own answer slots its selection
trains, their ratio (lower: more specific), and the share of known answer slots the facts read at
all (what ``memory_ft`` trains).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_GRID = "benchmarks/specificity_grids/smollm2.yaml"


@dataclass(frozen=True)
class Row:
    memory: str
    selection: tuple[str, ...]

    @property
    def key(self) -> str:
        return " ".join((self.memory, *self.selection))


@dataclass(frozen=True)
class Grid:
    config: str
    memories: dict[str, list[str]]
    rows: list[Row]


def load_grid(path: str | Path) -> Grid:
    """The grid file, every row's memory checked to be one the file names."""
    data = yaml.safe_load(Path(path).read_text())
    memories = {name: list(overrides) for name, overrides in data["memories"].items()}
    rows = [Row(memory, tuple(selection.split())) for memory, selection in data["rows"]]
    unknown = sorted({r.memory for r in rows} - set(memories))
    if unknown:
        raise SystemExit(f"benchmarks.specificity_table: {path}: rows name memories the file does not define: {', '.join(unknown)}")
    return Grid(data["config"], memories, rows)


def replay_args(grid: Grid, row: Row) -> list[str]:
    """The read_specificity command line of ``row`` after the interpreter."""
    return ["-m", "smft_dist.analysis.read_specificity", "--config", grid.config, *grid.memories[row.memory], *row.selection]


def run_row(grid: Grid, row: Row) -> dict:
    proc = subprocess.run([sys.executable, *replay_args(grid, row)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"benchmarks.specificity_table: {row.key} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return {"key": row.key, "memory": row.memory, "selection": " ".join(row.selection), **json.loads(proc.stdout)}


def table(results: list[dict]) -> str:
    """Markdown, one line per result in grid order."""
    lines = ["| memory | selection | rows selected (shared) | known answer slots trained | own answer slots trained | ratio | "
             "known answer slots read (memory_ft) | rows read |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['memory']} | {r['selection']} | {r['rows_selected']:,} ({r['rows_shared']:,}) | {100 * r['known_exposed']:.1f}% | "
                     f"{100 * r['new_covered']:.1f}% | {r['known_exposed'] / r['new_covered']:.2f} | "
                     f"{100 * r['known_exposed_every_read']:.1f}% | {r['rows_read']:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default=DEFAULT_GRID)
    p.add_argument("--out", default=None, help="output directory (default runs/specificity_<grid name>)")
    p.add_argument("--report", action="store_true", help="only write the table from results.jsonl")
    args = p.parse_args(argv)
    grid = load_grid(args.grid)
    out = Path(args.out or f"runs/specificity_{Path(args.grid).stem}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = {r["key"]: r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}
    for row in grid.rows:
        if row.key in done or args.report:
            continue
        print(f"specificity_table: {row.key}", flush=True)
        done[row.key] = run_row(grid, row)
        with path.open("a") as f:
            f.write(json.dumps(done[row.key]) + "\n")
    (out / "specificity.md").write_text(table([done[r.key] for r in grid.rows if r.key in done]))
    print((out / "specificity.md").read_text(), end="")


if __name__ == "__main__":
    main()
