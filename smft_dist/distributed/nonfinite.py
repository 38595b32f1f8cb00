"""Non-finite training: stop (or skip the step) on a NaN/inf loss, stop on a NaN/inf dense gradient
or value row, and measure how far value rows moved in a step.

Where each check sits, and why ``train.on_nonfinite=skip`` covers non-finite *losses* only:

* loss: :func:`~smft_dist.distributed.parallelize.train_step` checks the all-reduced loss before the
  backward (every rank sees the same value, so all agree). Nothing has changed yet, so the step can
  be skipped whole: no row update (FBGEMM's fused optimizer steps rows *inside* the backward), no
  dense step. Costs one host sync per step, as DeepSpeed's fp16 loss scaler does.
* dense gradients: a step pre-hook on the dense optimizer (inside ``engine.step``, after the
  backward). By then the backward has already stepped the value rows, so the update cannot be
  withdrawn: the run always stops.
* value rows: :class:`NonFiniteGuard` snapshots each rank's rows before a logged step and reports the
  norm of their change (``row_update_norm/<table>``); a non-finite change stops the run. It copies
  only rows that can change: under deferred updates (smft, memory_ft) the rows the step updates,
  taken just before the update; where rows update inside the backward (pretraining, full
  finetuning) with a fused FBGEMM optimizer or SGD, the rows each lookup reads, taken as the lookup
  delivers them to their owner (before any backward); O(rows read), not O(shard). A torch AdamW
  (its moments move rows the step did not read) or a replicated table (other ranks' reads update
  it) copies the rank's shard.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from smft_dist.distributed.parallelize import Parallel


class NonFiniteError(RuntimeError):
    """Training produced a NaN or inf (loss, dense gradient or value rows)."""

    def __init__(self, message: str, skippable: bool = False):
        super().__init__(message)
        self.skippable = skippable  # nothing was updated yet: the step can be skipped


def check_loss(loss_sum: torch.Tensor) -> None:
    """Raise a skippable :class:`NonFiniteError` when the (all-reduced) loss is NaN or inf."""
    if not bool(torch.isfinite(loss_sum)):
        raise NonFiniteError(f"non-finite loss ({float(loss_sum)})", skippable=True)


def _check_dense_grads(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Step pre-hook: stop when any rank's (partition of the) dense gradients holds a NaN or inf."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    flag = torch.zeros((), device=grads[0].device if grads else "cpu")
    for g in grads:
        flag = torch.maximum(flag, (~torch.isfinite(g)).any().to(flag))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if bool(flag):
        raise NonFiniteError("non-finite dense gradient norm (the value rows were already updated in the backward, "
                             "so train.on_nonfinite=skip cannot skip it)")


class NonFiniteGuard:
    """Runs train steps under ``policy`` (``fail`` | ``skip``), counting skipped steps and measuring
    the value-row update norm of the steps asked to."""

    def __init__(self, par: Parallel, policy: str = "fail"):
        self.par, self.policy = par, policy
        self.skipped = 0
        self.row_update_norms: dict[str, float] = {}
        if par.engine is not None:
            par.engine.client_optimizer.register_step_pre_hook(_check_dense_grads)

    def step(self, step: int, run: Callable[[], float], measure_rows: bool = False) -> float | None:
        """``run()`` (one train step, numbered ``step``); None when it was skipped."""
        tables = self.par.tables if self.par.values_train else {}
        # table -> (local row offsets, None = the whole shard; their values before the step)
        before: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
        if measure_rows:
            for n, t in tables.items():
                if _updates_only_selected_rows(t) or _updates_only_read_rows(t):  # filled as rows are read / selected
                    w = t.local_weight()
                    before[n] = (torch.empty(0, dtype=torch.long, device=w.device), w.new_empty(0, t.dim))
                    if not t.deferred_rows:
                        t.on_read = lambda rows, n=n: before.__setitem__(n, _add_rows(tables[n], *before[n], rows))
                else:
                    before[n] = (None, t.local_weight().detach().clone())
            self.par.before_row_update = lambda n, rows: before.__setitem__(n, _rows_before(tables[n], rows))
        try:
            loss = run()
        except NonFiniteError as e:
            if not (e.skippable and self.policy == "skip"):
                hint = "; train.on_nonfinite=skip skips such steps" if e.skippable else ""
                raise NonFiniteError(f"step {step}: {e}; lower method.dense_lr / method.value_lr{hint}") from None
            self.par.discard_step()  # its lookups must not count in the next step's selection
            self.skipped += 1
            loss = None
        finally:
            self.par.before_row_update = None
            for t in tables.values():
                t.on_read = None
        if before:
            self.row_update_norms = {n: _update_norm(tables[n], *snapshot) for n, snapshot in sorted(before.items())}
            bad = sorted(n for n, v in self.row_update_norms.items() if not math.isfinite(v))
            if bad:
                raise NonFiniteError(f"step {step}: non-finite value rows in table {bad[0]}; lower method.value_lr")
        return loss

    def metrics(self) -> dict[str, float]:
        out = {f"row_update_norm/{n}": v for n, v in self.row_update_norms.items()}
        if self.policy == "skip":
            out["skipped_steps"] = float(self.skipped)
        return out


def _steps_looked_up_rows_only(table) -> bool:
    """A fused FBGEMM optimizer or a plain SGD steps the looked-up rows alone (AdamW moves every row)."""
    return table.row_optimizer is None or type(table.row_optimizer) is torch.optim.SGD


def _updates_only_selected_rows(table) -> bool:
    """Whether a step changes only the rows its deferred update selects."""
    return table.deferred_rows and _steps_looked_up_rows_only(table)


def _updates_only_read_rows(table) -> bool:
    """Whether a step changes only rows this rank's lookups deliver to it: rows updating inside the
    backward of a row-wise table, whose owner sees every rank's reads of them."""
    return not table.deferred_rows and table.placement == "row_wise" and _steps_looked_up_rows_only(table)


def _add_rows(table, local: torch.Tensor, before: torch.Tensor, read: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local, before)`` plus the offsets and current values of the rows in ``read`` (local
    offsets) not held yet: a row read again later may have updated since its first read."""
    read = torch.unique(read.to(local.device, torch.long))
    new = read[~torch.isin(read, local)]
    return torch.cat([local, new]), torch.cat([before, table.local_weight().detach().index_select(0, new)])


def _rows_before(table, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets, values) of this rank's share of ``rows`` (global ids), copied before they update."""
    local = table.local_rows(rows.to(table.local_weight().device))
    return local, table.local_weight().detach().index_select(0, local)


def _update_norm(table, local: torch.Tensor | None, before: torch.Tensor) -> float:
    """L2 norm of the change of the table (row-wise shards summed over the table's group), from the
    values ``before`` of the rows at ``local`` (None: the whole shard); no other row changed."""
    now = table.local_weight().detach()
    sq = ((now if local is None else now.index_select(0, local)).float() - before.float()).pow(2).sum()
    if table.placement == "row_wise":
        dist.all_reduce(sq, group=table.group)
    return float(sq.sqrt())
