"""Autograd-aware transfer of per-sample weights (the memory scores) under ROW_WISE sharding.

TorchRec ships each (index, weight) pair to the rank owning the row with an all-to-all autograd does
not see, so the scores would get no gradient. Its row-wise input dist puts each pair in bucket
``owner(index)``, keeps the original order inside a bucket (features, then bags, then positions),
all-to-alls bucket ``r`` to rank ``r`` and, with several features, regroups what arrives from
``[source][feature]`` to ``[feature][source]`` order. :func:`sharded_weights` rebuilds exactly those
delivered weights from the source weights with differentiable steps (a stable permutation, an
all-to-all whose backward is the reverse all-to-all, a regrouping), so the TBE on the owning rank
computes the weight gradients and they flow back to the ranks that produced the scores. The
sharded table swaps them into TorchRec's delivered KJT between ``input_dist`` and
``compute_and_output_dist``; everything else stays TorchRec's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of a 1-D tensor; backward sends the gradient back with splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty(sum(ctx.send))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


def _regroup_index(counts: torch.Tensor) -> torch.Tensor:
    """Gather index taking a buffer laid out ``[source][feature]`` (segment sizes ``counts[s, f]``)
    to ``[feature][source]`` order."""
    W, F = counts.shape
    starts = torch.zeros(W * F, dtype=torch.long, device=counts.device)
    starts[1:] = counts.reshape(-1).cumsum(0)[:-1]
    starts_fs = starts.view(W, F).t().reshape(-1)  # segment starts in [feature][source] order
    sizes_fs = counts.t().reshape(-1)
    seg = torch.repeat_interleave(torch.arange(W * F, device=counts.device), sizes_fs)
    seg_start_out = torch.zeros_like(sizes_fs)
    seg_start_out[1:] = sizes_fs.cumsum(0)[:-1]
    pos_in_seg = torch.arange(seg.numel(), device=counts.device) - seg_start_out[seg]
    return starts_fs[seg] + pos_in_seg


def sharded_weights(
    weights: torch.Tensor,
    owner: torch.Tensor,
    delivered_lengths: torch.Tensor,
    num_features: int,
    group=None,
) -> torch.Tensor:
    """Differentiable version of the weights TorchRec delivers to this rank under ROW_WISE.

    ``weights``/``owner``: the flat KJT weights on this rank and the rank owning each value's row.
    ``delivered_lengths``: lengths of the KJT TorchRec delivered here (``[feature][source][bag]``).
    """
    group = group if group is not None else dist.group.WORLD
    W = dist.get_world_size(group)
    perm = torch.argsort(owner, stable=True)
    send = torch.bincount(owner, minlength=W)
    counts = delivered_lengths.view(num_features, W, -1).sum(-1).t()  # [source, feature]
    recv = counts.sum(1)
    received = _AllToAll.apply(weights[perm], send.tolist(), recv.tolist(), group)
    return received[_regroup_index(counts)]
