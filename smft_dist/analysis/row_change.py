"""How the value rows changed over a run: per-row update norms against the starting model.

At the end of ``smft_dist.train`` (``train.row_change``), for every value table, ``||row_end - row_start||``
of each row: every rank over its own shard (the starting rows re-read in chunks from
``train.init_from`` or regenerated from the seed, so no rank holds a whole table), then one float
per row gathered. The main rank writes

* ``OUT/row_change.json``: over all tables and per table the :func:`summarize` figures and, where the run logged its
  selections (``train.log_selected_slots``), :func:`change_by_sharing`: the change split by how many
  facts trained each row (distinct facts when every step is one fact record, else steps);
* ``OUT/row_change_hist.jsonl``: per table, the changed rows in log10 bins of their norm (4 a decade).

Shares are of the squared update norm (sum over rows of ||delta||^2, which adds up over rows); a row
changed when its norm is > 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist

CHUNK_ROWS = 65536  # starting rows read per chunk
BINS_PER_DECADE = 4


@torch.no_grad()
def row_update_norms(table, start) -> torch.Tensor:
    """float32 [num_rows] on CPU: ``||row - starting row||`` of every row of a (sharded) value table,
    the same on every rank; collective for a row-wise table. ``start``: the starting rows, a
    [num_rows, dim] tensor or a row source with ``rows(lo, hi)``."""
    local = table.local_weight().detach()
    row_wise = table.placement == "row_wise"
    lo = table.row_offsets[dist.get_rank(table.group)] if row_wise else 0
    norms = torch.empty(local.shape[0], dtype=torch.float32, device=local.device)
    for a in range(0, local.shape[0], CHUNK_ROWS):
        b = min(a + CHUNK_ROWS, local.shape[0])
        rows = start[lo + a : lo + b] if isinstance(start, torch.Tensor) else start.rows(lo + a, lo + b)
        norms[a:b] = (local[a:b].float() - rows.to(local.device).float()).norm(dim=1)
    if not row_wise or dist.get_world_size(table.group) == 1:
        return norms.cpu()
    padded = norms.new_zeros(max(table.row_counts))
    padded[: norms.numel()] = norms
    parts = [torch.empty_like(padded) for _ in table.row_counts]
    dist.all_gather(parts, padded, group=table.group)
    return torch.cat([p[:n] for p, n in zip(parts, table.row_counts)]).cpu()


def summarize(norms: torch.Tensor) -> dict:
    """rows, rows_changed, norm (the whole update's L2 norm), top1pct_share / top10pct_share (squared
    norm carried by the largest 1% / 10% of the changed rows, at least one row), rows_for_half /
    rows_for_90pct (fewest rows carrying 50% / 90% of it) and the Gini coefficient of the changed
    rows' norms (0: all equal; towards 1: a few rows carry the change)."""
    changed = norms.double()[norms > 0].sort(descending=True).values
    k = changed.numel()
    out = {"rows": norms.numel(), "rows_changed": k, "norm": float(changed.square().sum().sqrt())}
    if k == 0:
        return {**out, "top1pct_share": 0.0, "top10pct_share": 0.0, "rows_for_half": 0, "rows_for_90pct": 0, "gini": 0.0}
    cum = changed.square().cumsum(0)
    cum = cum / cum[-1]
    ascending = changed.flip(0)
    ranks = torch.arange(1, k + 1, dtype=torch.float64)
    gini = float(2 * (ranks * ascending).sum() / (k * ascending.sum()) - (k + 1) / k)
    return {**out,
            "top1pct_share": float(cum[max(1, math.ceil(0.01 * k)) - 1]),
            "top10pct_share": float(cum[max(1, math.ceil(0.1 * k)) - 1]),
            "rows_for_half": min(k, int(torch.searchsorted(cum, torch.tensor(0.5, dtype=torch.float64))) + 1),
            "rows_for_90pct": min(k, int(torch.searchsorted(cum, torch.tensor(0.9, dtype=torch.float64))) + 1),
            "gini": gini}


def histogram(norms: torch.Tensor) -> list[dict]:
    """The changed rows in log10 bins of their norm (``BINS_PER_DECADE`` a decade), ascending: each
    bin's [log10_lo, log10_hi), rows and share of the squared norm."""
    changed = norms.double()[norms > 0]
    if changed.numel() == 0:
        return []
    bins = torch.floor(torch.log10(changed) * BINS_PER_DECADE).long()
    total = float(changed.square().sum())
    out = []
    for b in sorted(set(bins.tolist())):
        inside = changed[bins == b]
        out.append({"log10_lo": b / BINS_PER_DECADE, "log10_hi": (b + 1) / BINS_PER_DECADE, "rows": inside.numel(),
                    "norm_sq_share": float(inside.square().sum()) / total})
    return out


