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
    """Product-key memory layers in blocks ``layers``: replacing their FFN or beside it."""

    layers: list[int] = field(default_factory=list)  # block indices that get a memory layer
    placement: str = "replace"  # replace: memory instead of the FFN | beside: block adds ffn(h) + memory(h)
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
    attention_bias: bool = False  # biases on the q/k/v projections (Qwen2); the output projection has none
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
            _require(0 < m.n_keys < 46341, "model.memory.n_keys", f"{m.n_keys} must be in [1, 46340] (slot ids are int32: N = n_keys^2 < 2^31)")
            _require(m.heads > 0, "model.memory.heads", "must be positive")
            _require(0 < m.topk <= m.n_keys, "model.memory.topk", f"k={m.topk} must be in [1, n_keys={m.n_keys}]")
            _require(m.k_dim > 0 and m.k_dim % 2 == 0, "model.memory.k_dim", f"{m.k_dim} must be positive and even")
            _require(m.v_dim is None or m.v_dim > 0, "model.memory.v_dim", "must be positive")
            _require(m.placement in ("replace", "beside"), "model.memory.placement", f"{m.placement!r} is not replace|beside")


# ---------------------------------------------------------------------------------------- method
METHODS = ("pretrain", "smft", "memory_ft", "memory_pretrain", "full_ft", "lora")
RANKINGS = ("tfidf", "tf", "kl", "random", "all")
COUNT_POSITIONS = ("all", "scored")


@dataclass
class MethodConfig:
    """What trains: see :mod:`smft_dist.smft.methods`. Defaults follow the SMFT paper."""

    name: str = "smft"  # pretrain | smft | memory_ft | memory_pretrain | full_ft | lora
    ranking: str = "tfidf"  # smft: tfidf | tf | kl | random | all
    top_t: int = 500  # smft: value rows trained per batch (paper: 500 facts, 10k documents)
    background: str | None = None  # smft + tfidf / kl: background statistics file (python -m smft_dist.background)
    count_positions: str = "all"  # smft: reads the slot counts see: all (every token, the paper) | scored (next-token loss scored)
    row_share_cap: int | None = None  # smft: a row trained in this many steps is ranked out of later top-t's; None / 0 = off
    value_lr: float = 2.0  # lr of value rows (SGD for smft / memory_ft; paper: 2 low, 5 high); not full_ft
    dense_lr: float = 5e-6  # lr of dense / LoRA parameters (AdamW); full_ft: of value rows too
    weight_decay: float = 0.1  # AdamW, dense / LoRA parameters
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    lora_rank: int = 32
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0

    def validate(self) -> None:
        _require(self.name in METHODS, "method.name", f"unknown method {self.name!r} (choose from {', '.join(METHODS)})")
        _require(self.ranking in RANKINGS, "method.ranking", f"unknown ranking {self.ranking!r} (choose from {', '.join(RANKINGS)})")
        _require(self.top_t > 0, "method.top_t", "must be positive")
        _require(self.count_positions in COUNT_POSITIONS, "method.count_positions",
                 f"{self.count_positions!r} is not one of {', '.join(COUNT_POSITIONS)}")
        _require(self.row_share_cap is None or self.row_share_cap >= 0, "method.row_share_cap", "must be >= 0 (0 or null: off)")
        for option, off in (("count_positions", self.count_positions == "all"), ("row_share_cap", not self.row_share_cap)):
            _require(off or self.name == "smft", f"method.{option}", f"only smft selects rows (method.name is {self.name})")
        _require(self.value_lr >= 0 and self.dense_lr >= 0, "method.value_lr", "learning rates must be >= 0")
        _require(len(self.betas) == 2, "method.betas", f"expected two values, got {self.betas}")
        _require(self.lora_rank > 0, "method.lora_rank", "must be positive")


# ------------------------------------------------------------------------------------------ data
SCHEMAS = ("text", "facts", "documents", "qa", "choice", "lm_pair")
HUB_FORMATS = ("triviaqa", "nq_open", "simpleqa", "hellaswag", "gsm8k", "dclm")


