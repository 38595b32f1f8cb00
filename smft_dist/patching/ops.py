"""Knowledge-patch operations: diff, apply, revert, merge, forget.

* :func:`diff_tables` (collective, end of an smft / memory_ft run): each rank compares its own rows
  with the rows the table started from and writes the changed ones; :func:`diff`: the same between
  two save_pretrained directories.
* :func:`apply` / revert: a save_pretrained directory plus (minus) a patch into a new directory,
  bit for bit; a model whose table hashes (dense weights too) are not the patch's base is refused.
  :func:`apply_to_model` does it in memory on a ``from_pretrained`` model, :func:`apply_to_tables`
  on a row-sharded model (each rank its rows).
* :func:`merge`: patches of one base into one. Rows in one patch only keep their values exactly;
  rows in several are refused (``refuse``, default) or resolved: ``sum`` (base + the sum of every
  patch's delta) or ``last`` (the last patch given wins).
* :func:`forget`: drop the rows only one fact's steps trained (from the per-step row sets); rows
  other facts' steps trained too are kept and reported.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from smft_dist.model.saved import TABLES, saved_value_rows, table_key, tensor_files
from smft_dist.patching.format import (
    CHUNK_ROWS, Patch, PatchError, RowSource, dense_hash, finish, rows_file_name, saved_dense_hash, source_rows, table_hash,
    write_patch, write_rows_file,
)

POLICIES = ("refuse", "sum", "last")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous().view(torch.int32)


def _changed(cur: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Offsets of the rows whose fp32 bits differ."""
    return torch.nonzero((_bits(cur) != _bits(base)).any(1)).flatten()


def saved_tables(model_dir: str | Path) -> dict[str, tuple[int, int]]:
    """Value table name -> (num_rows, dim) of a save_pretrained directory."""
    out = {}
    for key in tensor_files(model_dir):
        if key.startswith(TABLES) and key.endswith(".bag.weight"):
            name = key[len(TABLES):-len(".bag.weight")]
            out[name] = tuple(saved_value_rows(model_dir, name).shape)
    return out


# ----------------------------------------------------------------------------------------- diff
def diff(base_dir: str | Path, model_dir: str | Path, out: str | Path, method: str = "diff") -> Path:
    """The patch that turns ``base_dir`` into ``model_dir`` (two save_pretrained models of one base;
    their dense weights must be equal)."""
    _refuse_existing(out)
    base_tables, model_tables = saved_tables(base_dir), saved_tables(model_dir)
    if base_tables != model_tables:
        raise PatchError(f"{model_dir}: value tables {model_tables} differ from the base's {base_tables}")
    dense = saved_dense_hash(base_dir)
    if saved_dense_hash(model_dir) != dense:
        raise PatchError(f"{model_dir}: dense weights differ from {base_dir}'s; a knowledge patch carries value rows only "
                         "(smft / memory_ft runs)")
    tables, entries = {}, {}
    for name, (n, dim) in base_tables.items():
        base, model = saved_value_rows(base_dir, name), saved_value_rows(model_dir, name)
        rows, new, old = [], [], []
        for lo in range(0, n, CHUNK_ROWS):
            cur, ref = model.rows(lo, min(n, lo + CHUNK_ROWS)), base.rows(lo, min(n, lo + CHUNK_ROWS))
            idx = _changed(cur, ref)
            rows.append(idx + lo), new.append(cur[idx]), old.append(ref[idx])
        tables[name] = {"num_rows": n, "dim": dim, "base_hash": table_hash(base, n)}
        entries[name] = (torch.cat(rows), torch.cat(new), torch.cat(old))
    history = [{"op": "diff", "base": str(base_dir), "model": str(model_dir)}]
    return write_patch(out, tables, entries, {"method": method, "config": None, "dense_hash": dense, "history": history})