def sharing_bucket(k: int) -> str:
    """Label of bucket ``k`` of :func:`change_by_sharing`: '0', '1', '2', '3-4', '5-8', ... (powers of two)."""
    return str(k) if k <= 2 else f"{2 ** (k - 2) + 1}-{2 ** (k - 1)}"


def change_by_sharing(norms: torch.Tensor, sharing: Mapping[int, int]) -> list[dict]:
    """The change split by how many facts (or steps) trained each row (``sharing``: row -> count;
    rows absent: 0): per bucket of :func:`sharing_bucket` that holds a row, its rows, rows changed and
    share of the squared norm, in bucket order."""
    n = norms.double()
    total = float(n.square().sum())
    per_row = torch.zeros(n.numel(), dtype=torch.float64)
    if sharing:
        per_row[torch.tensor(list(sharing))] = torch.tensor(list(sharing.values()), dtype=torch.float64)
    bucket = torch.where(per_row > 0, torch.ceil(torch.log2(per_row.clamp(min=1))) + 1, 0).long()
    out = []
    for k in sorted(set(bucket.tolist())):
        inside = bucket == k
        out.append({"trained_by": sharing_bucket(k), "rows": int(inside.sum()), "rows_changed": int((n[inside] > 0).sum()),
                    "norm_sq_share": float(n[inside].square().sum()) / total if total > 0 else 0.0})
    return out


def rows_sharing(selection_log: Path, records: tuple[int, bool, int] | None) -> dict[str, dict[int, int]]:
    """table -> row -> how many distinct facts trained it, from a ``selected_slots.jsonl``; ``records``
    (number of fact records, shuffle, data seed) of a one-record-per-step stream maps each step to its
    fact, else (None) the steps are counted."""
    from smft_dist.analysis.overlap import read_selection_log, record_of_steps

    trained = read_selection_log(selection_log)
    fact_of_step = record_of_steps(sorted(trained), *records) if records else {step: step for step in trained}
    by_row: dict[str, dict[int, set[int]]] = {}
    for step, slots in trained.items():
        for table, row in slots:
            by_row.setdefault(table, {}).setdefault(row, set()).add(fact_of_step[step])
    return {table: {row: len(s) for row, s in rows.items()} for table, rows in by_row.items()}


def write_row_change(out_dir: str | Path, norms: Mapping[str, torch.Tensor], sharing: dict[str, dict[int, int]] | None,
                     unit: str = "facts") -> dict:
    """Write ``row_change.json`` (``{"all": summary over every table's rows, "tables": {name: summary
    [+ by_sharing]}}``) and ``row_change_hist.jsonl`` (module doc) under ``out_dir``; returns the
    json's content. ``unit``: what ``sharing`` counts (facts or steps)."""
    out = Path(out_dir)
    tables = {}
    for name, n in sorted(norms.items()):
        tables[name] = summarize(n)
        if sharing is not None:
            tables[name]["by_sharing"] = {"unit": unit, "buckets": change_by_sharing(n, sharing.get(name, {}))}
    report = {"all": summarize(torch.cat([norms[name] for name in sorted(norms)])), "tables": tables}
    (out / "row_change.json").write_text(json.dumps(report, indent=1) + "\n")
    with open(out / "row_change_hist.jsonl", "w") as f:
        for name, n in sorted(norms.items()):
            for b in histogram(n):
                f.write(json.dumps({"table": name, **b}) + "\n")
    return report


def log_row_change(par, sources: Mapping, cfg, is_main: bool, num_records: int | None = None) -> dict | None:
    """End of a run: the per-row update norms of every value table of ``par`` against its starting
    rows ``sources`` (:func:`~smft_dist.distributed.parallelize.value_table_sources`; collective), written by the main rank with the change split by sharing where
    ``selected_slots.jsonl`` was logged; ``num_records``: the continual stream's fact records."""
    norms = {name: row_update_norms(table, sources[name]) for name, table in sorted(par.tables.items())}
    if not is_main:
        return None
    log = Path(cfg.train.out_dir) / "selected_slots.jsonl"
    sharing, unit = None, "facts"
    if cfg.train.log_selected_slots and log.is_file():
        stream = cfg.data.continual
        one_fact = (cfg.train.stream == "continual" and cfg.distributed.grad_accum_steps == 1 and num_records
                    and stream.source.schema in ("facts", "documents"))
        unit = "facts" if one_fact else "steps"
        sharing = rows_sharing(log, (num_records, stream.shuffle, cfg.data.seed) if one_fact else None)
    return write_row_change(cfg.train.out_dir, norms, sharing, unit)