@dataclass
class SourceConfig:
    """Where records come from and what they look like.

    ``path`` is a local file, directory or glob (jsonl / json / parquet / txt), or a hub dataset
    name. ``schema`` is one of the canonical record schemas (``text``: {text}; ``facts``: {fact,
    paraphrases, question, answer}; ``documents``: {document, augmentations}; ``qa``: {question,
    answers}; ``choice``: {context, endings, label}; ``lm_pair``: {prompt, target}) or a hub format
    (triviaqa, nq_open, simpleqa, hellaswag, gsm8k, dclm) converted to one of them on load.
    """

    path: str = ""
    schema: str = "text"
    format: str = "auto"  # auto | jsonl | parquet | text | hub
    name: str | None = None  # hub config name (e.g. "rc.nocontext" for TriviaQA)
    split: str = "train"
    streaming: bool = False  # IterableDataset, sharded with split_dataset_by_node (text only)
    max_examples: int | None = None  # keep the first n records

    def validate(self, prefix: str) -> None:
        _require(self.schema in SCHEMAS + HUB_FORMATS, f"{prefix}.schema", f"{self.schema!r} is not one of {SCHEMAS + HUB_FORMATS}")
        _require(self.format in ("auto", "jsonl", "parquet", "text", "hub"), f"{prefix}.format", f"unknown format {self.format!r}")
        _require(self.max_examples is None or self.max_examples > 0, f"{prefix}.max_examples", "must be positive")


SCORES = ("all", "answer")


@dataclass
class StreamConfig:
    """A batch stream over one source. ``batch_size`` is global (split evenly over ranks).

    Text sources are packed into ``seq_len`` tokens (``pack``) or padded per document; fact and
    document sources give one record per batch, its texts cycled to ``batch_size`` rows and
    padded (never packed) to ``seq_len``. ``score`` says which tokens the loss scores: every real
    token, or (facts) only those of the record's answer in each text.
    """

    source: SourceConfig = field(default_factory=SourceConfig)
    seq_len: int = 128
    batch_size: int = 8
    pack: bool = True
    shuffle: bool = True
    score: str = "all"  # all: every real token | answer (facts): only the answer's tokens (its last occurrence in each text)

    def validate(self, prefix: str) -> None:
        self.source.validate(f"{prefix}.source")
        _require(self.seq_len > 1, f"{prefix}.seq_len", "must be > 1")
        _require(self.batch_size > 0, f"{prefix}.batch_size", "must be positive")
        _require(self.source.schema in ("text", "facts", "documents", "dclm"), f"{prefix}.source.schema", f"{self.source.schema!r} cannot be trained on; use text, facts, documents or dclm")
        _require(self.score in SCORES, f"{prefix}.score", f"{self.score!r} is not one of {', '.join(SCORES)}")
        _require(self.score == "all" or self.source.schema == "facts", f"{prefix}.score",
                 f"answer needs a facts source ({prefix}.source.schema is {self.source.schema!r})")


@dataclass
class ContinualConfig(StreamConfig):
    """The continual-learning stream; paper defaults: one fact in 64 paraphrases of 64 tokens, in
    file order."""

    source: SourceConfig = field(default_factory=lambda: SourceConfig(schema="facts"))
    seq_len: int = 64
    batch_size: int = 64
    pack: bool = False
    shuffle: bool = False


@dataclass
class DataConfig:
    """Tokenizer and the three training streams: pretraining, background (df statistics), continual."""

    tokenizer: str = ""  # local HF tokenizer directory (or hub name)
    cache_dir: str | None = None  # datasets cache; None = HF default
    num_proc: int | None = None  # processes for datasets.map
    seed: int = 0
    pretrain: StreamConfig = field(default_factory=StreamConfig)
    background: StreamConfig = field(default_factory=StreamConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)

    def validate(self) -> None:
        for name in ("pretrain", "background", "continual"):
            stream = getattr(self, name)
            if stream.source.path:
                stream.validate(f"data.{name}")


