"""How one global batch and a task's test set are laid out over the ranks of a data-parallel run.

Every rank draws the same global batch and keeps its own rows (:func:`slice_batch`); a loss that
couples the samples of the batch gathers their per-sample features back from every rank
(:func:`gather_batch` for the kind's loss, inside :func:`gathering`; :func:`gather_rows` for a
method's term on the rank's own rows), so each rank computes the loss of the global batch. Test
sets are split by :func:`shard_test_set`. In one process every function here is the identity.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

# the process group that batch-coupled losses gather over, while a distributed training forward runs
_GATHER_GROUP: contextvars.ContextVar[Any] = contextvars.ContextVar("continual_lora_gather_group", default=None)


# --- batch-coupled losses ------------------------------------------------------------------------
class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's rows (dim 0); backward sums the gradient over ranks, keeps own rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # (b, ...) -> (W b, ...)
        ctx.group, ctx.rows = group, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # every rank computed the same global loss, so the summed gradient is W times the true one;
        # DDP's averaging divides by W again: the parameters see exactly d(global loss)/d(params)
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = dist.get_rank(ctx.group) * ctx.rows
        return grad[start : start + ctx.rows], None


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every rank, in rank order, while a distributed training forward runs.

    Losses that couple the samples of a batch (contrastive logits over all pairs) call this on
    their per-sample features so that each rank computes the loss of the global batch. Outside
    such a forward (one process, evaluation, pretraining, a method's own extra batches) it
    returns ``x`` unchanged.
    """
    group = _GATHER_GROUP.get()
    return x if group is None else _GatherRows.apply(x, group)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every rank whenever ``torch.distributed`` runs with several ranks.

    For a method's loss term on the rows of the training batch this rank holds (LwF-VR's
    text->image distillation): every rank then computes the global-batch term, as
    :func:`gather_batch` does for the kind's loss. Every rank must call it the same number of times.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _GatherRows.apply(x, dist.group.WORLD)
    return x


@contextlib.contextmanager
def gathering(group: Any) -> Iterator[None]:
    """While the block runs (a distributed training forward), :func:`gather_batch` gathers over ``group``."""
    token = _GATHER_GROUP.set(group)
    try:
        yield
    finally:
        _GATHER_GROUP.reset(token)


# --- batches and tasks ---------------------------------------------------------------------------
def slice_batch(batch: Any, start: int, stop: int, rows: int) -> Any:
    """Rows [start, stop) of every tensor / list in ``batch`` whose first dimension is ``rows``."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == rows else batch
    if isinstance(batch, dict):
        return {k: slice_batch(v, start, stop, rows) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and len(batch) == rows:
        return type(batch)(batch[start:stop]) if isinstance(batch, list) else tuple(batch[start:stop])
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(v, start, stop, rows) for v in batch)
    return batch


def shard_test_set(task: Any, rank: int, world: int) -> Any | None:
    """A copy of ``task`` whose test split holds every ``world``-th sample from ``rank``.

    Needs a dataclass task with ``test_images`` / ``test_labels`` (CLIP image tasks); returns
    None for anything else, which the caller then evaluates whole on every rank.
    """
    if not dataclasses.is_dataclass(task) or not all(hasattr(task, k) for k in ("test_images", "test_labels")):
        return None
    keep = torch.arange(rank, len(task.test_labels), world)
    return dataclasses.replace(task, test_images=task.test_images[keep], test_labels=task.test_labels[keep])
