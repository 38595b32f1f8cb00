"""Memory value tables as TorchRec ``EmbeddingBagCollection`` s: plan, sharder, row optimizer.

Each value table becomes one single-table ``EmbeddingBagCollection`` (weighted, sum pooling, one
feature). Placement and optimizer (:func:`value_optimizer` picks the optimizer and lr from the job):

* ROW_WISE over all ranks (default) with a fused ``sparse_optim.type``: TorchRec's FUSED kernel,
  whose FBGEMM optimizer updates the rows a batch read inside every backward pass.
* ROW_WISE with ``adamw``: TorchRec's non-fused DENSE kernel; the rows' gradients accumulate (over
  micro-batches too) and ``torch.optim.AdamW`` steps this rank's shard in :meth:`ShardedValueTable.step`.
* DATA_PARALLEL (replicated, small tables): TorchRec's DDP averages the gradients; ``torch.optim.SGD``
  or ``AdamW`` steps the rows in :meth:`ShardedValueTable.step`.

Sparse finetuning (``deferred_rows``, see :mod:`smft_dist.model.value_table`): the training lookups
run without row gradient (under ``no_grad`` when the scores need none; otherwise through the TBE at
lr 0, which with EXACT_SGD leaves every row bit-identical), and :meth:`ShardedValueTable.step_rows`
runs one more lookup over the selected entries only, whose backward is the step's single row update
at the scheduled lr. Optimizers with state (Adagrad) would update their state in an lr-0 backward,
so they are refused when the scores need gradients, and FBGEMM's Adam always
(:func:`check_row_optimizer`).

TorchRec divides table gradients by the world size (a DDP-style mean over ranks): with each rank's
loss a mean over its own tokens, that equals one process over the global batch, as long as every
rank's loss is scaled to its share of the global batch (see ``parallelize.train_step``). That, the
lr-only ``fused_optimizer.step()`` and the delivered weights are checked by :mod:`.torchrec_guards`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.shard import shard
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, data_parallel, row_wise
from torchrec.distributed.types import ShardingEnv, ShardingType

from smft_dist.config import ConfigError, JobConfig, SparseOptimConfig
from smft_dist.distributed import torchrec_guards
from smft_dist.distributed.weighted_dist import sharded_weights
from smft_dist.model.value_table import SavedRows, SeededRows, ValueTable, bag_entries

FEATURES = ("all",)

_OPTIMIZERS = {
    "exact_sgd": EmbOptimType.EXACT_SGD,
    "exact_rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
    "partial_rowwise_adam": EmbOptimType.PARTIAL_ROWWISE_ADAM,
}
_CUDA_ONLY = {"adam", "partial_rowwise_adam"}
INIT_CHUNK_ROWS = 65536  # initial rows copied into the shard at a time (SeededRows' block size)


def value_optimizer(cfg: JobConfig) -> tuple[SparseOptimConfig, float]:
    """The value rows' optimizer and base lr: ``sparse_optim`` at ``method.value_lr``, except under
    full_ft, where the rows train like every other parameter (the dense AdamW's lr, betas and weight
    decay; the config requires ``sparse_optim.type=adamw`` there)."""
    m = cfg.method
    if m.name == "full_ft":
        beta1, beta2 = m.betas
        return SparseOptimConfig("adamw", beta1=beta1, beta2=beta2, weight_decay=m.weight_decay), m.dense_lr
    return cfg.sparse_optim, m.value_lr


def fused_params(cfg: SparseOptimConfig, lr: float, device_type: str) -> dict:
    """FBGEMM fused-optimizer parameters for ``cfg`` at ``lr``; Adam variants exist only on CUDA.

    ``weight_decay`` (CUDA only): L2, added to the gradient, for exact_rowwise_adagrad; decoupled for
    the Adam variants (FBGEMM's semantics). FBGEMM's exact_sgd has none and its CPU kernels ignore
    it, so a non-zero value that would do nothing is refused.
    """
    if cfg.type in _CUDA_ONLY and device_type != "cuda":
        raise ConfigError(
            f"sparse_optim.type: FBGEMM has no {cfg.type} kernel on {device_type}; "
            "use exact_sgd or exact_rowwise_adagrad"
        )
    if cfg.weight_decay and (cfg.type == "exact_sgd" or device_type != "cuda"):
        where = "exact_sgd" if cfg.type == "exact_sgd" else f"{cfg.type} on {device_type}"
        raise ConfigError(f"sparse_optim.weight_decay: FBGEMM's {where} has no weight decay (it would be ignored); set 0")
    params: dict = {"optimizer": _OPTIMIZERS[cfg.type], "learning_rate": lr}
    if cfg.type != "exact_sgd":
        params.update(eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.type == "exact_rowwise_adagrad" and cfg.weight_decay:
        params.update(weight_decay_mode=WeightDecayMode.L2)
    if cfg.type in _CUDA_ONLY:
        params.update(beta1=cfg.beta1, beta2=cfg.beta2)
    return params


def check_row_optimizer(cfg: SparseOptimConfig, method: str, memory_layers: int) -> None:
    """Row optimizers a deferred row update (smft / memory_ft) runs exactly, else a ConfigError.

    FBGEMM's Adam variants count every lookup forward (the frozen reads, evaluation) as a step of
    their bias correction. With several memory layers an upper layer's scores depend on the rows
    below, so the reads backpropagate through the TBE at lr 0: without side effects only for exact_sgd.
    """
    if cfg.type in _CUDA_ONLY:
        raise ConfigError(f"sparse_optim.type: FBGEMM's {cfg.type} advances its bias correction on every lookup forward, "
                          f"so {method}'s deferred row update would not be exact; use exact_sgd or exact_rowwise_adagrad")
    if memory_layers > 1 and cfg.type != "exact_sgd":
        raise ConfigError(f"sparse_optim.type: {cfg.type} under {method} with {memory_layers} memory layers would update "
                          "its state for every row an upper layer reads (score gradients); use exact_sgd")


class ValueTableSharder(EmbeddingBagCollectionSharder):
    """The EBC sharder, plus ROW_WISE on CPU and the non-fused DENSE kernel for ROW_WISE.

    TorchRec lists ROW_WISE only for CUDA devices, but FBGEMM's CPU TBE and gloo all-to-alls run it
    correctly (forward, backward and fused updates were checked against a local table with 2 ranks).
    CPU runs (tests, laptops) use the same placement as GPU runs thanks to this one override.
    TorchRec 1.8 offers DENSE only for DATA_PARALLEL ("TODO re-enable model parallel and dense"), but
    its row-wise lookup builds the DENSE kernel (``BatchedDenseEmbeddingBag``) as for any sharding;
    the tests check it against a local table on 1 and 2 ranks. (torch warns that FBGEMM's dense
    lookup op has no autograd kernel registered: its row and per-sample-weight gradients come from
    FBGEMM's own autograd function, and those gradients are what the tests compare.)
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu" and ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        kernels = super().compute_kernels(sharding_type, compute_device_type)
        if sharding_type == ShardingType.ROW_WISE.value and EmbeddingComputeKernel.DENSE.value not in kernels:
            kernels.append(EmbeddingComputeKernel.DENSE.value)
        return kernels


class ShardedValueTable(ValueTable):
    """A :class:`ValueTable` backed by a sharded TorchRec EBC (row-wise or replicated).

    ``init`` is the whole table ([num_rows, dim], the same on every rank; only this rank's rows are
    kept) or a row source that makes this rank's rows only: :class:`~smft_dist.model.value_table.SeededRows`
    (generated) or :class:`~smft_dist.model.value_table.SavedRows` (read from a saved model).
    ``deferred_rows``: rows update only in :meth:`step_rows` (see the module docstring).
    Per-sample weights get gradients under ROW_WISE too (:mod:`smft_dist.distributed.weighted_dist`).
    ``optim``/``lr``: the rows' optimizer (:func:`value_optimizer`); a torch optimizer (``adamw``, or
    any replicated table) steps in :meth:`step`, a fused one inside the backward.
    """

    def __init__(
        self,
        name: str,
        init: torch.Tensor | SeededRows | SavedRows,
        optim: SparseOptimConfig,
        lr: float,
        placement: str = "row_wise",
        device: torch.device | None = None,
        group: dist.ProcessGroup | None = None,
        deferred_rows: bool = False,
    ):
        super().__init__()
        self.num_rows, self.dim = init.shape
        if self.dim % 4:
            raise ConfigError(f"model.memory.v_dim: value table {name!r} has dim {self.dim}, FBGEMM needs a multiple of 4")
        self.name, self.placement, self.optim = name, placement, optim.type
        self.deferred_rows, self.lr = deferred_rows, lr
        self.on_read: Callable[[torch.Tensor], None] | None = None  # sees the local rows each lookup reads (NonFiniteGuard)
        self.group = group if group is not None else dist.group.WORLD
        device = device or (init.device if isinstance(init, torch.Tensor) else torch.device("cpu"))
        world = dist.get_world_size(self.group)
        config = EmbeddingBagConfig(
            name=name, embedding_dim=self.dim, num_embeddings=self.num_rows,
            feature_names=list(FEATURES), pooling=PoolingType.SUM,
        )
        ebc = EmbeddingBagCollection(tables=[config], is_weighted=True, device=torch.device("meta"))
        fused = placement == "row_wise" and optim.type != "adamw"
        sharder = ValueTableSharder(fused_params=fused_params(optim, 0.0 if deferred_rows else lr, device.type) if fused else None)
        if placement == "row_wise":
            kernel = EmbeddingComputeKernel.FUSED if fused else EmbeddingComputeKernel.DENSE
            generator = row_wise(compute_kernel=kernel.value)
        else:
            generator = data_parallel()
        plan = construct_module_sharding_plan(
            ebc, {name: generator}, sharder=sharder, local_size=world, world_size=world, device_type=device.type
        )
        self.ebc = shard(ebc, plan, env=ShardingEnv.from_process_group(self.group), device=device, sharder=sharder)
        shards = plan[name].sharding_spec.shards if placement == "row_wise" else None
        self.row_offsets = [s.shard_offsets[0] for s in shards] if shards else [0]
        self.row_counts = [s.shard_sizes[0] for s in shards] if shards else [self.num_rows]
        self.register_buffer("shard_starts", torch.tensor(self.row_offsets[1:], device=device), persistent=False)
        with torch.no_grad():  # this rank's rows in blocks aligned to INIT_CHUNK_ROWS: no shard-sized copy
            local = self.local_weight()
            lo = self.row_offsets[dist.get_rank(self.group)] if shards else 0
            hi = lo + local.shape[0]
            bounds = [lo, *range((lo // INIT_CHUNK_ROWS + 1) * INIT_CHUNK_ROWS, hi, INIT_CHUNK_ROWS), hi]
            for a, b in zip(bounds, bounds[1:]):
                if a < b:
                    local[a - lo : b - lo].copy_(init[a:b] if isinstance(init, torch.Tensor) else init.rows(a, b))
        self.row_optimizer = None if fused else _row_optimizer(optim, lr, dict(self.ebc.named_parameters())[self.weight_key])
        self._sharded_state = self._shard_optimizer_state() if self.row_optimizer and shards else {}
        torchrec_guards.check_gradient_division()
        if self.row_optimizer is None:
            torchrec_guards.check_step_pushes_lr_only(name, self.ebc.fused_optimizer, self.local_weight())

    # ---------------------------------------------------------------------------------- rows
    @property
    def weight_key(self) -> str:
        return f"embedding_bags.{self.name}.weight"

    def local_weight(self) -> torch.Tensor:
        """This rank's rows (a view into the TBE storage for ROW_WISE, the parameter for DP)."""
        if self.placement == "data_parallel":
            return dict(self.ebc.named_parameters())[self.weight_key]
        shards = self.ebc.state_dict()[self.weight_key].local_shards()
        return shards[0].tensor if shards else torch.empty(0, self.dim)

    def local_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Offsets into :meth:`local_weight` of the global ``rows`` this rank holds."""
        if self.placement == "data_parallel":
            return rows
        rank = dist.get_rank(self.group)
        lo, n = self.row_offsets[rank], self.row_counts[rank]
        return rows[(rows >= lo) & (rows < lo + n)] - lo

    def full_weight(self) -> torch.Tensor:
        local = self.local_weight().detach()
        if self.placement == "data_parallel":
            return local.clone()
        width = max(self.row_counts)
        padded = local.new_zeros(width, self.dim)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in self.row_counts]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, self.row_counts)])

    # ------------------------------------------------------------------------------- lookup
    def lookup(self, indices, weights, keep, rows_grad):
        values, lengths, w = bag_entries(indices, weights.float(), keep)
        if not (rows_grad or w.requires_grad):
            with torch.no_grad():
                return self._pooled(values, lengths, w)
        if not rows_grad and self.optim != "exact_sgd":
            raise RuntimeError(f"value table {self.name!r}: score gradients under deferred row updates need the "
                               f"lr-0 backward of exact_sgd; {self.optim} would update its state")
        return self._pooled(values, lengths, w)

    def _pooled(self, values: torch.Tensor, lengths: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One TorchRec lookup of jagged bags -> fp32 pooled [bags, dim]; ``w``'s gradient flows back."""
        kjt = KeyedJaggedTensor(keys=list(FEATURES), values=values, lengths=lengths, weights=w.detach())
        ctx = self.ebc.create_context()
        delivered = self.ebc.input_dist(ctx, kjt).wait().wait()
        if self.on_read is not None:
            self.on_read(delivered[0].values())
        if w.requires_grad:
            self._attach_weights(delivered[0], values, w)
        return self.ebc.compute_and_output_dist(ctx, delivered).wait().values()

    def step_rows(self, indices, weights, keep, grad):
        """The deferred update: a lookup of the ``keep`` entries whose backward updates their rows at
        ``lr`` (fused optimizer, or the replicated one); the TBE's lr is 0 again afterwards."""
        if self.row_optimizer is not None:
            self.row_optimizer.zero_grad(set_to_none=True)  # drop score-path gradients of the reads
        self._push_lr(self.lr)
        self.lookup(indices, weights, keep, rows_grad=True).backward(grad)
        if self.row_optimizer is not None:
            self.row_optimizer.step()
            self.row_optimizer.zero_grad(set_to_none=True)
        self._push_lr(0.0)

    def _attach_weights(self, delivered: KeyedJaggedTensor, values: torch.Tensor, w: torch.Tensor) -> None:
        """Make the weights TorchRec delivered differentiable w.r.t. this rank's ``w`` (checked on the
        first call, and on every call under ``SMFT_DEBUG_CHECKS=1``: :mod:`.torchrec_guards`)."""
        if self.placement == "data_parallel" or dist.get_world_size(self.group) == 1:
            rebuilt = w  # no transfer: the local weights are the delivered weights
        else:
            owner = torch.bucketize(values, self.shard_starts, right=True)
            rebuilt = sharded_weights(w, owner, delivered.lengths(), len(FEATURES), self.group)
        torchrec_guards.swap_weights(self.name, delivered, rebuilt, check=torchrec_guards.due(self))

    # ---------------------------------------------------------------------------- optimizer
    def set_lr(self, lr: float) -> None:
        """Learning rate of the next row updates (call before the backward, or the
        :meth:`~smft_dist.model.value_table.ValueTable.update_rows`, that should use it)."""
        self.lr = lr
        if not self.deferred_rows:
            self._push_lr(lr)

    def _push_lr(self, lr: float) -> None:
        opt = self.row_optimizer or self.ebc.fused_optimizer
        for group in opt.param_groups:
            group["lr"] = lr
        if self.row_optimizer is None:
            opt.step()  # TorchRec's fused optimizer: step() only pushes the lr into the TBE

    def step(self) -> None:
        """Update the rows with the gradients accumulated since the last call (a torch row optimizer;
        once per optimizer step, after the last backward). Fused optimizers updated them in backward;
        deferred tables update in :meth:`step_rows`."""
        if self.row_optimizer is None or self.deferred_rows:
            return
        self.row_optimizer.step()
        self.row_optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> dict:
        """State of the rows' optimizer (sharded tensors for ROW_WISE), for checkpoints; loading
        writes into these tensors in place."""
        if self.row_optimizer is None:
            return self.ebc.fused_optimizer.state_dict()
        state = self.row_optimizer.state_dict()
        if self._sharded_state:
            (param_state,) = state["state"].values()
            for key, sharded in self._sharded_state.items():
                if sharded.local_shards()[0].tensor is not param_state[key]:  # AdamW updates its state in place
                    raise RuntimeError(f"value table {self.name!r}: the row optimizer replaced its {key!r} tensor")
            state["state"] = {k: {**v, **self._sharded_state} for k, v in state["state"].items()}
        return state

    def _shard_optimizer_state(self) -> dict[str, ShardedTensor]:
        """Row-wise: the torch optimizer's per-row state as sharded tensors laid out like the rows, so
        a checkpoint holds every rank's part (a plain tensor would be saved from one rank only). Built
        as TorchRec builds its own sharded tensors (the weight's metadata; no collective)."""
        (param,) = self.row_optimizer.state
        weight = self.ebc.state_dict()[self.weight_key]
        (own,) = weight.local_shards()
        return {
            key: ShardedTensor._init_from_local_shards_and_global_metadata(
                [Shard(value, own.metadata)], weight.metadata(), process_group=self.group
            )
            for key, value in self.row_optimizer.state[param].items()
            if value.shape == own.tensor.shape
        }

    def extra_repr(self) -> str:
        return f"{self.name}: num_rows={self.num_rows}, dim={self.dim}, placement={self.placement}"


def _row_optimizer(cfg: SparseOptimConfig, lr: float, weight: nn.Parameter) -> torch.optim.Optimizer:
    """The torch optimizer of rows outside FBGEMM (adamw, or a replicated table): SGD or AdamW, its
    state allocated now so that a checkpoint loads into it before the first step. AdamW is torch's
    fused kernel: the default one on CPU allocates two table-sized temporaries per step (4.8 GB for
    a 1M x 576 fp32 table), the fused one none."""
    if cfg.type == "exact_sgd":
        return torch.optim.SGD([weight], lr=lr)
    if cfg.type != "adamw":
        raise ConfigError(f"sparse_optim.type: {cfg.type} is a fused FBGEMM optimizer; a torch row optimizer is exact_sgd or adamw")
    opt = torch.optim.AdamW([weight], lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True)
    zeros = lambda: torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)  # noqa: E731
    opt.state[weight] = {"step": torch.tensor(0.0), "exp_avg": zeros(), "exp_avg_sq": zeros()}
    return opt
