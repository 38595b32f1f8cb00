"""Step checkpoints: value tables + their optimizer state via DCP, dense model + optimizer via DeepSpeed.

Layout (one directory per step, written atomically)::

    <dir>/step_00000100/manifest.json   step, world size, tables, every file with its size and crc32
                        tables/         torch.distributed.checkpoint: each rank writes its rows,
                                        in blocks of <= TABLE_CHUNK_BYTES, one file per block
                        dense/dense/    DeepSpeed checkpoint (module, optimizer partitions), or
                        dense/model.safetensors   when the dense model is frozen (no engine)
    <dir>/latest                        "step_00000100", replaced only after a complete write

All ranks write into ``<dir>/.tmp-step_XXXXXXXX``; rank 0 writes the manifest, renames the directory
and only then replaces ``latest``, so an interrupted save never leaves ``latest`` pointing at an
incomplete checkpoint. DCP stores tables as global tensors, so a checkpoint loads on any world size
and placement (2 ranks -> 1, 1 -> 2, row-wise -> replicated).

Integrity: the manifest records every file's size and CRC-32 (each rank hashes a share of the files
after the write; zlib's crc32 reads ~0.7 GB/s per core) and a CRC-32 of its own content. Loading
verifies all of them before DCP or DeepSpeed reads a byte, so a damaged file is one error naming it;
``checkpoint.on_corrupt=previous`` then resumes from the newest intact older step (which needs
``keep_last`` >= 2, or 0). Nothing non-finite is ever written: a save or export of a model holding a
NaN or inf is refused before anything is written. Loading never unpickles arbitrary objects: DCP
metadata goes through an allow-listed unpickler and DeepSpeed files through ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import zlib
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta

from smft_dist.config import CheckpointConfig, ModelConfig, to_dict
from smft_dist.distributed.parallelize import Parallel
from smft_dist.smft.methods import merged_state_dict

FORMAT_VERSION = 3  # 2: files carry a crc32, the manifest its own; 3: tables in blocks of rows
LATEST = "latest"
MANIFEST = "manifest.json"
DENSE_TAG = "dense"
HASH_CHUNK = 16 << 20  # bytes read per crc32 update
TABLE_CHUNK_BYTES = 64 << 20  # the largest DCP item of a table: a save or load holds one at a time
FROZEN_DENSE = "dense/model.safetensors"  # when no dense parameter trains (no DeepSpeed engine)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible."""


# ------------------------------------------------------------------------------------------ save
def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _table_state(par: Parallel, chunk_rows: dict[str, int]) -> dict:
    """Tensors only (no pickled objects): rows and optimizer state of every table, each per-row tensor
    as blocks of ``chunk_rows[name]`` global rows (filled in where missing: :func:`_chunk_rows`), so
    that DCP copies and reads at most ``TABLE_CHUNK_BYTES`` at a time and any world size or placement
    loads them; and the per-row share counts of a row selector under ``method.row_share_cap`` (whole:
    the same on every rank)."""
    state = {}
    for name, table in par.tables.items():
        items = {"weight": table.ebc.state_dict()[table.weight_key]}
        for param_state in table.optimizer_state()["state"].values():
            for key, value in param_state.items():
                if isinstance(value, torch.Tensor):
                    items[f"optim.{key}"] = value
        rows = chunk_rows.setdefault(name, _chunk_rows(table, items.values()))
        for key, value in items.items():
            state.update(_row_blocks(f"{name}.{key}", value, table.num_rows, rows))
    for name, selector in par.row_selectors.items():
        if selector.shares is not None:
            state[f"{name}.row_shares"] = selector.shares
    return state


