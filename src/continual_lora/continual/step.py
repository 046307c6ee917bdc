"""One training step, in one place: the continual trainer, the small-CLIP pretraining and the
LLaVA-mini projector alignment all run it.

    objective(batch)   = autocast( loss(model, batch) + sum(terms(model, batch).values()) )
                         (continual trainer: the kind's loss, its batch-coupled features gathered
                          over data-parallel ranks, plus the method's weighted loss terms)
    optimizer_step()   = for each of grad_accum micro-batches: forward, backward(total / grad_accum);
                         clip the global gradient norm; AdamW step; zero the gradients
    lr(step)           = lr * warmup_cosine(step): linear warm-up over `warmup` steps, then cosine
                         from lr down to min_lr at the last step (torch's LambdaLR applies it)

How backward and the optimiser step execute (plain, DDP, a DeepSpeed engine, fp16 loss scaling) is
the business of the runtime's :class:`~continual_lora.runtime.Engine`; this module says what a step
computes. :class:`TrainConfig` holds the knobs of a continual task's training.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..contract import Batch
from ..runtime import PRECISIONS, Engine

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """How each task is trained."""

    iterations: int | None = 100  # optimiser steps per task (used when epochs is None)
    epochs: float | None = None  # passes over the task's training set (overrides iterations)
    batch_size: int = 32  # samples per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 2e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_ratio: float = 0.03  # fraction of a task's steps with linear warm-up
    min_lr: float = 1e-6  # cosine schedule floor
    max_grad_norm: float | None = 1.0  # gradient clipping (None: off)
    seed: int = 0  # base seed; each task derives its own from it
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    progress: bool = True  # tqdm bars for training and evaluation
    num_workers: int = 0  # DataLoader worker processes decoding images read from disk (0: in the main process)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast for forward passes (fp16 adds a loss scaler)
    gradient_checkpointing: bool = False  # transformers models: recompute block activations in backward
    dump_replicas: bool = False  # distributed: ranks > 0 also save their method state to <checkpoint>/rank<k>/
    compile: bool = False  # torch.compile each task's training forward (model, loss, method terms); not with DeepSpeed
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"  # torch.compile mode when compile is on (reduce-overhead: CUDA graphs)

    def __post_init__(self) -> None:
        if self.epochs is None and (self.iterations is None or self.iterations <= 0):
            raise ValueError("train.iterations must be a positive integer (or set train.epochs)")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"train.epochs must be a finite number > 0, got {self.epochs}")
        for key in ("batch_size", "grad_accum"):
            if getattr(self, key) <= 0:
                raise ValueError(f"train.{key} must be > 0, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ValueError(f"train.num_workers must be >= 0, got {self.num_workers}")
        # (written as "not (x > 0)" so that NaN fails too)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"train.lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"train.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.min_lr must be in [0, train.lr={self.lr}], got {self.min_lr}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"train.max_grad_norm must be a finite number > 0 or null (no clipping), "
                             f"got {self.max_grad_norm}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"train.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        try:
            kind = torch.device(self.device).type
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"train.device {self.device!r} is not a device: use cpu, cuda or cuda:<index>") from err
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"train.device {self.device!r}: the trainer runs on cpu or cuda (cuda:<index>)")

    def steps_for(self, num_train: int) -> int:
        """Optimiser steps for a task of ``num_train`` samples."""
        if self.epochs is None:
            return int(self.iterations)  # type: ignore[arg-type]
        return max(1, math.ceil(self.epochs * num_train / (self.batch_size * self.grad_accum)))


class Objective(nn.Module):
    """``forward(batch) -> (total loss, loss terms)``: one module, so that DDP and DeepSpeed see the
    whole graph of a step (the model is a submodule).

    Mixed precision is entered HERE, inside the forward: DeepSpeed's engine runs its module inside
    ``torch.autocast(enabled=False)`` when it finds CUDA autocast already on and its config has no
    ``torch_autocast`` section, so an autocast around the engine call would be switched off.

    ``compile_mode``: run the forward through ``torch.compile(mode=compile_mode)`` (``train.compile``).
    Each task builds a new objective (new trainable parameters, new guards), so the graphs compiled
    for earlier objectives are dropped first: they would never match again and would count towards
    dynamo's recompile limit.
    """

    def __init__(self, model: nn.Module, loss: Callable[[nn.Module, Batch], torch.Tensor],
                 terms: Callable[[nn.Module, Batch], dict[str, torch.Tensor]] | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 compile_mode: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.terms = terms
        self.autocast = autocast
        self.run: Callable[[Objective, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]] = _objective_forward
        if compile_mode is not None:
            torch._dynamo.reset_code(_objective_forward.__code__)
            self.run = torch.compile(_objective_forward, mode=compile_mode)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.run(self, batch)


def _objective_forward(objective: Objective, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with objective.autocast():
        loss = objective.loss(objective.model, batch)
        terms = objective.terms(objective.model, batch) if objective.terms is not None else {}
    total = loss + sum(terms.values()) if terms else loss
    return total, terms


def warmup_cosine(steps: int, warmup: int, lr: float, min_lr: float = 0.0) -> Callable[[int], float]:
    """The learning-rate multiplier of step ``step`` (0-based) for ``torch.optim.lr_scheduler.LambdaLR``:
    ``(step + 1) / warmup`` during the warm-up, then a cosine from 1 down to ``min_lr / lr``."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr

    return multiplier


def adamw(params: Iterable[Any], lr: float, weight_decay: float, steps: int, warmup: int,
          min_lr: float = 0.0) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` (parameters or parameter groups) and its :func:`warmup_cosine` schedule."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup, lr, min_lr))


@dataclass
class StepResult:
    total: torch.Tensor  # the last micro-batch's total loss (graph attached)
    terms: dict[str, torch.Tensor]  # its loss terms
    grad_norm: Any  # global gradient norm before clipping (a tensor, a number, or None under DeepSpeed)


def optimizer_step(engine: Engine, next_batch: Callable[[], Batch], params: list[nn.Parameter],
                   grad_accum: int = 1, max_grad_norm: float | None = None) -> StepResult:
    """One optimiser step over ``grad_accum`` micro-batches drawn from ``next_batch``."""
    for micro in range(grad_accum):
        batch = next_batch()
        with engine.no_sync(last_micro_batch=micro == grad_accum - 1):
            total, terms = engine(batch)
            engine.backward(total / grad_accum)
    return StepResult(total, terms, engine.step(params, max_grad_norm))