def _owned_range(table) -> tuple[int, int, int]:
    """(lo, hi, offset of lo in the local weight) of the rows this rank writes: its shard, or for a
    replicated table its share of the rows."""
    rank, world = dist.get_rank(table.group), dist.get_world_size(table.group)
    if table.placement == "data_parallel":
        per = -(-table.num_rows // world)
        lo, hi = min(table.num_rows, rank * per), min(table.num_rows, (rank + 1) * per)
        return lo, hi, 0
    lo = table.row_offsets[rank] if world > 1 else 0
    return lo, lo + table.local_weight().shape[0], lo


def diff_tables(par, sources: dict[str, RowSource], out: str | Path, manifest: dict, steps: dict | None = None) -> Path:
    """Write the patch of a run (all ranks call): the rows of ``par``'s tables that differ from
    ``sources`` (the rows each table started from). Each rank compares and writes only its own rows;
    rank 0 adds ``steps`` and the manifest (``manifest``: method, config, dense_hash)."""
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    meta, mine = {}, {}
    for name, table in par.tables.items():
        src = sources[name]
        meta[name] = {"num_rows": table.num_rows, "dim": table.dim, "base_hash": table_hash(src, table.num_rows)}
        lo, hi, off = _owned_range(table)
        local = table.local_weight().detach()
        rows, new, old = [], [], []
        for a in range(lo, hi, CHUNK_ROWS):
            b = min(hi, a + CHUNK_ROWS)
            cur, ref = local[a - off : b - off].float().cpu(), source_rows(src, a, b)
            idx = _changed(cur, ref)
            rows.append(idx + a), new.append(cur[idx]), old.append(ref[idx])
        rows_t, new_t, old_t = torch.cat(rows), torch.cat(new), torch.cat(old)
        mine[name] = (rows_t, table.dim, lambda i, j, v=new_t: v[i:j], lambda i, j, v=old_t: v[i:j])
        count = torch.tensor(rows_t.numel())
        dist.all_reduce(count)
        meta[name]["rows_changed"] = int(count)
    write_rows_file(tmp / rows_file_name(rank, world), mine)
    dist.barrier()
    if rank == 0:
        finish(tmp, out, {**manifest, "world_size": world, "tables": meta}, steps)
    dist.barrier()
    return out


def run_steps(cfg) -> dict | None:
    """The per-step row sets of a run made with ``train.log_selected_slots`` (None without), and for
    a one-fact-per-step stream the fact each step trained: {"steps": [{step, fact, rows: {table:
    [row, ...]}}], "facts": {id: record}} (fact ids: the record's index in the stream's source)."""
    from smft_dist.analysis.overlap import record_of_steps
    from smft_dist.data.sources import load_records

    log = Path(cfg.train.out_dir) / "selected_slots.jsonl"
    if not cfg.train.log_selected_slots or not log.is_file():
        return None
    records: dict[int, dict[str, list[int]]] = defaultdict(dict)
    for line in log.read_text().splitlines():  # a resumed run repeats steps: the last record wins
        if line.strip():
            r = json.loads(line)
            records[r["step"]][r["table"]] = sorted(r["slots"])
    stream = cfg.data.continual
    facts: dict[str, dict] = {}
    fact_of: dict[int, int] = {}
    if (cfg.train.stream == "continual" and cfg.distributed.grad_accum_steps == 1
            and stream.source.schema in ("facts", "documents")):
        source = load_records(stream.source, stream.source.schema, cfg.data.cache_dir)
        fact_of = record_of_steps(sorted(records), len(source), stream.shuffle, cfg.data.seed)
        keep = ("fact", "question", "answer") if stream.source.schema == "facts" else ("document",)
        facts = {str(i): {k: source[i][k] for k in keep} for i in sorted(set(fact_of.values()))}
    steps = [{"step": s, "fact": str(fact_of[s]) if s in fact_of else None, "rows": records[s]} for s in sorted(records)]
    return {"steps": steps, "facts": facts}


def write_run_patch(par, sources: dict[str, RowSource], cfg) -> Path:
    """The patch of a finished smft / memory_ft run to ``train.out_dir/patch`` (all ranks call):
    the changed rows, the run's config, and its per-step row sets when it logged them."""
    from smft_dist.config import to_dict

    manifest, steps = {}, None
    if dist.get_rank() == 0:
        dense = saved_dense_hash(cfg.train.init_from) if cfg.train.init_from else model_dense_hash(par.model)
        manifest = {"method": cfg.method.name, "config": to_dict(cfg), "dense_hash": dense,
                    "history": [{"op": "train", "out_dir": cfg.train.out_dir}]}
        steps = run_steps(cfg)
    return diff_tables(par, sources, Path(cfg.train.out_dir) / "patch", manifest, steps)


def model_dense_hash(model) -> str:
    """:func:`dense_hash` of a model's weights other than value tables, under the names and with the
    tied output dropped as :func:`~smft_dist.distributed.checkpoint.export_hf` saves them."""
    from smft_dist.model.saved import PREFIX

    state = {PREFIX + k: v for k, v in model.state_dict().items() if not k.startswith("value_tables.")}
    if model.cfg.tie_embeddings:
        state.pop(PREFIX + "output.weight")
    return dense_hash(state.items())


# ------------------------------------------------------------------------------- apply / revert
def apply(model_dir: str | Path, patch: str | Path | Patch, out: str | Path, reverse: bool = False) -> Path:
    """``model_dir`` + ``patch`` (``reverse``: minus) into the new save_pretrained directory ``out``.

    Apply refuses a model whose tables or dense weights are not the patch's base; revert refuses one
    whose rows are not the patch's new values, and checks that the result hashes to the base. Tables
    are copied and then rewritten in place, one run of consecutive patched rows at a time."""
    p = patch if isinstance(patch, Patch) else Patch(patch)
    model_dir, out = Path(model_dir), Path(out)
    _refuse_existing(out)
    have = saved_tables(model_dir)
    for name, m in p.tables.items():
        if have.get(name) != (m["num_rows"], m["dim"]):
            raise PatchError(f"{model_dir}: no value table {name} of {m['num_rows']} x {m['dim']} rows (patch {p.path})")
    if saved_dense_hash(model_dir) != p.manifest["dense_hash"]:
        raise PatchError(f"{model_dir}: dense weights are not those of patch {p.path}'s base model")
    for name, m in p.tables.items():
        if not reverse and table_hash(saved_value_rows(model_dir, name), m["num_rows"]) != m["base_hash"]:
            raise PatchError(f"{model_dir}: value table {name} is not the base of patch {p.path} (hash mismatch)")
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    try:
        for name, m in p.tables.items():
            _rewrite_table(tmp, name, m, p, reverse, model_dir)
            if reverse and table_hash(saved_value_rows(tmp, name), m["num_rows"]) != m["base_hash"]:
                raise PatchError(f"{model_dir}: reverting patch {p.path} does not give its base back (table {name})")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out)
    return out