def _chunk_rows(table, tensors) -> int:
    """Rows per checkpoint block: the widest per-row tensor's rows in ``TABLE_CHUNK_BYTES``."""
    row_bytes = max((t.dtype.itemsize * math.prod(t.size()[1:]) for t in tensors if t.size()[:1] == (table.num_rows,)),
                    default=4 * table.dim)
    return max(1, TABLE_CHUNK_BYTES // max(row_bytes, 1))


def _row_blocks(key: str, t: torch.Tensor, num_rows: int, chunk_rows: int) -> dict[str, torch.Tensor]:
    """``t`` (a per-row tensor of the table: plain, or row-wise ShardedTensor) as ``key.rows<lo>-<hi>``
    blocks of global rows, each this rank's part of them (views, no copy); anything else whole."""
    if t.size()[:1] != (num_rows,):
        return {key: t}
    blocks = {}
    for lo in range(0, num_rows, chunk_rows):
        hi = min(num_rows, lo + chunk_rows)
        blocks[f"{key}.rows{lo}-{hi}"] = _sharded_block(t, lo, hi) if hasattr(t, "local_shards") else t[lo:hi]
    return blocks


def _sharded_block(t, lo: int, hi: int):
    """Rows ``lo:hi`` of a row-wise ShardedTensor as a ShardedTensor over the same ranks (views of
    the local shards; no collective)."""
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
    from torch.distributed._shard.sharding_spec import ShardMetadata

    def cut(md: ShardMetadata) -> ShardMetadata | None:
        a, b = max(lo, md.shard_offsets[0]), min(hi, md.shard_offsets[0] + md.shard_sizes[0])
        if a >= b:
            return None
        return ShardMetadata([a - lo, *md.shard_offsets[1:]], [b - a, *md.shard_sizes[1:]], md.placement)

    meta = t.metadata()
    shards = [m for m in map(cut, meta.shards_metadata) if m is not None]
    local = []
    for shard in t.local_shards():
        if (m := cut(shard.metadata)) is not None:
            start = m.shard_offsets[0] + lo - shard.metadata.shard_offsets[0]
            local.append(Shard(shard.tensor[start : start + m.shard_sizes[0]], m))
    size = torch.Size([hi - lo, *meta.size[1:]])
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local, ShardedTensorMetadata(shards, size, meta.tensor_properties), process_group=t._process_group
    )


def save_checkpoint(
    par: Parallel, cfg: CheckpointConfig, step: int, model_cfg: ModelConfig | None = None, trainer: dict | None = None
) -> Path:
    """Write ``<cfg.dir>/step_<step>`` from all ranks, point ``latest`` at it, keep the last K.

    ``trainer`` (JSON-serializable: data position, background statistics path, ...) goes into the
    manifest and comes back from :func:`load_checkpoint`.
    """
    root = Path(cfg.dir)
    final, tmp = root / step_dir_name(step), root / f".tmp-{step_dir_name(step)}"
    refuse_nonfinite(par, f"checkpoint of step {step}", root)
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    chunk_rows: dict[str, int] = {}
    state = _table_state(par, chunk_rows)
    # one file per item: DCP's writer copies each item (a view of the TBE storage) and keeps the
    # copies of a file until it closes, so one file per rank would hold a copy of the whole shard
    dcp.save(state, storage_writer=FileSystemWriter(tmp / "tables", single_file_per_rank=False))
    del state
    if par.engine is not None:
        par.engine.save_checkpoint(str(tmp / "dense"), tag=DENSE_TAG, save_latest=False)
    elif rank == 0:  # frozen dense model: its weights alone
        (tmp / "dense").mkdir()
        safetensors.torch.save_model(par.model, str(tmp / FROZEN_DENSE))
    dist.barrier()
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    crcs = checksums(tmp, files)
    if rank == 0:
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": dist.get_world_size(),
            "tables": {n: {"num_rows": t.num_rows, "dim": t.dim, "placement": t.placement, "chunk_rows": chunk_rows[n]}
                       for n, t in par.tables.items()},
            "model": to_dict(model_cfg) if model_cfg is not None else None,
            "trainer": trainer or {},
            "files": {f: {"size": (tmp / f).stat().st_size, "crc32": crcs[f]} for f in files},
        }
        manifest["manifest_crc32"] = manifest_crc(manifest)
        write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():  # re-saving a step replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(root / LATEST, final.name)
        _prune(root, cfg.keep_last)
    dist.barrier()
    return final