@dataclass
class EvalTaskConfig:
    """One evaluation: ``kind`` qa (EM / F1 by greedy generation), choice (log-likelihood
    accuracy) or nll (held-out loss and perplexity) over ``source``."""

    name: str = ""
    kind: str = "nll"
    source: SourceConfig = field(default_factory=SourceConfig)
    seq_len: int = 256  # nll: sequence length (text is packed, lm_pair padded)

    def validate(self, prefix: str) -> None:
        _require(bool(self.name), f"{prefix}.name", "must be set")
        _require(self.kind in ("qa", "choice", "nll"), f"{prefix}.kind", f"{self.kind!r} is not one of qa, choice, nll")
        self.source.validate(f"{prefix}.source")


@dataclass
class EvalConfig:
    """Held-out evaluations run by the trainer every ``every`` steps and by ``smft_dist.evaluate``."""

    tasks: list[EvalTaskConfig] = field(default_factory=list)
    every: int = 0  # steps between evaluations in training; 0 = only at the end
    batch_size: int = 16  # sequences per forward on each rank
    max_new_tokens: int = 16
    qa_prompt: str = "Question: {question}\nAnswer:"
    choice_norm: str = "chars"  # chars (acc_norm) | tokens | none

    def validate(self) -> None:
        _require(self.every >= 0, "eval.every", "must be >= 0")
        _require(self.batch_size > 0, "eval.batch_size", "must be positive")
        _require(self.max_new_tokens > 0, "eval.max_new_tokens", "must be positive")
        _require(self.choice_norm in ("chars", "tokens", "none"), "eval.choice_norm", f"{self.choice_norm!r} is not one of chars, tokens, none")
        _require("{question}" in self.qa_prompt, "eval.qa_prompt", "must contain {question}")
        for i, task in enumerate(self.tasks):
            task.validate(f"eval.tasks[{i}]")


# ----------------------------------------------------------------------------------- distributed
FUSED_OPTIMIZERS = ("exact_sgd", "exact_rowwise_adagrad", "adam", "partial_rowwise_adam")
SPARSE_OPTIMIZERS = (*FUSED_OPTIMIZERS, "adamw")


@dataclass
class DistributedConfig:
    """Process group, value-table placement and the DeepSpeed engine over the dense parameters."""

    backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU
    table_placement: str = "row_wise"  # row_wise (sharded over all ranks) | data_parallel (replicated)
    zero_stage: int = 0  # DeepSpeed ZeRO stage for the dense parameters: 0, 1 or 2
    dtype: str = "auto"  # dense training dtype: auto = bf16 on CUDA, fp32 on CPU; or fp32 | bf16
    grad_clip: float = 1.0  # max global grad norm of the dense parameters; 0 = off
    grad_accum_steps: int = 1  # stream batches (micro-batches) per optimizer step

    def validate(self) -> None:
        _require(self.backend in ("auto", "nccl", "gloo"), "distributed.backend", f"{self.backend!r} is not auto|nccl|gloo")
        _require(self.table_placement in ("row_wise", "data_parallel"), "distributed.table_placement", f"{self.table_placement!r} is not row_wise|data_parallel")
        _require(self.zero_stage in (0, 1, 2), "distributed.zero_stage", f"{self.zero_stage} is not 0, 1 or 2")
        _require(self.dtype in ("auto", "fp32", "bf16"), "distributed.dtype", f"{self.dtype!r} is not auto|fp32|bf16")
        _require(self.grad_clip >= 0, "distributed.grad_clip", "must be >= 0")
        _require(self.grad_accum_steps >= 1, "distributed.grad_accum_steps", "must be >= 1")


@dataclass
class SparseOptimConfig:
    """The optimizer of value rows (lr: ``method.value_lr``).

    ``exact_sgd``, ``exact_rowwise_adagrad`` (CPU and CUDA), ``adam``, ``partial_rowwise_adam`` (CUDA):
    FBGEMM's fused optimizer, which updates the rows a batch read inside every backward pass.
    ``adamw``: TorchRec's non-fused kernel accumulates the rows' gradients and ``torch.optim.AdamW``
    steps each rank's shard once per optimizer step (every row: weight decay and momentum apply to
    rows the batch did not read, as for a dense parameter). ``full_ft`` requires ``adamw`` and trains
    the rows with the dense AdamW's settings (``method.dense_lr``, ``method.betas``,
    ``method.weight_decay``).
    """

    type: str = "exact_sgd"  # exact_sgd | exact_rowwise_adagrad | adam | partial_rowwise_adam (CUDA) | adamw
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
    on_corrupt: str = "fail"  # a damaged checkpoint: fail (naming the intact older step) | previous (resume from it)

    def validate(self) -> None:
        _require(self.interval >= 0, "checkpoint.interval", "must be >= 0")
        _require(self.keep_last >= 0, "checkpoint.keep_last", "must be >= 0")
        _require(self.on_corrupt in ("fail", "previous"), "checkpoint.on_corrupt", f"{self.on_corrupt!r} is not fail|previous")
        _require(self.on_corrupt == "fail" or self.keep_last != 1, "checkpoint.keep_last",
                 "on_corrupt=previous needs an older checkpoint to fall back to: keep_last >= 2 (or 0, keep all)")


