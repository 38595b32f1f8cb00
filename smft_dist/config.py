"""Typed run configuration: dataclasses, YAML loading, ``key=value`` overrides, validation.

A run is described by one :class:`JobConfig` whose sections mirror the package: ``model``,
``data``, ``optim``, ``smft``, ``distributed``, ``checkpoint``, ``train``. Files in ``configs/`` set
any subset of fields; everything else keeps the defaults below. Every error names the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type, or inconsistent."""


# ----------------------------------------------------------------------------------------- model
@dataclass
class MemoryConfig:
    """Product-key memory layers replacing the FFN of ``layers``."""

    layers: list[int] = field(default_factory=list)  # block indices whose FFN is a memory layer
    n_keys: int = 32  # half-keys per set; N = n_keys**2 slots
    heads: int = 4
    topk: int = 32  # k: slots read per head and token
    k_dim: int = 64  # full key / query dim per head (two halves of k_dim/2)
    v_dim: int | None = None  # value dim; None = model dim
    query_bias: bool = True
    query_norm: bool = False  # RMSNorm on each head's query
    shared_values: bool = False  # one value pool shared by all memory layers

    @property
    def num_slots(self) -> int:
        return self.n_keys * self.n_keys


@dataclass
class ModelConfig:
    """Decoder-only transformer (pre-RMSNorm, RoPE, SwiGLU) with optional memory layers."""

    vocab_size: int = 512
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    ffn_hidden_dim: int | None = None  # None = 8/3 * dim rounded up to ffn_multiple_of
    ffn_multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    tie_embeddings: bool = False
    init_std: float = 0.02
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    @property
    def value_dim(self) -> int:
        return self.memory.v_dim or self.dim

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        m = self.ffn_multiple_of
        return m * ((int(8 * self.dim / 3) + m - 1) // m)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first inconsistent field."""
        m = self.memory
        _require(self.dim % self.n_heads == 0, "model.dim", f"{self.dim} is not divisible by model.n_heads={self.n_heads}")
        _require((self.dim // self.n_heads) % 2 == 0, "model.n_heads", "head dim dim/n_heads must be even for RoPE")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            _require(getattr(self, name) > 0, f"model.{name}", "must be positive")
        _require(self.n_heads % self.kv_heads == 0, "model.n_kv_heads", f"{self.kv_heads} must divide n_heads={self.n_heads}")
        for i in m.layers:
            _require(0 <= i < self.n_layers, "model.memory.layers", f"layer {i} is out of range [0, {self.n_layers})")
        _require(len(set(m.layers)) == len(m.layers), "model.memory.layers", f"duplicate layer in {m.layers}")
        if m.layers:
            _require(m.n_keys > 0, "model.memory.n_keys", "must be positive")
            _require(m.heads > 0, "model.memory.heads", "must be positive")
            _require(0 < m.topk <= m.n_keys, "model.memory.topk", f"k={m.topk} must be in [1, n_keys={m.n_keys}]")
            _require(m.k_dim > 0 and m.k_dim % 2 == 0, "model.memory.k_dim", f"{m.k_dim} must be positive and even")
            _require(m.v_dim is None or m.v_dim > 0, "model.memory.v_dim", "must be positive")


# ---------------------------------------------------------------------------------------- method
METHODS = ("pretrain", "smft", "memory_ft", "full_ft", "lora")
RANKINGS = ("tfidf", "tf", "random", "all")


@dataclass
class MethodConfig:
    """What trains: see :mod:`smft_dist.smft.methods`. Defaults follow the SMFT paper."""

    name: str = "smft"  # pretrain | smft | memory_ft | full_ft | lora
    ranking: str = "tfidf"  # smft: tfidf | tf | random | all
    top_t: int = 500  # smft: value rows trained per batch (paper: 500 facts, 10k documents)
    background: str | None = None  # smft + tfidf: df statistics file (python -m smft_dist.background)
    value_lr: float = 2.0  # lr of value rows (SGD for smft / memory_ft; paper: 2 low, 5 high)
    dense_lr: float = 5e-6  # lr of dense / LoRA parameters (AdamW)
    weight_decay: float = 0.1  # AdamW, dense / LoRA parameters
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    lora_rank: int = 32
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0

    def validate(self) -> None:
        _require(self.name in METHODS, "method.name", f"unknown method {self.name!r} (choose from {', '.join(METHODS)})")
        _require(self.ranking in RANKINGS, "method.ranking", f"unknown ranking {self.ranking!r} (choose from {', '.join(RANKINGS)})")
        _require(self.top_t > 0, "method.top_t", "must be positive")
        _require(self.value_lr >= 0 and self.dense_lr >= 0, "method.value_lr", "learning rates must be >= 0")
        _require(len(self.betas) == 2, "method.betas", f"expected two values, got {self.betas}")
        _require(self.lora_rank > 0, "method.lora_rank", "must be positive")


# ----------------------------------------------------------- distributed engine (issue 3, dist)
SPARSE_OPTIMIZERS = ("exact_sgd", "exact_rowwise_adagrad", "adam", "partial_rowwise_adam")


@dataclass
class DistributedConfig:
    """Process group, value-table placement and the DeepSpeed engine over the dense parameters."""

    backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU
    table_placement: str = "row_wise"  # row_wise (sharded over all ranks) | data_parallel (replicated)
    zero_stage: int = 0  # DeepSpeed ZeRO stage for the dense parameters: 0, 1 or 2
    dtype: str = "auto"  # dense training dtype: auto = bf16 on CUDA, fp32 on CPU; or fp32 | bf16
    grad_clip: float = 1.0  # max global grad norm of the dense parameters; 0 = off
    grad_accum_steps: int = 1  # micro-batches per dense optimizer step

    def validate(self) -> None:
        _require(self.backend in ("auto", "nccl", "gloo"), "distributed.backend", f"{self.backend!r} is not auto|nccl|gloo")
        _require(self.table_placement in ("row_wise", "data_parallel"), "distributed.table_placement", f"{self.table_placement!r} is not row_wise|data_parallel")
        _require(self.zero_stage in (0, 1, 2), "distributed.zero_stage", f"{self.zero_stage} is not 0, 1 or 2")
        _require(self.dtype in ("auto", "fp32", "bf16"), "distributed.dtype", f"{self.dtype!r} is not auto|fp32|bf16")
        _require(self.grad_clip >= 0, "distributed.grad_clip", "must be >= 0")
        _require(self.grad_accum_steps >= 1, "distributed.grad_accum_steps", "must be >= 1")


@dataclass
class SparseOptimConfig:
    """FBGEMM's fused optimizer for value rows (lr: ``method.value_lr``); it updates rows inside the
    backward pass."""

    type: str = "exact_sgd"  # exact_sgd | exact_rowwise_adagrad (CPU and CUDA); adam | partial_rowwise_adam (CUDA)
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0

    def validate(self) -> None:
        _require(self.type in SPARSE_OPTIMIZERS, "sparse_optim.type", f"{self.type!r} is not one of {'|'.join(SPARSE_OPTIMIZERS)}")
        _require(self.eps > 0, "sparse_optim.eps", "must be positive")


@dataclass
class CheckpointConfig:
    """Step checkpoints: ``dir/step_XXXXXXXX`` plus a ``latest`` pointer."""

    dir: str = "checkpoints"
    interval: int = 0  # steps between saves; 0 = only at the end
    keep_last: int = 3  # complete checkpoints kept; 0 = keep all

    def validate(self) -> None:
        _require(self.interval >= 0, "checkpoint.interval", "must be >= 0")
        _require(self.keep_last >= 0, "checkpoint.keep_last", "must be >= 0")


# ------------------------------------------------------------------------------------------- job
@dataclass
class JobConfig:
    """Everything one run needs. Sections are added by the components that own them."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    # distributed engine (issue 3)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sparse_optim: SparseOptimConfig = field(default_factory=SparseOptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        self.model.validate()
        self.method.validate()
        if self.method.name in ("smft", "memory_ft"):
            _require(bool(self.model.memory.layers), "model.memory.layers", f"method {self.method.name} needs a memory layer")
        # distributed engine (issue 3)
        for section in (self.distributed, self.sparse_optim, self.checkpoint):
            section.validate()


# --------------------------------------------------------------------------------------- loading
def _require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {why}")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (recursing into dataclasses and lists)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=name)
    if origin in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "1e-6" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"{full}: unknown field (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (for YAML dumps, manifests, HF configs)."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), cls: type = JobConfig) -> Any:
    """Load a YAML config file (or defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p}: not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p}: invalid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
    cfg = from_dict(cls, apply_overrides(data, overrides))
    cfg.validate()
    return cfg