def write_atomic(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def file_crc32(path: Path) -> str:
    """CRC-32 of a file's bytes (zlib, read in chunks), as 8 hex digits."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def checksums(root: Path, files: list[str]) -> dict[str, str]:
    """crc32 of ``root/f`` for every f; with a process group each rank hashes a share (largest files
    dealt round-robin) and every rank gets the whole dict."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    by_size = sorted(files, key=lambda f: (-(root / f).stat().st_size, f))
    mine = {f: file_crc32(root / f) for f in by_size[rank::world]}
    if world == 1:
        return mine
    shares: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(shares, mine)
    return {f: crc for share in shares for f, crc in share.items()}


def manifest_crc(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_crc32"}
    return f"{zlib.crc32(json.dumps(body, sort_keys=True).encode()):08x}"


def _prune(root: Path, keep_last: int) -> None:
    """Drop all but the last ``keep_last`` complete checkpoints and leftovers of interrupted saves."""
    steps = sorted(p for p in root.glob("step_*") if (p / MANIFEST).is_file())
    for old in [*(steps[:-keep_last] if keep_last > 0 else []), *root.glob(".tmp-step_*")]:
        shutil.rmtree(old)


# ------------------------------------------------------------------------------------------ load
def latest_checkpoint(root: str | Path) -> Path | None:
    """The step directory ``latest`` points at, or None when there is no checkpoint yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    return Path(root) / pointer.read_text().strip()


def read_manifest(path: str | Path) -> dict:
    """The manifest of a step directory, after checking it and every file it lists (present, same
    size, same crc32). Collective when a process group is up (each rank hashes a share)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: missing (not a complete checkpoint)")
    try:
        manifest = json.loads(mpath.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{mpath}: format {found} is not {FORMAT_VERSION}")
    if manifest.get("manifest_crc32") != manifest_crc(manifest):
        raise CheckpointError(f"{mpath}: corrupt manifest (checksum mismatch)")
    for rel, entry in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from checkpoint {path}")
        if f.stat().st_size != entry["size"]:
            raise CheckpointError(f"{f}: truncated or modified ({f.stat().st_size} bytes, manifest says {entry['size']})")
    crcs = checksums(path, sorted(manifest["files"]))
    for rel, entry in sorted(manifest["files"].items()):
        if crcs[rel] != entry["crc32"]:
            raise CheckpointError(f"{path / rel}: corrupt (crc32 {crcs[rel]}, manifest says {entry['crc32']})")
    return manifest


def _intact_manifest(path: Path, on_corrupt: str = "fail") -> tuple[Path, dict]:
    """``path`` and its verified manifest or, when it is damaged and ``on_corrupt`` is "previous",
    the newest intact older step in the same directory. The error of a damaged ``path`` names the
    damaged file and the newest intact older step. Collective when a process group is up."""
    try:
        return path, read_manifest(path)
    except CheckpointError as e:
        damage = str(e)
    for older in sorted((p for p in path.parent.glob("step_*") if p.name < path.name), reverse=True):
        try:
            manifest = read_manifest(older)
        except CheckpointError:
            continue
        if on_corrupt == "previous":
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"checkpoint: {damage}; resuming from {older.name}, the newest intact checkpoint", flush=True)
            return older, manifest
        raise CheckpointError(f"{damage}; {older.name} is intact (checkpoint.on_corrupt=previous resumes from it)")
    raise CheckpointError(f"{damage}; no older intact checkpoint in {path.parent}")


def load_checkpoint(par: Parallel, path: str | Path, load_optimizer: bool = True, on_corrupt: str = "fail") -> dict:
    """Load tables (+ optimizer state) and the dense engine from a step directory; returns its manifest.

    ``path`` may also be the checkpoint root (then ``latest`` is followed). Every file is verified
    first; a damaged checkpoint raises, or under ``on_corrupt="previous"`` the newest intact older
    step loads instead (the manifest's ``step`` says which). Works on any world size; the dense
    optimizer state needs the saving world size under ZeRO 1/2 (DeepSpeed partitions it).
    """
    path = Path(path)
    if not (path / MANIFEST).is_file() and (path / LATEST).is_file():
        path = latest_checkpoint(path)
    path, manifest = _intact_manifest(path, on_corrupt)
    missing = set(par.tables) ^ set(manifest["tables"])
    if missing:
        raise CheckpointError(f"{path}: tables {sorted(missing)} differ between checkpoint and model")
    state = _table_state(par, {n: t["chunk_rows"] for n, t in manifest["tables"].items()})
    if not load_optimizer:
        state = {k: v for k, v in state.items() if ".optim." not in k}
    saved = _SafeReader(path / "tables").read_metadata().state_dict_metadata
    if absent := sorted(k for k in state if k.endswith(".row_shares") and k not in saved):
        raise CheckpointError(f"{path}: no row share counts ({absent[0]}) to resume method.row_share_cap from "
                              "(saved without a share cap); resume without it or start a new run")
    dcp.load(state, storage_reader=_SafeReader(path / "tables"), planner=_SafeLoadPlanner())
    if par.engine is None:
        dense = path / FROZEN_DENSE
        if not dense.is_file():
            raise CheckpointError(f"{dense}: missing (checkpoint saved with a trained dense model?)")
        safetensors.torch.load_model(par.model, str(dense), device=str(next(par.model.parameters()).device))
        return manifest
    par.engine.checkpoint_engine = _SafeDeepSpeedCheckpointEngine()
    zero = par.engine.zero_optimization_stage()
    same_world = manifest["world_size"] == dist.get_world_size()
    load_path, _ = par.engine.load_checkpoint(
        str(path / "dense"),
        tag=DENSE_TAG,
        load_optimizer_states=load_optimizer and (zero == 0 or same_world),
        load_lr_scheduler_states=False,
    )
    if load_path is None:
        raise CheckpointError(f"{path / 'dense'}: DeepSpeed found no checkpoint to load")
    return manifest


# --------------------------------------------------------------------------- safe deserialization
# DCP pickles its metadata and DeepSpeed pickles its files; neither loader restricts what runs. These
# readers accept only the classes those formats use.
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _DCP_GLOBALS.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"DCP metadata refers to {module}.{name}, which is not allowed")


class _SafeReader(FileSystemReader):
    """DCP reader whose metadata unpickler only builds DCP's own metadata classes."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing")
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except (EOFError, pickle.UnpicklingError) as e:
                raise CheckpointError(f"{path}: corrupt DCP metadata ({e})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """We store tensors only; a non-tensor item would be unpickled, so refuse it."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"DCP item {read_item.dest_index.fqn!r} is not a tensor; refusing to unpickle it")


class _SafeDeepSpeedCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""

    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing") from None
        except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
            raise CheckpointError(f"{path}: cannot be loaded safely ({str(e).splitlines()[0]})") from None


def _deepspeed_safe_globals() -> list:
    """Classes DeepSpeed 0.19 pickles into ZeRO-1/2 optimizer files (checked on fp32 CPU runs)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


# ---------------------------------------------------------------------------------- finiteness
def _local(t: torch.Tensor) -> list[torch.Tensor]:
    """This rank's data of a plain, sharded (TorchRec ShardedTensor) or DTensor tensor."""
    if hasattr(t, "local_shards"):
        return [s.tensor for s in t.local_shards()]
    if hasattr(t, "to_local"):
        return [t.to_local()]
    return [t]


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``. A finite sum proves it (NaN and inf propagate) and costs a tenth of
    ``isfinite(t).all()`` on CPU; only a sum that overflowed needs the exact check."""
    if not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def nonfinite_tensors(par: Parallel) -> list[str]:
    """Names of the parameters and optimizer states holding a NaN or inf on any rank (collective:
    every rank gets the same sorted list)."""
    named: list[tuple[str, torch.Tensor]] = [(n, p) for n, p in par.model.named_parameters()]
    if par.engine is not None:
        for i, state in enumerate(par.engine.client_optimizer.state.values()):
            named += [(f"dense optimizer state {i}.{k}", v) for k, v in state.items() if isinstance(v, torch.Tensor)]
    for name, table in par.tables.items():
        named.append((f"value table {name}", table.local_weight()))
        for state in table.optimizer_state()["state"].values():
            named += [(f"value table {name} optimizer {k}", v) for k, v in state.items() if isinstance(v, torch.Tensor)]
    bad = sorted({n for n, t in named for part in _local(t) if not _all_finite(part)})
    shares: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(shares, bad)
    return sorted({n for share in shares for n in share})


def refuse_nonfinite(par: Parallel, what: str, root: str | Path | None = None) -> None:
    """Raise :class:`CheckpointError` (on every rank, before anything is written) when the model or
    its optimizer state holds a NaN or inf; ``root``: the checkpoint directory whose ``latest`` the
    message names."""
    bad = nonfinite_tensors(par)
    if not bad:
        return
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    kept = latest_checkpoint(root) if root is not None else None
    tail = f"; latest still points at {kept.name}" if kept is not None else ""
    raise CheckpointError(f"{what}: refused, non-finite values in {shown}{tail}")


# ------------------------------------------------------------------------------------ HF export
EXPORT_CHUNK_BYTES = 64 << 20  # rows in flight to the writing rank at a time


def export_hf(par: Parallel, model_cfg: ModelConfig, out_dir: str | Path, chunk_bytes: int = EXPORT_CHUNK_BYTES) -> Path:
    """Write one consolidated model (all ranks call; rank 0 writes) that ``from_pretrained`` loads.
    LoRA adapters are merged into the exported weights.

    Keys equal ``Transformer.state_dict()`` with local value tables; fp32. Table rows reach rank 0
    ``chunk_bytes`` at a time and go straight to the file, so no rank holds a whole table.
    """
    from smft_dist.model.hf import SMFTConfig
    from smft_dist.model.saved import PREFIX, WEIGHTS, table_key

    out_dir = Path(out_dir)
    refuse_nonfinite(par, f"export to {out_dir}")
    main = dist.get_rank() == 0
    writer = None
    if main:  # the writing rank: dense weights first, then the tables' rows as they arrive
        dense = {PREFIX + k: v.float().cpu() for k, v in merged_state_dict(par.model).items()}
        if model_cfg.tie_embeddings:  # stored once, as save_pretrained does; loading ties it again
            dense.pop(PREFIX + "output.weight")
        shapes = {k: tuple(v.shape) for k, v in dense.items()}
        shapes.update({table_key(name): (t.num_rows, t.dim) for name, t in par.tables.items()})
        out_dir.mkdir(parents=True, exist_ok=True)
        SMFTConfig(model=to_dict(model_cfg), architectures=["SMFTForCausalLM"]).save_pretrained(out_dir)
        writer = SafetensorsWriter(out_dir / WEIGHTS, shapes)
        for v in dense.values():
            writer.write(v)
        del dense
    for table in par.tables.values():
        for rows in _rows_to_rank0(table, max(1, chunk_bytes // (4 * table.dim))):
            writer.write(rows.float().cpu())
    if main:
        writer.close()
    dist.barrier()
    return out_dir


def _rows_to_rank0(table, chunk_rows: int):
    """Yield (on rank 0 of the table's group) the table's rows in order, ``chunk_rows`` at a time;
    the other ranks send theirs. Every rank of the group must exhaust the generator."""
    group, local = table.group, table.local_weight().detach()
    rank = dist.get_rank(group)
    if table.placement == "data_parallel" or dist.get_world_size(group) == 1:  # rank 0 holds every row
        owners = [(0, table.num_rows)]
    else:
        owners = list(enumerate(table.row_counts))
    for owner, count in owners:
        if rank not in (0, owner):
            continue
        for lo in range(0, count, chunk_rows):
            hi = min(count, lo + chunk_rows)
            if owner == rank == 0:
                yield local[lo:hi]
            elif rank == 0:
                buf = local.new_empty(hi - lo, table.dim)
                dist.recv(buf, group=group, group_src=owner)
                yield buf
            else:
                dist.send(local[lo:hi].contiguous(), group=group, group_dst=0)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.int64: "I64"}


class SafetensorsWriter:
    """A safetensors file written tensor by tensor and row block by row block: the header (every
    name, shape, dtype and offset) first, then the data in the header's order. Tensors are fp32
    unless ``dtypes`` names another (int64 row ids of knowledge patches)."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype] | None = None):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shapes.items():
            dtype = (dtypes or {}).get(name, torch.float32)
            size = dtype.itemsize * math.prod(shape)
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.path, self.expected, self.written = path, offset, 0
        self.file = open(path, "wb")
        self.file.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, t: torch.Tensor) -> None:
        self.file.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        self.written += t.element_size() * t.numel()

    def close(self) -> None:
        self.file.close()
        if self.written != self.expected:
            raise RuntimeError(f"{self.path}: wrote {self.written} bytes of tensor data, header says {self.expected}")
