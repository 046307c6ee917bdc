"""Data parallelism: one process per device, launched by torchrun or ``accelerate launch``.

One optimiser step with global batch B (``train.batch_size``) on W ranks, B % W == 0::

    every rank draws the same global batch (same seeded generator)   -> identical data stream
    rank r keeps rows [r B/W, (r+1) B/W)                              (B/W, ...) per rank
    forward through DDP(objective); the kind's loss passes the features that couple the batch
      (CLIP's contrastive logits) through the runtime's gather       -> every rank computes the global-batch loss
    backward; DDP averages gradients                                  -> identical gradients
    clip + AdamW on identical gradients                               -> identical parameters

So a W-rank run computes the single-process run with the same global batch, up to the order of
floating-point sums (a B-row matmul vs two B/2-row ones, then the all-reduce). Method state that is
not a gradient must stay identical on every rank: Rank-1 pool all-reduces its batch votes (so the
mask, the counts and the merged set S agree), LiLoRA's snapshots copy parameters that are already
identical. :meth:`DataParallel.check_replicas` verifies this at every task boundary.

The gather is explicit (open_clip's ``ClipLoss(rank, world_size)``): :class:`RowGather` is handed
to the kind's loss by the training step and to a method's terms through its ``TaskContext``.

Evaluation: each rank scores a shard of a task's test set (``kind.test_shard``); the per-rank
scores are weighted by shard size and summed over ranks (for accuracies the correct counts are
integers and are recovered exactly). Checkpoints and results are written by rank 0 only, followed
by a barrier.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..contract import Gather, Routing, TaskKind
from .base import Engine, Runtime

_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters


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


class RowGather:
    """``gather(x)``: the rows of ``x`` from every rank of ``group``, in rank order (differentiable).

    Every rank must call it the same number of times, on tensors of the same shape."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _GatherRows.apply(x, self.group)


def fingerprint(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n, 3) float64: sum, sum of squares and a position-weighted sum of each tensor."""
    rows = []
    for t in tensors.values():
        x = t.detach().reshape(-1).double()
        weights = torch.linspace(1.0, 2.0, x.numel(), dtype=torch.float64, device=x.device) if x.numel() else x
        rows.append(torch.stack([x.sum(), (x * x).sum(), (x * weights).sum()]).cpu())
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)


class DDPEngine(Engine):
    """The plain engine with ``DistributedDataParallel`` around the module."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer | None,
                 scaler: torch.amp.GradScaler | None, device_ids: list[int] | None) -> None:
        # Replicas start identical by construction (same seeds, same checkpoint), so DDP does not
        # re-broadcast them (init_sync=False); check_replicas verifies it instead.
        # find_unused_parameters: some trainable parameters get no gradient at all (Rank-1 pool's
        # routers in vote mode); DDP leaves their .grad None, as one process does (static_graph
        # would avoid the per-step graph walk but breaks no_sync on the first micro-batch).
        # No buffer broadcast: buffers (vote counts, records, snapshots) are kept identical by
        # the methods themselves, not overwritten from rank 0
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS
                          else {"broadcast_buffers": False})  # torch < 2.13
        ddp = DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True, init_sync=False,
                                      **no_buffer_sync)
        super().__init__(ddp, optimizer, scaler)

    def no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
        return contextlib.nullcontext() if last_micro_batch else self.module.no_sync()


class DataParallel(Runtime):
    """One rank of a torchrun / accelerate launch (``torch.distributed`` initialised, W > 1)."""

    def __init__(self, device: str, precision: str, rank: int, world_size: int, local_rank: int,
                 deepspeed: dict[str, Any] | None = None) -> None:
        super().__init__(device, precision, deepspeed)
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    # --- collectives ---------------------------------------------------------------------------
    @property
    def gather(self) -> Gather:
        return RowGather(dist.group.WORLD)

    def barrier(self) -> None:
        dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main:
            dist.barrier()

    def on_main(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        failure: Exception | None = None
        if self.is_main:
            try:
                fn(*args, **kwargs)
            except Exception as err:  # raised below, on every rank
                failure = err
        message = [None if failure is None else (type(failure), str(failure))]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and failure is None:
            kind, text = message[0]
            failure = kind(text)
        if failure is not None:
            raise failure

    # --- training ------------------------------------------------------------------------------
    def local_rows(self, batch_size: int) -> slice | None:
        rows = batch_size // self.world_size
        return slice(self.rank * rows, (self.rank + 1) * rows)

    def _engine(self, module: nn.Module, optimizer: torch.optim.Optimizer | None) -> Engine:
        if not any(p.requires_grad for p in module.parameters()):
            return super()._engine(module, optimizer)  # (a task with no training step needs no DDP)
        device_ids = [self.local_rank] if self.device.startswith("cuda") else None
        return DDPEngine(module, optimizer, self.grad_scaler(), device_ids)

    @contextlib.contextmanager
    def task_rng(self, seed: int) -> Iterator[None]:
        """Seed this rank's own random stream (different dropout masks on different ranks); afterwards
        restore the shared state, so that what runs next (e.g. re-initialising adapters at the task's
        end) draws the same numbers on every rank."""
        cuda = self.device.startswith("cuda")
        shared = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None)
        torch.manual_seed(seed + 7_919 * self.rank)
        try:
            yield
        finally:
            torch.set_rng_state(shared[0])
            if shared[1] is not None:
                torch.cuda.set_rng_state(shared[1], self.device)

    def check_replicas(self, model: nn.Module, where: str) -> None:
        state = model.state_dict()
        prints = self.all_gather_object(fingerprint(state))
        names = list(state)
        for rank, other in enumerate(prints[1:], start=1):
            if other.shape != prints[0].shape:
                raise RuntimeError(f"{where}: rank {rank} holds {len(other)} tensors, rank 0 {len(prints[0])}")
            differ = [names[i] for i in torch.nonzero((other != prints[0]).any(dim=1)).flatten().tolist()]
            if differ:
                raise RuntimeError(f"{where}: rank {rank} differs from rank 0 in {len(differ)} tensors, "
                                   f"e.g. {differ[:5]}")

    # --- evaluation ----------------------------------------------------------------------------
    def evaluate(self, kind: TaskKind, model: nn.Module, task: Any, xtail: bool = False,
                 routing: Routing | None = None) -> float:
        """Each rank scores a shard of the test set; the sums are all-reduced (a kind that cannot
        shard is scored whole on every rank). A router's counts stay per rank (the trainer sums them)."""
        shard = kind.test_shard(task, self.rank, self.world_size)
        if shard is None:
            return super().evaluate(kind, model, task, xtail, routing)
        n = kind.num_test(shard)
        with self.autocast():
            score = float(kind.evaluate(model, shard, xtail=xtail, routing=routing)) if n else 0.0
        weighted = score * n / 100.0  # percent -> number of correct samples
        if kind.protocol == "mtil":
            weighted = float(round(weighted))  # accuracies: correct counts are integers
        sums = torch.tensor([weighted, float(n)], dtype=torch.float64, device=self.device)
        dist.all_reduce(sums)
        return 100.0 * float(sums[0]) / float(sums[1])