# ----------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    """The loop: how long, on which stream, LR schedule, logging and where outputs go."""

    steps: int = 100  # optimizer steps (global batches) to run
    stream: str = "continual"  # data stream to train on: continual | pretrain
    seed: int = 0
    out_dir: str = "runs/default"  # metrics.jsonl, tensorboard/, hf/ (export)
    init_from: str | None = None  # save_pretrained directory to start from; None = fresh init
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine | linear (after warmup)
    min_lr_ratio: float = 0.0  # floor of cosine / linear decay, as a fraction of the base lr
    log_every: int = 10
    export_hf: bool = True  # write a consolidated save_pretrained model to out_dir/hf at the end
    on_nonfinite: str = "fail"  # a NaN/inf loss: fail (one line naming the step) | skip (no update that step)
    log_selected_slots: bool = False  # smft: every step's top-t slot ids to out_dir/selected_slots.jsonl
    write_patch: bool = True  # smft / memory_ft: the changed value rows as a knowledge patch to out_dir/patch at the end
    row_change: bool = True  # at the end: per-row update norms vs the start -> out_dir/row_change.json, row_change_hist.jsonl

    def validate(self) -> None:
        _require(self.steps >= 0, "train.steps", "must be >= 0")
        _require(self.stream in ("continual", "pretrain"), "train.stream", f"{self.stream!r} is not continual|pretrain")
        _require(self.lr_schedule in ("constant", "cosine", "linear"), "train.lr_schedule", f"{self.lr_schedule!r} is not constant|cosine|linear")
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
        _require(self.log_every > 0, "train.log_every", "must be positive")
        _require(self.on_nonfinite in ("fail", "skip"), "train.on_nonfinite", f"{self.on_nonfinite!r} is not fail|skip")


