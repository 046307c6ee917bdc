"""Data-parallel execution of the continual trainer: one process per device, launched by torchrun
or ``accelerate launch`` (both set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
accelerate's DeepSpeed configs also set ACCELERATE_USE_DEEPSPEED and the ZeRO settings), plus
mixed precision and gradient checkpointing.

One optimiser step with global batch B (``train.batch_size``) on W ranks, B % W == 0::

    every rank draws the same global batch (same seeded generator)   -> identical data stream
    rank r keeps rows [r B/W, (r+1) B/W)                              (B/W, ...) per rank
    forward through DDP(TrainStep); inside the kind's loss, features that couple the batch
      (CLIP's contrastive logits) are all-gathered -> every rank computes the global-batch loss
    backward; DDP averages gradients                                  -> identical gradients
    clip + AdamW on identical gradients                               -> identical parameters

So a W-rank run computes the single-process run with the same global batch, up to the order of
floating-point sums (a B-row matmul vs two B/2-row ones, then the all-reduce). Method state that is
not a gradient must stay identical on every rank: Rank-1 pool all-reduces its batch votes (so the
mask, the counts and the merged set S agree), LiLoRA's snapshots copy parameters that are already
identical. :meth:`Runtime.check_replicas` verifies this at every task boundary.

How rows are sliced, gathered back and how test sets are sharded: :mod:`.sharding`.

Evaluation: each rank scores a shard of a task's test set; the per-rank scores are weighted by
shard size and summed over ranks (for accuracies the correct counts are integers and are
recovered exactly). Checkpoints and results are written by rank 0 only, followed by a barrier.

DeepSpeed ZeRO (``accelerate launch`` with a DeepSpeed config, see :mod:`.zero`): the same data
layout and gathering; a DeepSpeed engine replaces DDP for the task's training and shards optimiser
state (ZeRO-1), gradients (ZeRO-2) and, while the task trains, the parameters (ZeRO-3).

Single process (no launcher, W = 1): every method of :class:`Runtime` is the plain operation the
trainer always did, so results are bit-identical to a run without this module.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import inspect
import os
from datetime import timedelta
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..adapters.layers import AdaptedMultiheadAttention
from .sharding import gathering, shard_test_set, slice_batch
from .zero import (build_engine, deepspeed_requested, release, select_accelerator, set_leaf_modules, zero3_layout,
                   zero_settings, zero_stage)

_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# --- launcher environment ------------------------------------------------------------------------
def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun / accelerate launch (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_rank() -> int:
    """This process's global rank (0 without a launcher)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _check_accelerate_precision(precision: str) -> None:
    """accelerate's ``mixed_precision`` is not read (precision is ``train.precision``): refuse a
    launcher config that asks for another one rather than ignore it."""
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if asked not in ("no", precision):
        raise ValueError(f"the accelerate config sets mixed_precision={asked!r}, which the trainer does not read; "
                         f"set train.precision={asked} in the run config and keep mixed_precision 'no'")


