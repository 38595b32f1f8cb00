"""The knowledge-patch file: the value rows a run changed, their new and old values, and a manifest.

Layout (a directory)::

    P/patch.json                          format, method, config, per table: num_rows, dim, the base
                                          table's hash and rows changed; the dense weights' hash; every
                                          file with its size and crc32; the manifest's own crc32
      rows-00000-of-00002.safetensors     per table ``<t>.rows`` (int64 [n], sorted), ``<t>.new`` and
      rows-00001-of-00002.safetensors     ``<t>.old`` (fp32 [n, dim]); each writer's rows, disjoint
      steps.json                          optional: per step the rows it selected and the fact it
                                          trained (``train.log_selected_slots``), and the facts

A patch written on W ranks holds W row files (each rank writes the rows of its own shard); readers
take the files in order, so the rows come out sorted whatever W was. Hashes identify the base model
so that a patch is never applied to another one: a table's hash is the sha256 of the sha256 of each
block of ``HASH_ROWS`` fp32 rows (blocks are global, so any number of ranks can compute it from a row
source, each hashing its share), the dense hash covers every other saved tensor (name, shape, fp32
bytes) in name order.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from safetensors import safe_open

from smft_dist.distributed.checkpoint import SafetensorsWriter, file_crc32, manifest_crc, write_atomic
from smft_dist.model.value_table import SavedRows, SeededRows

FORMAT = 1
MANIFEST = "patch.json"
STEPS = "steps.json"
HASH_ROWS = 16384  # rows per hashed block of a table (64 MiB at dim 1024)
CHUNK_ROWS = 16384  # rows read or written at a time

RowSource = torch.Tensor | SeededRows | SavedRows


class PatchError(RuntimeError):
    """A patch is missing, corrupt, or does not fit the model or the other patches."""


def source_rows(src: RowSource, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of a whole-table tensor or a row source, fp32."""
    return src[lo:hi].float() if isinstance(src, torch.Tensor) else src.rows(lo, hi)


def rows_file_name(rank: int, world: int) -> str:
    return f"rows-{rank:05d}-of-{world:05d}.safetensors"