# ------------------------------------------------------------------------------------------- job
@dataclass
class JobConfig:
    """Everything one run needs. Sections are added by the components that own them."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sparse_optim: SparseOptimConfig = field(default_factory=SparseOptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        self.model.validate()
        self.method.validate()
        for section in (self.data, self.eval, self.distributed, self.sparse_optim, self.checkpoint, self.train):
            section.validate()
        _require(self.train.on_nonfinite == "fail" or self.distributed.grad_accum_steps == 1, "train.on_nonfinite",
                 "skip needs distributed.grad_accum_steps=1 (earlier micro-batches' rows update inside their backward)")
        _require(not self.train.log_selected_slots or self.method.name == "smft", "train.log_selected_slots",
                 f"only smft selects slots (method.name is {self.method.name})")
        self._validate_value_optimizer()
        if not self.train.init_from:  # else the model comes from the saved one: build_model checks it
            self.validate_model_fit()

    def validate_model_fit(self) -> None:
        """Fields that must agree with the model: sequence lengths, top-t against its size, a shared
        value pool against the value optimizer."""
        mem = self.model.memory
        _require(not (self._values_train_fused() and mem.shared_values and len(mem.layers) > 1),
                 "model.memory.shared_values", f"the fused sparse_optim.type={self.sparse_optim.type} updates the shared "
                 "pool inside each layer's backward, so other layers' score gradients read updated rows; use sparse_optim.type=adamw")
        limit = self.model.max_seq_len
        for name in ("pretrain", "background", "continual"):
            stream = getattr(self.data, name)
            if stream.source.path:
                _require(stream.seq_len <= limit, f"data.{name}.seq_len", f"{stream.seq_len} exceeds model.max_seq_len={limit}")
        for i, task in enumerate(self.eval.tasks):
            if task.kind == "nll":
                _require(task.seq_len <= limit, f"eval.tasks[{i}].seq_len", f"{task.seq_len} exceeds model.max_seq_len={limit}")
        slots = self.model.memory.num_slots
        if self.method.name == "smft" and self.method.ranking != "all" and self.model.memory.layers:
            _require(self.method.top_t <= slots, "method.top_t", f"{self.method.top_t} exceeds the {slots} slots of a memory table")

    def _values_train_fused(self) -> bool:
        """Value rows train through FBGEMM's fused optimizer inside the dense backward (pretraining)."""
        return (self.method.name in ("pretrain", "memory_pretrain") and self.sparse_optim.type in FUSED_OPTIMIZERS
                and self.distributed.table_placement == "row_wise")

    def _validate_value_optimizer(self) -> None:
        """Refuse value-row optimizers that would train something other than their name says."""
        method, opt, dist = self.method.name, self.sparse_optim, self.distributed
        if method == "full_ft":
            _require(opt.type == "adamw", "sparse_optim.type", "full_ft trains value rows with AdamW like every other "
                     "parameter (method.dense_lr, method.betas, method.weight_decay); set sparse_optim.type=adamw")
            for name in ("beta1", "beta2", "eps", "weight_decay"):
                _require(getattr(opt, name) == getattr(SparseOptimConfig, name), f"sparse_optim.{name}",
                         "full_ft trains value rows with the dense AdamW's settings (method.betas, method.weight_decay)")
        if opt.type == "adamw":
            _require(method in ("pretrain", "memory_pretrain", "full_ft"), "sparse_optim.type", f"adamw steps every row of the shard "
                     f"(weight decay, momentum); {method} trains {'no' if method == 'lora' else 'only some'} value rows")
        if dist.table_placement == "data_parallel":
            _require(opt.type in ("exact_sgd", "adamw"), "sparse_optim.type",
                     f"replicated tables (distributed.table_placement=data_parallel) train with exact_sgd or adamw, not {opt.type}")
        fused_rows = self._values_train_fused()
        _require(not (fused_rows and dist.grad_accum_steps > 1), "distributed.grad_accum_steps",
                 f"the fused sparse_optim.type={opt.type} updates value rows inside every backward, so rows would "
                 "step once per micro-batch; use sparse_optim.type=adamw (one step per optimizer step)")


# --------------------------------------------------------------------------------------- loading
def _require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {why}")


def _coerce(value: Any, tp: Any, name: str, default: Any = None) -> Any:
    """Check ``value`` against the annotation ``tp`` (recursing into dataclasses and lists).

    A mapping given for a dataclass field is merged into that field's ``default`` instance, so a
    partial override keeps the defaults its parent chose (e.g. the continual stream's schema).
    """
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
        return from_dict(tp, value, prefix=name, base=default if isinstance(default, tp) else None)
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


def from_dict(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from a nested dict (on top of ``base``, else the defaults); unknown
    keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    base = base if base is not None else cls()
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"{full}: unknown field (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], full, getattr(base, key))
    return dataclasses.replace(base, **kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (for YAML dumps, manifests, HF configs)."""
    return dataclasses.asdict(cfg)


def _child(node: Any, part: str, key: str) -> Any:
    """``node[part]`` for an override path: a section of a mapping (created when missing), or an item
    of a list named by its index or by its ``name`` field (``eval.tasks.new_facts.source.max_examples``)."""
    if isinstance(node, dict):
        return node.setdefault(part, {})
    if isinstance(node, list):
        if part.isdigit() and int(part) < len(node):
            return node[int(part)]
        named = [item for item in node if isinstance(item, dict) and item.get("name") == part]
        if len(named) == 1:
            return named[0]
        raise ConfigError(f"{key}: no single item {part!r} in the list (an index below {len(node)} or an item's name)")
    raise ConfigError(f"{key}: {part} is not a section")


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML) to a nested dict, in place; a list item is
    addressed by its index or its ``name``."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        node: Any = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = _child(node, part, key)
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {parts[-2]} is not a section")
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
