"""Step checkpoints: value tables + their optimizer state via DCP, dense model + optimizer via DeepSpeed.

Layout (one directory per step, written atomically)::

    <dir>/step_00000100/manifest.json   step, world size, tables, every file with its size
                        tables/         torch.distributed.checkpoint (each rank writes its rows)
                        dense/dense/    DeepSpeed checkpoint (module, optimizer partitions), or
                        dense/model.safetensors   when the dense model is frozen (no engine)
    <dir>/latest                        "step_00000100", replaced only after a complete write

All ranks write into ``<dir>/.tmp-step_XXXXXXXX``; rank 0 writes the manifest, renames the directory
and only then replaces ``latest``, so an interrupted save never leaves ``latest`` pointing at an
incomplete checkpoint. DCP stores tables as global tensors, so a checkpoint loads on any world size
and placement (2 ranks -> 1, 1 -> 2, row-wise -> replicated). Loading checks every manifest file
(missing or truncated: an error naming it) and never unpickles arbitrary objects: DCP metadata goes
through an allow-listed unpickler and tensors and DeepSpeed files through ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta

from smft_dist.config import CheckpointConfig, ModelConfig, to_dict
from smft_dist.distributed.parallelize import Parallel
from smft_dist.smft.methods import merged_state_dict

FORMAT_VERSION = 1
LATEST = "latest"
MANIFEST = "manifest.json"
DENSE_TAG = "dense"
FROZEN_DENSE = "dense/model.safetensors"  # when no dense parameter trains (no DeepSpeed engine)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible."""


# ------------------------------------------------------------------------------------------ save
def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _table_state(par: Parallel) -> dict:
    """Tensors only (no pickled objects): rows and optimizer state of every table."""
    state = {}
    for name, table in par.tables.items():
        state[f"{name}.weight"] = table.ebc.state_dict()[table.weight_key]
        for param_state in table.optimizer_state()["state"].values():
            for key, value in param_state.items():
                if isinstance(value, torch.Tensor):
                    state[f"{name}.optim.{key}"] = value
    return state


def save_checkpoint(
    par: Parallel, cfg: CheckpointConfig, step: int, model_cfg: ModelConfig | None = None, trainer: dict | None = None
) -> Path:
    """Write ``<cfg.dir>/step_<step>`` from all ranks, point ``latest`` at it, keep the last K.

    ``trainer`` (JSON-serializable: data position, background statistics path, ...) goes into the
    manifest and comes back from :func:`load_checkpoint`.
    """
    root = Path(cfg.dir)
    final, tmp = root / step_dir_name(step), root / f".tmp-{step_dir_name(step)}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_table_state(par), checkpoint_id=tmp / "tables")
    if par.engine is not None:
        par.engine.save_checkpoint(str(tmp / "dense"), tag=DENSE_TAG, save_latest=False)
    elif rank == 0:  # frozen dense model: its weights alone
        (tmp / "dense").mkdir()
        safetensors.torch.save_model(par.model, str(tmp / FROZEN_DENSE))
    dist.barrier()
    if rank == 0:
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": dist.get_world_size(),
            "tables": {n: {"num_rows": t.num_rows, "dim": t.dim, "placement": t.placement} for n, t in par.tables.items()},
            "model": to_dict(model_cfg) if model_cfg is not None else None,
            "trainer": trainer or {},
            "files": {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():  # re-saving a step replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name)
        _prune(root, cfg.keep_last)
    dist.barrier()
    return final


def _write_atomic(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


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
    """The manifest of a step directory, after checking every file it lists exists in full."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: missing (not a complete checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath}: corrupt manifest ({e})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: format {manifest.get('format')} is not {FORMAT_VERSION}")
    for rel, size in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from checkpoint {path}")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: truncated or modified ({f.stat().st_size} bytes, manifest says {size})")
    return manifest


def load_checkpoint(par: Parallel, path: str | Path, load_optimizer: bool = True) -> dict:
    """Load tables (+ optimizer state) and the dense engine from a step directory; returns its manifest.

    ``path`` may also be the checkpoint root (then ``latest`` is followed). Works on any world size;
    the dense optimizer state needs the saving world size under ZeRO 1/2 (DeepSpeed partitions it).
    """
    path = Path(path)
    if not (path / MANIFEST).is_file() and (path / LATEST).is_file():
        path = latest_checkpoint(path)
    manifest = read_manifest(path)
    missing = set(par.tables) ^ set(manifest["tables"])
    if missing:
        raise CheckpointError(f"{path}: tables {sorted(missing)} differ between checkpoint and model")
    state = _table_state(par)
    if not load_optimizer:
        state = {k: v for k, v in state.items() if ".optim." not in k}
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
    main = dist.get_rank() == 0
    dense = {PREFIX + k: v.float().cpu() for k, v in merged_state_dict(par.model).items()}
    if model_cfg.tie_embeddings:  # stored once, as save_pretrained does; loading ties it again
        dense.pop(PREFIX + "output.weight")
    shapes = {k: tuple(v.shape) for k, v in dense.items()}
    shapes.update({table_key(name): (t.num_rows, t.dim) for name, t in par.tables.items()})
    writer = None
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        SMFTConfig(model=to_dict(model_cfg), architectures=["SMFTForCausalLM"]).save_pretrained(out_dir)
        writer = _SafetensorsWriter(out_dir / WEIGHTS, shapes)
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


class _SafetensorsWriter:
    """A safetensors file written tensor by tensor and row block by row block: the header (every
    name, fp32 shape and offset) first, then the data in the header's order."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shapes.items():
            size = 4 * math.prod(shape)
            header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.path, self.expected, self.written = path, offset, 0
        self.file = open(path, "wb")
        self.file.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, t: torch.Tensor) -> None:
        self.file.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        self.written += 4 * t.numel()

    def close(self) -> None:
        self.file.close()
        if self.written != self.expected:
            raise RuntimeError(f"{self.path}: wrote {self.written} bytes of tensor data, header says {self.expected}")