# -------------------------------------------------------------------------------------- hashes
def table_hash(src: RowSource, num_rows: int) -> str:
    """Hash of a table's rows, read block by block from ``src``. With a process group each rank
    hashes every W-th block and all get the same hash (collective)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    blocks = range(0, num_rows, HASH_ROWS)
    mine = {lo: hashlib.sha256(source_rows(src, lo, min(num_rows, lo + HASH_ROWS)).contiguous().numpy().tobytes()).hexdigest()
            for lo in list(blocks)[rank::world]}
    if world > 1:
        shares: list[dict] = [{} for _ in range(world)]
        dist.all_gather_object(shares, mine)
        mine = {k: v for share in shares for k, v in share.items()}
    return hashlib.sha256("".join(mine[lo] for lo in blocks).encode()).hexdigest()


def dense_hash(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Hash of the dense weights: (name, shape, fp32 bytes) in name order."""
    h = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda item: item[0]):
        h.update(f"{name}:{list(t.shape)};".encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def saved_dense_hash(model_dir: str | Path) -> str:
    """:func:`dense_hash` of a save_pretrained directory's tensors other than value tables."""
    from smft_dist.model.saved import TABLES, tensor_files

    by_file: dict[Path, list[str]] = {}
    for key, file in tensor_files(model_dir).items():
        if not key.startswith(TABLES):
            by_file.setdefault(file, []).append(key)

    def tensors():
        for file, keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                for k in keys:
                    yield k, f.get_tensor(k)

    return dense_hash(tensors())


# -------------------------------------------------------------------------------------- writing
def write_rows_file(path: Path, tables: dict[str, tuple[torch.Tensor, int, Callable, Callable]]) -> None:
    """One row file: per table (rows [n] sorted, dim, new(a, b), old(a, b)), where ``new``/``old``
    return the values of ``rows[a:b]``; values are written ``CHUNK_ROWS`` rows at a time."""
    shapes, dtypes = {}, {}
    for name, (rows, dim, _, _) in tables.items():
        shapes[f"{name}.rows"], dtypes[f"{name}.rows"] = (rows.numel(),), torch.int64
        shapes[f"{name}.new"] = shapes[f"{name}.old"] = (rows.numel(), dim)
    writer = SafetensorsWriter(path, shapes, dtypes)
    for rows, _, new, old in tables.values():
        writer.write(rows.long())
        for values in (new, old):
            for a in range(0, rows.numel(), CHUNK_ROWS):
                writer.write(values(a, min(rows.numel(), a + CHUNK_ROWS)).float().cpu())
    writer.close()


def finish(tmp: Path, out: Path, manifest: dict, steps: dict | None) -> None:
    """Rank 0 (or the only process), after every row file is in ``tmp``: steps.json, the manifest
    with each file's size and crc32 (patches are small: one process hashes them), then ``tmp``
    replaces ``out``."""
    if steps is not None:
        write_atomic(tmp / STEPS, json.dumps(steps))
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    manifest = {"format": FORMAT, **manifest,
                "files": {f: {"size": (tmp / f).stat().st_size, "crc32": file_crc32(tmp / f)} for f in files}}
    manifest["manifest_crc32"] = manifest_crc(manifest)
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def write_patch(out: str | Path, tables: dict[str, dict], entries: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                manifest: dict, steps: dict | None = None) -> Path:
    """A one-file patch from in-memory entries (table -> (rows, new, old)); ``tables``: table ->
    {num_rows, dim, base_hash}; ``manifest``: method, config, dense_hash, history."""
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    order = {t: torch.argsort(rows) for t, (rows, _, _) in entries.items()}
    sorted_entries = {t: (rows[order[t]], new[order[t]], old[order[t]]) for t, (rows, new, old) in entries.items()}
    write_rows_file(tmp / rows_file_name(0, 1), {
        t: (rows, tables[t]["dim"], lambda a, b, v=new: v[a:b], lambda a, b, v=old: v[a:b])
        for t, (rows, new, old) in sorted_entries.items()})
    meta = {t: {**tables[t], "rows_changed": int(sorted_entries[t][0].numel()) if t in sorted_entries else 0} for t in tables}
    finish(tmp, out, {**manifest, "world_size": 1, "tables": meta}, steps)
    return out


# -------------------------------------------------------------------------------------- reading
class Patch:
    """A verified patch directory: its manifest, per-step row sets and rows, read table by table."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        self.files = sorted(f for f in self.manifest["files"] if f.startswith("rows-"))
        self.steps: dict | None = json.loads((self.path / STEPS).read_text()) if STEPS in self.manifest["files"] else None

    @property
    def tables(self) -> dict[str, dict]:
        return self.manifest["tables"]

    def rows(self, table: str) -> torch.Tensor:
        """The changed row ids of ``table``, sorted (int64)."""
        parts = []
        for name in self.files:
            with safe_open(self.path / name, framework="pt") as f:
                if f"{table}.rows" in f.keys():
                    parts.append(f.get_tensor(f"{table}.rows"))
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def entries(self, table: str, lo: int = 0, hi: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, new, old) of ``table``, only the rows in [lo, hi) (every row when ``hi`` is None)."""
        dim = self.tables[table]["dim"]
        hi = self.tables[table]["num_rows"] if hi is None else hi
        rows, new, old = [torch.empty(0, dtype=torch.long)], [torch.empty(0, dim)], [torch.empty(0, dim)]
        for name in self.files:
            with safe_open(self.path / name, framework="pt") as f:
                if f"{table}.rows" not in f.keys():
                    continue
                ids = f.get_tensor(f"{table}.rows")
                a, b = (int(torch.searchsorted(ids, torch.tensor(x))) for x in (lo, hi))
                if a < b:
                    rows.append(ids[a:b])
                    new.append(f.get_slice(f"{table}.new")[a:b])
                    old.append(f.get_slice(f"{table}.old")[a:b])
        return torch.cat(rows), torch.cat(new), torch.cat(old)

    def describe(self) -> str:
        return f"{self.path} ({self.manifest.get('method')}, " + ", ".join(
            f"{t}: {m['rows_changed']} rows" for t, m in self.tables.items()) + ")"


def _read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise PatchError(f"{path}: not a knowledge patch (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PatchError(f"{mpath}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PatchError(f"{mpath}: not a format-{FORMAT} knowledge patch")
    if manifest.get("manifest_crc32") != manifest_crc(manifest):
        raise PatchError(f"{mpath}: corrupt manifest (checksum mismatch)")
    for rel, entry in sorted(manifest["files"].items()):
        f = path / rel
        if not f.is_file():
            raise PatchError(f"{f}: missing from patch {path}")
        if f.stat().st_size != entry["size"] or file_crc32(f) != entry["crc32"]:
            raise PatchError(f"{f}: corrupt (size or crc32 differs from the manifest)")
    return manifest
