"""Where a training step runs: the one-process runtime and the plain engine (the base classes).

Two small objects, one interface, three implementations::

    Runtime       the process topology: rank, collectives, each rank's rows of a batch, the gather
                  of batch-coupled losses, sharded evaluation, per-rank random streams, replica checks
      Runtime         one process: every collective is a no-op                     (this module)
      DataParallel    one process per device under torchrun / accelerate launch    (ddp.py)
    Engine        how one task's training module and optimiser execute: forward, backward, clip + step
      Engine          plain PyTorch (fp16: with a loss scaler)                     (this module)
      DDPEngine       DistributedDataParallel around the module                    (ddp.py)
      DeepSpeedEngine a DeepSpeed ZeRO-1/2/3 engine per task                       (zero.py)

The runtime picks the engine (:meth:`Runtime.engine`): DeepSpeed when accelerate's config asks for
it, DDP on a data-parallel runtime, plain otherwise. What a step computes (autocast, the kind's loss
plus the method's terms, the micro-batch loop, the optimiser and its schedule) is
``continual/step.py``; the launcher environment is ``launch.py``.

In one process every operation here is the plain one the trainer always did, so a single-process run
is bit-identical to code without a runtime.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..contract import Gather, Routing, TaskKind, no_gather

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Engine:
    """A task's training module and optimiser in one process.

    ``module(batch) -> (total loss, loss terms)``; :meth:`backward` per micro-batch (scaled by the
    fp16 loss scaler when there is one), :meth:`step` once per optimiser step (unscale, clip, step,
    zero the gradients); :meth:`close` when the task's training ends.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer | None,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        self.module = module
        self.optimizer = optimizer
        self.scaler = scaler

    def __call__(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.module(batch)

    def no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-batch's forward and backward (DDP skips its all-reduce on all but the last)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's (already 1 / grad_accum-scaled) loss."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, params: list[nn.Parameter], max_grad_norm: float | None) -> Any:
        """Clip, step and zero the gradients; the global gradient norm before clipping, as a tensor
        (no host sync here)."""
        assert self.optimizer is not None, "a task without an optimiser has no step"
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else float("inf"))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def close(self) -> None:
        """End of the task's training: drop the module and the optimiser (a DDP wrapper's gradient hooks
        go with it, before the method's ``end_task`` and the next task's wrapper)."""
        self.module = self.optimizer = None  # type: ignore[assignment]


class Runtime:
    """One process (no launcher): rank 0 of 1, every collective a no-op.

    ``deepspeed``: a DeepSpeed config when ``accelerate launch`` asked for ZeRO with a single
    process (ZeRO-Offload on one device); the engine is then DeepSpeed's, the topology stays this one.
    """

    rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, device: str = "cpu", precision: str = "fp32", deepspeed: dict[str, Any] | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.device, self.precision = device, precision
        self.deepspeed = deepspeed  # DeepSpeed config (ZeRO) from accelerate launch; None: DDP / one process
        self.zero3_layout: dict[str, Any] | None = None  # ZeRO-3: what the last task's engine partitioned
        self._scaler: torch.amp.GradScaler | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        from .zero import zero_stage

        return {"world_size": self.world_size, "rank": self.rank, "device": self.device, "precision": self.precision,
                "backend": dist.get_backend() if dist.is_initialized() else None,
                "engine": "deepspeed" if self.deepspeed is not None else ("ddp" if self.distributed else "single"),
                "zero_stage": zero_stage(self.deepspeed) if self.deepspeed is not None else None,
                **({"zero3_layout": self.zero3_layout} if self.zero3_layout is not None else {})}

    # --- collectives ---------------------------------------------------------------------------
    @property
    def gather(self) -> Gather:
        """Rows of every rank, for losses that couple the samples of a batch (here: the rows themselves)."""
        return no_gather

    def barrier(self) -> None:
        pass

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (filling caches: data, pretrained model), then the others."""
        yield

    def on_main(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Call ``fn`` on rank 0 only; an exception it raises is raised on every rank."""
        fn(*args, **kwargs)

    # --- training ------------------------------------------------------------------------------
    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(f"train.batch_size ({batch_size}) must be divisible by the number of processes "
                             f"({self.world_size}): each rank takes an equal slice of the global batch")

    def local_rows(self, batch_size: int) -> slice | None:
        """This rank's rows of each global batch of ``batch_size`` (None in one process: all of them)."""
        return None

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

    def engine(self, module: nn.Module, optimizer: torch.optim.Optimizer | None) -> Engine:
        """The engine that runs ``module`` (``forward(batch) -> (loss, terms)``) and ``optimizer`` for
        one task: DeepSpeed's under a ZeRO config, else this runtime's own (plain here, DDP when
        data-parallel). Built again for every task, after ``method.begin_task``: the trainable
        parameters change per task and DDP / DeepSpeed register them when they are built."""
        if self.deepspeed is not None and optimizer is not None:
            from .zero import DeepSpeedEngine

            engine = DeepSpeedEngine(module, optimizer, self.deepspeed)
            self.zero3_layout = engine.zero3_layout or self.zero3_layout
            return engine
        return self._engine(module, optimizer)

    def _engine(self, module: nn.Module, optimizer: torch.optim.Optimizer | None) -> Engine:
        return Engine(module, optimizer, self.grad_scaler())

    @contextlib.contextmanager
    def task_rng(self, seed: int) -> Iterator[None]:
        """While a task trains: data-parallel ranks draw their own random streams (dropout masks);
        what runs after the block draws the same numbers on every rank again. Nothing in one process."""
        yield

    def check_replicas(self, model: nn.Module, where: str) -> None:
        """Raise unless every rank holds bit-identical weights, adapters and buffers (one process: nothing)."""

    # --- evaluation ----------------------------------------------------------------------------
    def evaluate(self, kind: TaskKind, model: nn.Module, task: Any, xtail: bool = False,
                 routing: Routing | None = None) -> float:
        """The kind's score of ``task`` (percent), under this runtime's autocast."""
        with self.autocast():
            return float(kind.evaluate(model, task, xtail=xtail, routing=routing))


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
