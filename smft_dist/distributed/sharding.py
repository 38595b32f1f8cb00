"""Memory value tables as TorchRec ``EmbeddingBagCollection`` s: plan, sharder, fused optimizer.

Each value table becomes one single-table ``EmbeddingBagCollection`` (weighted, sum pooling). Under
sparse finetuning (``split``) two features read it, ``train`` and ``frozen``
(:func:`smft_dist.model.value_table.split_bags`); the frozen feature's pooled output is detached, so
its rows get no update. Otherwise one feature reads it, so the output reduce-scatter carries one
pooled vector per token, not two. Placement is ROW_WISE over all ranks (default) with the FUSED
kernel, whose FBGEMM optimizer updates the rows inside the backward pass, or DATA_PARALLEL
(replicated, small tables; TorchRec's DDP averages the gradients, rows are updated by
:meth:`ShardedValueTable.step_replicated`).

TorchRec divides table gradients by the world size (a DDP-style mean over ranks): with each rank's
loss a mean over its own tokens, that equals one process over the global batch, as long as every
rank's loss is scaled to its share of the global batch (see ``parallelize.train_step``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.shard import shard
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, data_parallel, row_wise
from torchrec.distributed.types import ShardingEnv, ShardingType

from smft_dist.config import SparseOptimConfig
from smft_dist.distributed.weighted_dist import sharded_weights
from smft_dist.model.value_table import SavedRows, SeededRows, ValueTable, split_bags

SPLIT_FEATURES = ("train", "frozen")
WHOLE_FEATURES = ("all",)

_OPTIMIZERS = {
    "exact_sgd": EmbOptimType.EXACT_SGD,
    "exact_rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
    "partial_rowwise_adam": EmbOptimType.PARTIAL_ROWWISE_ADAM,
}
_CUDA_ONLY = {"adam", "partial_rowwise_adam"}
INIT_CHUNK_ROWS = 65536  # initial rows copied into the shard at a time (SeededRows' block size)


def fused_params(cfg: SparseOptimConfig, lr: float, device_type: str) -> dict:
    """FBGEMM fused-optimizer parameters for ``cfg`` at ``lr``; Adam variants exist only on CUDA."""
    if cfg.type in _CUDA_ONLY and device_type != "cuda":
        raise ValueError(
            f"sparse_optim.type={cfg.type}: FBGEMM has no {cfg.type} kernel on {device_type}; "
            "use exact_sgd or exact_rowwise_adagrad"
        )
    params: dict = {"optimizer": _OPTIMIZERS[cfg.type], "learning_rate": lr}
    if cfg.type != "exact_sgd":
        params.update(eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.type in _CUDA_ONLY:
        params.update(beta1=cfg.beta1, beta2=cfg.beta2)
    return params


class ValueTableSharder(EmbeddingBagCollectionSharder):
    """The EBC sharder, plus ROW_WISE on CPU.

    TorchRec lists ROW_WISE only for CUDA devices, but FBGEMM's CPU TBE and gloo all-to-alls run it
    correctly (forward, backward and fused updates were checked against a local table with 2 ranks).
    CPU runs (tests, laptops) use the same placement as GPU runs thanks to this one override.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu" and ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types