def _rewrite_table(copy: Path, name: str, meta: dict, p: Patch, reverse: bool, model_dir: Path) -> None:
    """Write the patch's rows of table ``name`` into ``copy`` (of ``model_dir``, which errors name)."""
    key = table_key(name)
    file = tensor_files(copy)[key]
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(n))[key]
    if entry["dtype"] != "F32":
        raise PatchError(f"{model_dir}: value table {name} is {entry['dtype']}; patches apply to fp32 tables")
    start, row_bytes = 8 + n + entry["data_offsets"][0], 4 * meta["dim"]
    span = CHUNK_ROWS * 16
    with open(file, "r+b") as f:
        for lo in range(0, meta["num_rows"], span):
            rows, new, old = p.entries(name, lo, lo + span)
            if not rows.numel():
                continue
            want, put = (new, old) if reverse else (old, new)
            cur = _read_rows(f, start, row_bytes, rows, meta["dim"])
            if not torch.equal(_bits(cur), _bits(want)):
                what = "the patched model" if reverse else "the base"
                raise PatchError(f"{model_dir}: rows of value table {name} are not those of {what} of patch {p.path}")
            for a, b in _runs(rows):
                f.seek(start + int(rows[a]) * row_bytes)
                f.write(put[a:b].contiguous().numpy().tobytes())


def _runs(rows: torch.Tensor) -> list[tuple[int, int]]:
    """[a, b) index ranges of consecutive row ids in sorted ``rows``."""
    breaks = (torch.nonzero(rows[1:] - rows[:-1] != 1).flatten() + 1).tolist()
    return list(zip([0, *breaks], [*breaks, rows.numel()]))


def _read_rows(f, start: int, row_bytes: int, rows: torch.Tensor, dim: int) -> torch.Tensor:
    parts = []
    for a, b in _runs(rows):
        f.seek(start + int(rows[a]) * row_bytes)
        parts.append(torch.frombuffer(bytearray(f.read((b - a) * row_bytes)), dtype=torch.float32).view(b - a, dim))
    return torch.cat(parts)


@torch.no_grad()
def apply_to_model(model: torch.nn.Module, patch: str | Path | Patch, reverse: bool = False) -> torch.nn.Module:
    """Apply (or revert) ``patch`` in place to a model with local value tables, e.g. the one
    ``AutoModelForCausalLM.from_pretrained(BASE)`` returns; the tables must hash to the patch's base."""
    p = patch if isinstance(patch, Patch) else Patch(patch)
    tables = (model.model if hasattr(model, "model") else model).value_tables
    for name, m in p.tables.items():
        if name not in tables or tuple(tables[name].weight.shape) != (m["num_rows"], m["dim"]):
            raise PatchError(f"model has no value table {name} of {m['num_rows']} x {m['dim']} rows (patch {p.path})")
        weight = tables[name].weight
        rows, new, old = p.entries(name)
        want, put = (new, old) if reverse else (old, new)
        if not reverse and table_hash(weight.detach().cpu(), m["num_rows"]) != m["base_hash"]:
            raise PatchError(f"model: value table {name} is not the base of patch {p.path} (hash mismatch)")
        if not torch.equal(_bits(weight[rows].cpu()), _bits(want)):
            raise PatchError(f"model: rows of value table {name} are not those of the patched model of {p.path}")
        weight[rows.to(weight.device)] = put.to(weight.device, weight.dtype)
    return model