# --- the per-task training module ----------------------------------------------------------------
class TrainStep(nn.Module):
    """``forward(batch) -> (total loss, loss terms)``: the kind's loss plus the method's weighted
    terms, computed in one module so that DDP sees the whole graph.

    Mixed precision is entered HERE, inside the module's forward: DeepSpeed's engine runs its
    module inside ``torch.autocast(enabled=False)`` when it finds CUDA autocast already on and its
    config has no ``torch_autocast`` section, so an autocast around the engine call would be
    switched off for the whole training forward.
    """

    def __init__(self, model: nn.Module, method: Any, kind: Any, gather_group: Any = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        super().__init__()
        self.model = model
        self.method = method  # not a module: its state lives in the model's branches
        self.kind = kind
        self.gather_group = gather_group
        self.autocast = autocast

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        gather = gathering(self.gather_group) if self.gather_group is not None else contextlib.nullcontext()
        with self.autocast():
            with gather:
                loss = self.kind.loss(self.model, batch)
            # outside the gather: batches a method draws itself (replay, joint training) are whole on
            # every rank; a term that couples ``batch``'s own rows gathers them with gather_rows
            terms = self.method.loss_terms(self.model, batch)
        total = loss + sum(terms.values()) if terms else loss
        return total, terms


def fingerprint(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n, 3) float64: sum, sum of squares and a position-weighted sum of each tensor."""
    rows = []
    for t in tensors.values():
        x = t.detach().reshape(-1).double()
        weights = torch.linspace(1.0, 2.0, x.numel(), dtype=torch.float64, device=x.device) if x.numel() else x
        rows.append(torch.stack([x.sum(), (x * x).sum(), (x * weights).sum()]).cpu())
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)


class Runtime:
    """Where and how the trainer runs: device, rank, world size, precision.

    ``Runtime.from_env`` initialises ``torch.distributed`` (gloo on CPU, nccl on CUDA) when a
    launcher set WORLD_SIZE > 1; otherwise every method is the plain single-process operation.
    """

    def __init__(self, device: str = "cpu", precision: str = "fp32", rank: int = 0, world_size: int = 1,
                 local_rank: int = 0, deepspeed: dict[str, Any] | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.device, self.precision = device, precision
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.deepspeed = deepspeed  # DeepSpeed config (ZeRO), from accelerate launch; None: DDP / one process
        self._scaler: torch.amp.GradScaler | None = None
        self._engine: Any = None  # this task's DeepSpeed engine
        self.zero3_layout: dict[str, Any] | None = None  # ZeRO-3: what the last task's engine partitioned

    @classmethod
    def from_env(cls, device: str = "cpu", precision: str = "fp32", batch_size: int | None = None,
                 grad_accum: int = 1, max_grad_norm: float | None = None) -> Runtime:
        """One process, or one rank of torchrun / accelerate launch; DeepSpeed ZeRO when accelerate's
        config asks for it (``batch_size`` etc. then fill DeepSpeed's batch settings, see .zero)."""
        world = launched_world_size()
        use_deepspeed = deepspeed_requested()
        _check_accelerate_precision(precision)
        if world <= 1 and not use_deepspeed:
            return cls(device, precision)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
        ds_config = None
        if use_deepspeed:
            if batch_size is None:
                raise ValueError("DeepSpeed needs the run's batch size: Runtime.from_env(..., batch_size=...)")
            select_accelerator(device)  # before anything imports deepspeed
            ds_config = zero_settings(batch_size, grad_accum, world, max_grad_norm, precision)
        if not dist.is_initialized():
            # long timeout: rank 0 may fill the data / model caches while the others wait (main_first)
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=1))
            atexit.register(_destroy)
        return cls(device, precision, dist.get_rank(), dist.get_world_size(), local_rank, deepspeed=ds_config)

    @classmethod
    def for_training(cls, train: Any) -> Runtime:
        """:meth:`from_env` for a ``TrainConfig`` (device, precision, batch and clipping settings)."""
        return cls.from_env(train.device, train.precision, batch_size=train.batch_size, grad_accum=train.grad_accum,
                            max_grad_norm=train.max_grad_norm)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "rank": self.rank, "device": self.device, "precision": self.precision,
                "backend": dist.get_backend() if dist.is_initialized() else None,
                "engine": "deepspeed" if self.deepspeed is not None else ("ddp" if self.distributed else "single"),
                "zero_stage": zero_stage(self.deepspeed) if self.deepspeed is not None else None,
                **({"zero3_layout": self.zero3_layout} if self.zero3_layout is not None else {})}

    # --- collectives (no-ops in one process) ---------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (filling caches: data, pretrained model), then the others."""
        if self.distributed and not self.is_main:
            dist.barrier()
        yield
        if self.distributed and self.is_main:
            dist.barrier()

    def on_main(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Call ``fn`` on rank 0 only; an exception it raises is raised on every rank."""
        failure: Exception | None = None
        if self.is_main:
            try:
                fn(*args, **kwargs)
            except Exception as err:  # raised below, on every rank
                failure = err
        if self.distributed:
            message = [None if failure is None else (type(failure), str(failure))]
            dist.broadcast_object_list(message, src=0)
            if message[0] is not None and failure is None:
                kind, text = message[0]
                failure = kind(text)
        if failure is not None:
            raise failure

    # --- training ------------------------------------------------------------------------------
    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(f"train.batch_size ({batch_size}) must be divisible by the number of processes "
                             f"({self.world_size}): each rank takes an equal slice of the global batch")

    def prepare(self, model: nn.Module, method: Any, kind: Any,
                optimizer: torch.optim.Optimizer | None) -> tuple[nn.Module, Any]:
        """(the module to call per micro-batch, the optimiser to step): DDP-wrapped when
        distributed, a DeepSpeed engine under a ZeRO config, the plain pair in one process.

        Called again for every task, after ``method.begin_task``: the trainable parameters change
        per task (new factors, freezing) and DDP / DeepSpeed register them when they are built.
        Call :meth:`finish` when the task's training ends.
        """
        gather_group = dist.group.WORLD if self.distributed else None
        step = TrainStep(model, method, kind, gather_group=gather_group, autocast=self.autocast)
        if self.deepspeed is not None and optimizer is not None:
            if zero_stage(self.deepspeed) == 3:
                set_leaf_modules(model, (AdaptedMultiheadAttention,))
            self._engine, optimizer = build_engine(step, optimizer, self.deepspeed)
            if zero_stage(self.deepspeed) == 3:
                self.zero3_layout = zero3_layout(self._engine.module)
                if self.zero3_layout["adapters_partitioned"]:  # methods read them outside their forward
                    names = self.zero3_layout["adapters_partitioned"][:3]
                    raise RuntimeError(f"ZeRO-3 partitioned adapter tensors {names}")
            return self._engine, optimizer
        if not self.distributed or not any(p.requires_grad for p in model.parameters()):
            return step, optimizer  # (a task with no training step needs no DDP)
        # Replicas start identical by construction (same seeds, same checkpoint), so DDP does not
        # re-broadcast them (init_sync=False); check_replicas verifies it instead.
        device_ids = [self.local_rank] if self.device.startswith("cuda") else None
        # find_unused_parameters: some trainable parameters get no gradient at all (Rank-1 pool's
        # routers in vote mode); DDP leaves their .grad None, as one process does (static_graph
        # would avoid the per-step graph walk but breaks no_sync on the first micro-batch).
        # No buffer broadcast: buffers (vote counts, records, snapshots) are kept identical by
        # the methods themselves, not overwritten from rank 0
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS
                          else {"broadcast_buffers": False})  # torch < 2.13
        ddp = DistributedDataParallel(step, device_ids=device_ids, find_unused_parameters=True, init_sync=False,
                                      **no_buffer_sync)
        return ddp, optimizer

    def finish(self) -> None:
        """End of a task's training: ZeRO-3 gathers the partitioned parameters back into whole ones
        and the engine drops its hooks, so that ``end_task``, evaluation and checkpoints see a
        plain model (see .zero)."""
        if self._engine is not None:
            engine, self._engine = self._engine, None
            probes = release(engine)
            del engine
            gc.collect()
            alive = [ref() for ref in probes if ref() is not None]
            if alive:  # the old shards (about W0 / W per rank) would stay in memory, task after task
                raise RuntimeError(f"ZeRO-3 state outlived its task: {[type(x).__name__ for x in alive]} still "
                                   "referenced (see continual_lora.continual.zero.release)")

    def local_batch(self, batch: Any, batch_size: int) -> Any:
        """This rank's rows of the global batch (the batch itself in one process)."""
        if not self.distributed:
            return batch
        rows = batch_size // self.world_size
        return slice_batch(batch, self.rank * rows, (self.rank + 1) * rows, batch_size)

    def no_sync(self, step: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation
        (DeepSpeed accumulates by itself)."""
        if isinstance(step, DistributedDataParallel) and not last_micro_batch:
            return step.no_sync()
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The loss scaler for fp16 (bf16 and fp32 need none). One per run: its scale, calibrated
        by skipping steps whose gradients overflow, carries over from task to task (a resumed run
        calibrates it again)."""
        if self.precision != "fp16":
            return None
        if self._scaler is None:
            self._scaler = torch.amp.GradScaler(torch.device(self.device).type)
        return self._scaler

    def fork_rng(self, seed: int) -> Any:
        """Distributed: seed this rank's own random stream (different dropout masks on different
        ranks) and return the shared state to :meth:`join_rng` after training, so that what runs
        next (e.g. re-initialising adapters at the task's end) draws the same numbers on every rank."""
        if not self.distributed:
            return None
        cuda = self.device.startswith("cuda")
        shared = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None)
        torch.manual_seed(seed + 7_919 * self.rank)
        return shared

    def join_rng(self, shared: Any) -> None:
        if shared is None:
            return
        torch.set_rng_state(shared[0])
        if shared[1] is not None:
            torch.cuda.set_rng_state(shared[1], self.device)

    def backward(self, loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
        """Backward of one micro-batch's (already 1/grad_accum-scaled) loss. DeepSpeed: also its
        ``engine.step()``, which steps the optimiser only at the accumulation boundary."""
        if self._engine is not None:
            self._engine.backward(loss, scale_wrt_gas=False)
            self._engine.step()
            return
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                       max_grad_norm: float | None, scaler: torch.amp.GradScaler | None) -> Any:
        """Clip, step and zero the gradients; returns the global gradient norm before clipping, as a
        tensor (no host sync here) or a number (DeepSpeed did all of it in its last ``engine.step()``
        and reports the norm it computed, or None)."""
        if self._engine is not None:
            return self._engine.get_global_grad_norm()  # None when DeepSpeed computed none
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else float("inf"))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def check_replicas(self, model: nn.Module, where: str) -> None:
        """Raise unless every rank holds bit-identical weights, adapters and buffers."""
        if not self.distributed:
            return
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
    def evaluate(self, kind: Any, model: nn.Module, task: Any, xtail: bool = False) -> float:
        """The kind's score of ``task``; distributed: each rank scores a shard, sums are all-reduced."""
        shard = shard_test_set(task, self.rank, self.world_size) if self.distributed else None
        if shard is None:  # one process, or a task layout with no shards: every rank scores it whole
            with self.autocast():
                return float(kind.evaluate(model, task, xtail=xtail))
        n = len(shard.test_labels)
        with self.autocast():
            score = float(kind.evaluate(model, shard, xtail=xtail)) if n else 0.0
        weighted = score * n / 100.0  # percent -> number of correct samples
        if kind.protocol == "mtil":
            weighted = float(round(weighted))  # accuracies: correct counts are integers
        sums = torch.tensor([weighted, float(n)], dtype=torch.float64, device=self.device)
        dist.all_reduce(sums)
        return 100.0 * float(sums[0]) / float(sums[1])


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers models: recompute each block's activations in backward (non-reentrant)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.gradient_checkpointing needs a transformers model that supports it, "
                         f"got {type(model).__name__}")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