class ShardedValueTable(ValueTable):
    """A :class:`ValueTable` backed by a sharded TorchRec EBC (row-wise or replicated).

    ``init`` is the whole table ([num_rows, dim], the same on every rank; only this rank's rows are
    kept) or a row source that makes this rank's rows only: :class:`~smft_dist.model.value_table.SeededRows`
    (generated) or :class:`~smft_dist.model.value_table.SavedRows` (read from a saved model).
    ``split``: lookups may pass a ``trainable`` mask (two features, see the module docstring).
    Per-sample weights get gradients under ROW_WISE too (:mod:`smft_dist.distributed.weighted_dist`).
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
        split: bool = False,
    ):
        super().__init__()
        self.num_rows, self.dim = init.shape
        if self.dim % 4:
            raise ValueError(f"value table {name!r}: dim {self.dim} must be a multiple of 4 (FBGEMM TBE rows)")
        self.name, self.placement, self.split = name, placement, split
        self.features = SPLIT_FEATURES if split else WHOLE_FEATURES
        self.group = group if group is not None else dist.group.WORLD
        device = device or (init.device if isinstance(init, torch.Tensor) else torch.device("cpu"))
        world = dist.get_world_size(self.group)
        config = EmbeddingBagConfig(
            name=name, embedding_dim=self.dim, num_embeddings=self.num_rows,
            feature_names=list(self.features), pooling=PoolingType.SUM,
        )
        ebc = EmbeddingBagCollection(tables=[config], is_weighted=True, device=torch.device("meta"))
        sharder = ValueTableSharder(fused_params=fused_params(optim, lr, device.type))
        if placement == "row_wise":
            generator = row_wise(compute_kernel=EmbeddingComputeKernel.FUSED.value)
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
        self.replicated_optimizer = None
        if placement == "data_parallel":
            self.replicated_optimizer = _replicated_optimizer(optim, lr, self.local_weight())
        with torch.no_grad():  # this rank's rows in blocks aligned to INIT_CHUNK_ROWS: no shard-sized copy
            local = self.local_weight()
            lo = self.row_offsets[dist.get_rank(self.group)] if shards else 0
            hi = lo + local.shape[0]
            bounds = [lo, *range((lo // INIT_CHUNK_ROWS + 1) * INIT_CHUNK_ROWS, hi, INIT_CHUNK_ROWS), hi]
            for a, b in zip(bounds, bounds[1:]):
                if a < b:
                    local[a - lo : b - lo].copy_(init[a:b] if isinstance(init, torch.Tensor) else init.rows(a, b))

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
    def forward(self, indices, weights, valid=None, trainable=None):
        if trainable is not None and not self.split:
            raise ValueError(f"value table {self.name!r} was built without split=True: it takes no trainable mask")
        feats = split_bags(indices, weights.float(), valid, trainable)
        if self.split and trainable is None:  # every entry trains (e.g. no selector in eval): frozen is empty
            feats.append((indices.new_zeros(0), torch.zeros_like(feats[0][1]), weights.new_zeros(0, dtype=torch.float32), False))
        values = torch.cat([f[0] for f in feats])
        w = torch.cat([f[2] for f in feats])
        kjt = KeyedJaggedTensor(
            keys=list(self.features), values=values, lengths=torch.cat([f[1] for f in feats]), weights=w.detach()
        )
        ctx = self.ebc.create_context()
        delivered = self.ebc.input_dist(ctx, kjt).wait().wait()
        if w.requires_grad:
            self._attach_weights(delivered[0], values, w)
        pooled = self.ebc.compute_and_output_dist(ctx, delivered).wait().values()
        if not self.split:
            return pooled.to(weights.dtype)
        train, frozen = pooled.split(self.dim, dim=1)
        return (train + frozen.detach()).to(weights.dtype)

    def _attach_weights(self, delivered: KeyedJaggedTensor, values: torch.Tensor, w: torch.Tensor) -> None:
        """Make the weights TorchRec delivered differentiable w.r.t. this rank's ``w``."""
        if self.placement == "data_parallel" or dist.get_world_size(self.group) == 1:
            delivered._weights = w  # no transfer: the local weights are the delivered weights
            return
        owner = torch.bucketize(values, self.shard_starts, right=True)
        delivered._weights = sharded_weights(w, owner, delivered.lengths(), len(self.features), self.group)

    # ---------------------------------------------------------------------------- optimizer
    def set_lr(self, lr: float) -> None:
        """Learning rate of the next row updates (call before the backward that should use it)."""
        opt = self.replicated_optimizer or self.ebc.fused_optimizer
        for group in opt.param_groups:
            group["lr"] = lr
        if self.replicated_optimizer is None:
            opt.step()  # TorchRec's fused optimizer: step() only pushes the lr into the TBE

    def step_replicated(self) -> None:
        """DATA_PARALLEL only: update the rows (after backward; TorchRec's DDP averaged the grads)."""
        if self.replicated_optimizer is None:
            return
        self.replicated_optimizer.step()
        self.replicated_optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> dict:
        """State of the rows' optimizer (sharded tensors for ROW_WISE), for checkpoints."""
        opt = self.replicated_optimizer or self.ebc.fused_optimizer
        return opt.state_dict()

    def extra_repr(self) -> str:
        return f"{self.name}: num_rows={self.num_rows}, dim={self.dim}, placement={self.placement}"


def _replicated_optimizer(cfg: SparseOptimConfig, lr: float, weight: torch.Tensor) -> torch.optim.Optimizer:
    if cfg.type != "exact_sgd":
        raise ValueError(f"distributed.table_placement=data_parallel supports sparse_optim.type=exact_sgd, not {cfg.type}")
    return torch.optim.SGD([weight], lr=lr)