@torch.no_grad()
def apply_to_tables(par, patch: str | Path | Patch, reverse: bool = False) -> None:
    """Apply (or revert) ``patch`` to a row-sharded model in place (all ranks call; each reads and
    writes only the rows of its shard). The patched rows must hold the patch's old (``reverse``: new)
    values on every rank, else nothing is written and every rank raises :class:`PatchError`."""
    p = patch if isinstance(patch, Patch) else Patch(patch)
    plans, ok = [], torch.ones(())
    for name, m in p.tables.items():
        table = par.tables.get(name)
        if table is None or (table.num_rows, table.dim) != (m["num_rows"], m["dim"]):
            raise PatchError(f"model has no value table {name} of {m['num_rows']} x {m['dim']} rows (patch {p.path})")
        local = table.local_weight()
        lo = table.row_offsets[dist.get_rank(table.group)] if table.placement == "row_wise" and dist.get_world_size(table.group) > 1 else 0
        rows, new, old = p.entries(name, lo, lo + local.shape[0])
        want, put = (new, old) if reverse else (old, new)
        at = (rows - lo).to(local.device)
        ok *= float(torch.equal(_bits(local.detach()[at].cpu()), _bits(want)))
        plans.append((local, at, put))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok:
        raise PatchError(f"model: patched rows are not those of the {'patched model' if reverse else 'base'} of {p.path}")
    for local, at, put in plans:
        local[at] = put.to(local.device, local.dtype)


# ----------------------------------------------------------------------------------------- merge
def _same_base(patches: list[Patch]) -> dict[str, dict]:
    """The tables of all ``patches`` (num_rows, dim, base_hash), after checking they share one base."""
    dense = {p.manifest["dense_hash"] for p in patches}
    if len(dense) > 1:
        raise PatchError(f"patches {', '.join(str(p.path) for p in patches)} have different base models (dense weights)")
    tables: dict[str, dict] = {}
    for p in patches:
        for name, m in p.tables.items():
            base = {k: m[k] for k in ("num_rows", "dim", "base_hash")}
            if tables.setdefault(name, base) != base:
                raise PatchError(f"{p.path}: value table {name} has another base than the other patches'")
    return tables


def overlaps(patches: list[Patch]) -> dict[str, int]:
    """Table -> rows that more than one of ``patches`` changes (tables without any left out)."""
    out = {}
    for name in sorted({t for p in patches for t in p.tables}):
        rows = torch.cat([p.rows(name) for p in patches if name in p.tables])
        n = int((torch.bincount(rows) > 1).sum()) if rows.numel() else 0
        if n:
            out[name] = n
    return out


def merge(patches: list[str | Path | Patch], out: str | Path, policy: str = "refuse") -> tuple[Path, dict[str, int]]:
    """One patch of ``patches`` (one base); returns it and the overlapping rows per table."""
    if policy not in POLICIES:
        raise PatchError(f"merge policy {policy!r} is not one of {', '.join(POLICIES)}")
    _refuse_existing(out)
    ps = [p if isinstance(p, Patch) else Patch(p) for p in patches]
    tables = _same_base(ps)
    shared = overlaps(ps)
    if shared and policy == "refuse":
        where = ", ".join(f"{t}: {n}" for t, n in shared.items())
        raise PatchError(f"merge: {sum(shared.values())} rows are changed by more than one patch ({where}); "
                         "choose --policy sum (add the deltas) or --policy last (the last patch's values win)")
    entries = {}
    for name, m in tables.items():
        parts = [p.entries(name) for p in ps if name in p.tables]
        rows = torch.unique(torch.cat([r for r, _, _ in parts]))
        new, old = torch.empty(rows.numel(), m["dim"]), torch.empty(rows.numel(), m["dim"])
        delta, count = torch.zeros(rows.numel(), m["dim"]), torch.zeros(rows.numel(), dtype=torch.long)
        for r, n_, o in parts:
            at = torch.searchsorted(rows, r)
            old[at], new[at] = o, n_  # one base: old agrees; later patches win
            delta[at] += n_ - o
            count[at] += 1
        if policy == "sum":
            many = count > 1
            new[many] = old[many] + delta[many]
        entries[name] = (rows, new, old)
    history = [{"op": "merge", "policy": policy, "overlap": shared, "sources": [p.describe() for p in ps]}]
    manifest = {"method": "merge", "config": None, "dense_hash": ps[0].manifest["dense_hash"], "history": history}
    return write_patch(out, tables, entries, manifest, _merged_steps(ps)), shared


