"""Guards on the TorchRec behaviour the sharded value tables rely on; each fails loudly, naming it.

- **gradient division**: TorchRec's collectives divide table gradients by the world size
  (``torchrec.distributed.comm_ops`` gradient division), which ``parallelize.train_step``'s loss
  scaling assumes; checked when a table is built.
- **lr-only step**: ``fused_optimizer.step()`` only pushes the learning rate into the TBE
  (``ShardedValueTable.set_lr`` calls it before each backward); checked once when a table is built:
  a step with no backward must leave the rows bit-identical.
- **delivered weights**: the weights TorchRec delivers to the owning rank equal their
  differentiable rebuild (:func:`smft_dist.distributed.weighted_dist.sharded_weights`: row-wise
  bucket order, ``[source][feature]`` regrouping), and the delivered ``KeyedJaggedTensor`` carries
  the swapped-in tensor (``_weights``). Checked on a table's first lookup with gradients, and on
  every one when ``SMFT_DEBUG_CHECKS=1``.
"""

from __future__ import annotations

import os
import weakref

import torch
from torchrec import KeyedJaggedTensor
from torchrec.distributed import comm_ops

DEBUG_ENV = "SMFT_DEBUG_CHECKS"
_checked: weakref.WeakSet = weakref.WeakSet()


class TorchRecAssumptionError(RuntimeError):
    """TorchRec no longer behaves as the sharded value tables assume (an upgrade changed it)."""


def due(owner: object) -> bool:
    """True on ``owner``'s first call, and on every call when ``SMFT_DEBUG_CHECKS=1``."""
    if os.environ.get(DEBUG_ENV) == "1":
        return True
    if owner in _checked:
        return False
    _checked.add(owner)
    return True


def check_gradient_division() -> None:
    if not comm_ops.get_gradient_division():
        raise TorchRecAssumptionError(
            "gradient division: torchrec.distributed.comm_ops no longer divides table gradients by the world "
            "size; train_step's loss scaling assumes it (rows would move W times too far)"
        )


def check_step_pushes_lr_only(name: str, optimizer: torch.optim.Optimizer, rows: torch.Tensor) -> None:
    """Step ``optimizer`` once with no backward; ``rows`` (this rank's, or a strided sample) must not move."""
    sample = rows[:: max(1, rows.shape[0] // 1024)]
    before = sample.detach().clone()
    optimizer.step()
    if not torch.equal(sample, before):
        raise TorchRecAssumptionError(
            f"lr-only step: value table {name!r}: TorchRec's fused_optimizer.step() changed rows without a "
            "backward; set_lr relies on it only pushing the learning rate into the TBE"
        )


def swap_weights(name: str, delivered: KeyedJaggedTensor, rebuilt: torch.Tensor, check: bool) -> None:
    """Put the differentiable ``rebuilt`` weights into the KJT TorchRec delivered; with ``check``,
    first verify they equal what TorchRec delivered, then that the KJT carries them."""
    if check:
        got = delivered.weights_or_none()
        if got is None or got.shape != rebuilt.shape or not torch.equal(got, rebuilt.detach().to(got.dtype)):
            raise TorchRecAssumptionError(
                f"delivered weights: value table {name!r}: the weights TorchRec delivered differ from their "
                "differentiable rebuild (row-wise bucket order or [source][feature] regrouping changed): "
                "scores would get the gradients of other entries"
            )
    delivered._weights = rebuilt
    if check and delivered.weights_or_none() is not rebuilt:
        raise TorchRecAssumptionError(
            f"delivered weights: value table {name!r}: KeyedJaggedTensor no longer keeps per-sample weights in "
            "_weights; the TBE would read TorchRec's copy and scores, keys and query would not learn"
        )