def _merged_steps(ps: list[Patch]) -> dict | None:
    """The sources' step records one after the other (steps renumbered); fact ids become
    ``<source index>:<id>``."""
    if all(p.steps is None for p in ps):
        return None
    steps, facts, offset = [], {}, 0
    for i, p in enumerate(ps):
        s = p.steps or {"steps": [], "facts": {}}
        for rec in s["steps"]:
            fact = None if rec["fact"] is None else f"{i}:{rec['fact']}"
            steps.append({**rec, "step": offset + rec["step"], "fact": fact})
        facts.update({f"{i}:{k}": v for k, v in s["facts"].items()})
        offset += max((rec["step"] for rec in s["steps"]), default=0)
    return {"steps": steps, "facts": facts}


# ---------------------------------------------------------------------------------------- forget
def resolve_fact(steps: dict, fact: str) -> str:
    """The fact id ``fact`` names: an id, or text found (case-insensitive) in exactly one fact."""
    if fact in steps["facts"]:
        return fact
    needle = fact.lower()
    hits = [k for k, v in steps["facts"].items() if any(needle in str(x).lower() for x in v.values())]
    if len(hits) != 1:
        shown = "; ".join(f"{k}: {steps['facts'][k].get('fact', '')}" for k in hits[:3])
        raise PatchError(f"--fact {fact!r}: {'no fact' if not hits else f'{len(hits)} facts'} match" + (f" ({shown})" if hits else ""))
    return hits[0]


def forget(patch: str | Path | Patch, fact: str, out: str | Path, include_shared: bool = False) -> dict:
    """A copy of ``patch`` without the rows only ``fact``'s steps trained (applied, they keep their
    base values) and without its steps; returns what was reverted and what was shared.
    ``include_shared``: drop every row its steps trained, also those other facts' steps trained (they
    lose those facts' updates too)."""
    p = patch if isinstance(patch, Patch) else Patch(patch)
    if p.steps is None:
        raise PatchError(f"{p.path}: no per-step row sets (train with train.log_selected_slots=true to forget facts)")
    _refuse_existing(out)
    key = resolve_fact(p.steps, fact)
    mine: dict[str, set[int]] = defaultdict(set)
    others: dict[str, set[int]] = defaultdict(set)
    for rec in p.steps["steps"]:
        for table, rows in rec["rows"].items():
            (mine if rec["fact"] == key else others)[table].update(rows)
    entries, reverted, shared = {}, {}, {}
    for name in p.tables:
        rows, new, old = p.entries(name)
        only = torch.tensor(sorted(mine[name] if include_shared else mine[name] - others[name]), dtype=torch.long)
        drop = torch.isin(rows, only)
        entries[name] = (rows[~drop], new[~drop], old[~drop])
        reverted[name] = int(drop.sum())
        shared[name] = int(torch.isin(rows, torch.tensor(sorted(mine[name] & others[name]), dtype=torch.long)).sum())
    steps = {"steps": [r for r in p.steps["steps"] if r["fact"] != key],
             "facts": {k: v for k, v in p.steps["facts"].items() if k != key}}
    tables = {t: {k: m[k] for k in ("num_rows", "dim", "base_hash")} for t, m in p.tables.items()}
    report = {"fact": key, "text": p.steps["facts"][key], "include_shared": include_shared, "rows_reverted": reverted, "rows_shared": shared,
              "steps_removed": len(p.steps["steps"]) - len(steps["steps"])}
    history = [*p.manifest.get("history", []), {"op": "forget", "source": p.describe(), **report}]
    manifest = {"method": p.manifest["method"], "config": p.manifest.get("config"), "dense_hash": p.manifest["dense_hash"],
                "history": history}
    write_patch(out, tables, entries, manifest, steps)
    return report


def _refuse_existing(out: str | Path) -> None:
    if Path(out).exists():
        raise PatchError(f"{out}: exists; choose another output path (nothing was written)")
