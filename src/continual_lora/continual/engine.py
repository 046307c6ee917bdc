"""The continual trainer: train a method through a task stream, evaluate every task after every task.

Model-agnostic. What a task *is* (images + class names for CLIP, conversations for a
LLaVA-style model) is the business of a :class:`TaskKind`; what the adapters do is the
business of a :class:`~continual_lora.methods.Method`. The trainer only knows the schedule::

    R0      = evaluate all tasks with the base model                (zero-shot row)
    for j, task in enumerate(tasks):
        method.begin_task; AdamW + warmup/cosine on method.trainable_parameters
        loss = kind.loss(model, batch) + sum(method.loss_terms(model, batch).values())
        method.end_task
        R[j] = evaluate all tasks (trained and future)               (row j of the matrix)
               (a kind with ``evaluate_future = False``: tasks 0..j; later entries repeat R0)
        checkpoint (method state + rows so far), atomically

Determinism: every task starts from ``seed`` mixed with the task index, so a run resumed at
a task boundary replays exactly the same batches, dropout masks and initialisations.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..methods import Method
from .distributed import PRECISIONS, Runtime, enable_gradient_checkpointing


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
    precision: str = "fp32"  # "fp32", "bf16" or "fp16": autocast for forward passes (fp16 adds a loss scaler)
    gradient_checkpointing: bool = False  # transformers models: recompute block activations in backward
    dump_replicas: bool = False  # distributed: ranks > 0 also save their method state to <checkpoint>/rank<k>/

    def __post_init__(self) -> None:
        if self.epochs is None and (self.iterations is None or self.iterations <= 0):
            raise ValueError("train.iterations must be a positive integer (or set train.epochs)")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"train.epochs must be > 0, got {self.epochs}")
        for key in ("batch_size", "grad_accum"):
            if getattr(self, key) <= 0:
                raise ValueError(f"train.{key} must be > 0, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")

    def steps_for(self, num_train: int) -> int:
        if self.epochs is None:
            return int(self.iterations)  # type: ignore[arg-type]
        return max(1, math.ceil(self.epochs * num_train / (self.batch_size * self.grad_accum)))


class TaskKind(Protocol):
    """What the trainer needs from a kind of task (CLIP classification, instruction tuning)."""

    protocol: str  # metric family: "mtil" or "cvit"

    def num_train(self, task: Any) -> int: ...

    def train_batch(self, task: Any, indices: torch.Tensor, generator: torch.Generator) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, task: Any, xtail: bool = False) -> float: ...  # percent

    # optional: ``extra_state() -> dict`` / ``load_extra_state(dict)``, a JSON-able record the
    # checkpoint keeps for the kind (the instruction kind's evaluation log)


def task_name(task: Any) -> str:
    return task.name


@dataclass
class TaskContext:
    """What the trainer hands a method at each task start (``method.set_context``).

    Methods that need data beyond the current batch use it: EWC's Fisher, replay buffers,
    distillation on reference data, joint training over every task.
    """

    task: Any  # the current task object
    index: int  # its position in the stream
    tasks: list[Any]  # the whole stream, in training order
    kind: TaskKind  # how batches are built and losses computed
    generator: torch.Generator  # seeded per task; use it for any sampling
    train: TrainConfig | None = None  # the trainer's budget and batch size (e.g. joint training's total steps)

    def sample(self, task: Any, batch_size: int) -> Any:
        """A random training batch of ``task`` (any task of the stream)."""
        idx = torch.randint(self.kind.num_train(task), (batch_size,), generator=self.generator)
        return self.kind.train_batch(task, idx, self.generator)


@dataclass
class RunState:
    """Everything a run has produced so far; enough to resume at a task boundary."""

    tasks: list[str]
    zero_shot: list[float] = field(default_factory=list)
    matrix: list[list[float]] = field(default_factory=list)  # row j = after task j
    xtail_zero_shot: list[float] = field(default_factory=list)
    xtail_matrix: list[list[float]] = field(default_factory=list)
    task_seconds: list[float] = field(default_factory=list)
    train_losses: list[float | None] = field(default_factory=list)  # mean loss of each task's last 10 % of steps
    grad_norms: list[float | None] = field(default_factory=list)  # mean pre-clip gradient norm, same steps
    trainable_params: list[int] = field(default_factory=list)  # parameters trained on each task
    elapsed_s: float = 0.0
    method_state: dict[str, Any] = field(default_factory=dict)
    kind_state: dict[str, Any] = field(default_factory=dict)  # a kind's own record (instruction tuning: MIF log)

    @property
    def completed(self) -> int:
        return len(self.matrix)

    @property
    def finished(self) -> bool:
        return self.completed == len(self.tasks)


def _index_stream(n: int, batch_size: int, generator: torch.Generator):
    """Consecutive seeded permutations of range(n), cut into batches (no sample repeats within a pass)."""
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while buf.numel() < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=generator)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def _lr_lambda(steps: int, warmup: int, lr: float, min_lr: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr

    return f


class ContinualTrainer:
    """Runs ``method`` on ``model`` through ``tasks``; see the module docstring."""

    CHECKPOINT = "checkpoint"

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        kind: TaskKind,
        tasks: Sequence[Any],
        config: TrainConfig,
        checkpoint_dir: str | os.PathLike | None = None,
        xtail: bool = False,
        on_task_end: Any = None,
        runtime: Runtime | None = None,
    ) -> None:
        # one process, or one rank of a torchrun / accelerate launch (see .distributed)
        self.runtime = runtime if runtime is not None else Runtime.for_training(config)
        self.runtime.check_batch_size(config.batch_size)
        self.model = model.to(self.runtime.device)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.method = method
        self.kind = kind
        self.tasks = list(tasks)
        self.config = config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.xtail = xtail
        self.on_task_end = on_task_end  # callback(state) after each task's checkpoint

    # --- evaluation ---------------------------------------------------------------------
    def evaluate_all(self, xtail: bool = False, label: str = "eval", base: bool = False, upto: int | None = None,
                     fill: Sequence[float] = ()) -> list[float]:
        """Score every task; ``base`` = the model before the method's adapters exist.

        ``upto``: score tasks 0..upto only; each later task's entry is copied from ``fill``.
        """
        scores = []
        bar = tqdm(self.tasks, desc=label, leave=False, disable=not (self.config.progress and self.runtime.is_main))
        for i, task in enumerate(bar):
            if upto is not None and i > upto:
                scores.append(float(fill[i]))
                continue
            select = contextlib.nullcontext() if base else self.method.evaluating(
                self.model, None if xtail else task_name(task))
            with select:
                scores.append(self.runtime.evaluate(self.kind, self.model, task, xtail=xtail))
            bar.set_postfix(task=task_name(task), acc=f"{scores[-1]:.1f}")
        return scores

    # --- training -----------------------------------------------------------------------
    def train_task(self, task: Any, index: int) -> tuple[float | None, float | None, int]:
        """Train one task; returns (mean loss and mean pre-clip gradient norm over the last 10 % of
        steps, trainable parameters)."""
        cfg = self.config
        seed = cfg.seed * 100_003 + 1_000 * (index + 1)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        self.method.set_context(TaskContext(task, index, self.tasks, self.kind, generator, train=cfg))
        self.method.begin_task(self.model, task_name(task), index)
        params = self.method.trainable_parameters(self.model)
        steps = self.method.train_steps(index, cfg.steps_for(self.kind.num_train(task)))
        if steps > 0 and not params:
            raise RuntimeError(f"{self.method.name}: no trainable parameters for task {task_name(task)!r}")
        warmup = int(cfg.warmup_ratio * steps)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if steps else None
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps, warmup, cfg.lr, cfg.min_lr)) \
            if optimizer is not None else None
        stream = _index_stream(self.kind.num_train(task), cfg.batch_size, generator)
        runtime = self.runtime
        trainable = sum(p.numel() for p in params)  # (ZeRO-3 swaps these parameter objects when training ends)
        # DDP-wrapped / a DeepSpeed engine per task when distributed
        train_step, optimizer = runtime.prepare(self.model, self.method, self.kind, optimizer)
        scaler = runtime.grad_scaler()
        shared_rng = runtime.fork_rng(seed)  # distributed: per-rank dropout masks while training
        self.model.train()
        tail_losses: list[float] = []
        tail_norms: list[float] = []
        bar = tqdm(range(steps), desc=f"train {task_name(task)} [{index + 1}/{len(self.tasks)}]",
                   disable=not (cfg.progress and runtime.is_main), leave=False)
        for step in bar:
            for micro in range(cfg.grad_accum):
                batch = runtime.local_batch(self.kind.train_batch(task, next(stream), generator), cfg.batch_size)
                with runtime.no_sync(train_step, last_micro_batch=micro == cfg.grad_accum - 1):
                    total, terms = train_step(batch)  # kind loss + method loss terms, autocast inside
                    runtime.backward(total / cfg.grad_accum, scaler)
            norm = runtime.optimizer_step(optimizer, params, cfg.max_grad_norm, scaler)
            schedule.step()
            self.method.after_step(self.model)
            value = float(total.detach())
            if step >= steps - max(1, steps // 10):
                tail_losses.append(value)
                if norm is not None and math.isfinite(float(norm)):  # (fp16: overflow steps are skipped)
                    tail_norms.append(float(norm))
            bar.set_postfix(loss=f"{value:.3f}", **{k: f"{float(v.detach()):.3g}" for k, v in terms.items()})
        # drop DDP's gradient hooks / every reference to the engine and its parameters (the last loss's
        # graph holds the parameters) before the next task re-wraps the model
        del train_step, optimizer, schedule, params
        total = terms = None
        runtime.finish()  # DeepSpeed: ZeRO-3 parameters whole again, the engine's hooks removed
        runtime.join_rng(shared_rng)
        self.model.eval()
        self.method.end_task(self.model, task_name(task), index)
        runtime.check_replicas(self.model, f"after task {task_name(task)!r}")
        mean_loss = sum(tail_losses) / len(tail_losses) if tail_losses else None
        mean_norm = sum(tail_norms) / len(tail_norms) if tail_norms else None
        return mean_loss, mean_norm, trainable

    # --- the schedule -------------------------------------------------------------------
    def run(self, resume: bool = False) -> RunState:
        state = self._load_checkpoint() if resume else None
        if state is None:
            state = RunState(tasks=[task_name(t) for t in self.tasks])
            self.model.eval()
            state.zero_shot = self.evaluate_all(label="zero-shot", base=True)
            if self.xtail:
                state.xtail_zero_shot = self.evaluate_all(xtail=True, label="zero-shot x-tail", base=True)
            torch.manual_seed(self.config.seed * 100_003)  # adapter initialisation depends on the seed only
            self.method.attach(self.model)
            self.model.to(self.runtime.device)
        resumed_at = self.runtime.all_gather_object(state.completed)
        if len(set(resumed_at)) > 1:
            raise RuntimeError(f"ranks resumed at different task boundaries {resumed_at}: do they share the run directory?")
        for index in range(state.completed, len(self.tasks)):
            task = self.tasks[index]
            start = time.perf_counter()
            loss, norm, trainable = self.train_task(task, index)
            state.train_losses.append(loss)
            state.grad_norms.append(norm)
            state.trainable_params.append(trainable)
            future = getattr(self.kind, "evaluate_future", True)  # False (CVIT): tasks 0..index, the rest = zero-shot
            state.matrix.append(self.evaluate_all(label=f"eval after {task_name(task)}",
                                                  upto=None if future else index, fill=state.zero_shot))
            if self.xtail:
                state.xtail_matrix.append(self.evaluate_all(xtail=True, label="eval x-tail"))
            seconds = time.perf_counter() - start
            state.task_seconds.append(seconds)
            state.elapsed_s += seconds
            self._save_checkpoint(state)
            self.runtime.barrier()  # the checkpoint is complete before any rank moves on
            if self.on_task_end is not None:
                self.on_task_end(state)
        return state

    # --- checkpoints --------------------------------------------------------------------
    def _save_checkpoint(self, state: RunState) -> None:
        """Write ``<dir>/checkpoint`` as a whole: build it beside, then swap it in by rename."""
        if self.checkpoint_dir is None:
            return
        if not self.runtime.is_main:  # rank 0 writes; the others only on request, to compare replicas
            if self.config.dump_replicas:
                self.method.save(self.model, str(self.checkpoint_dir / f"rank{self.runtime.rank}" / "method"))
            return
        state.method_state = self.method.extra_state()
        state.kind_state = self.kind.extra_state() if hasattr(self.kind, "extra_state") else {}
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoint_dir / self.CHECKPOINT
        tmp = self.checkpoint_dir / f".{self.CHECKPOINT}.tmp"
        old = self.checkpoint_dir / f".{self.CHECKPOINT}.old"
        for stale in (tmp, old):
            shutil.rmtree(stale, ignore_errors=True)
        self.method.save(self.model, str(tmp / "method"))
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1))
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self) -> RunState | None:
        if self.checkpoint_dir is None:
            raise ValueError("resume needs a checkpoint directory")
        final = self.checkpoint_dir / self.CHECKPOINT
        if not (final / "state.json").exists():
            old = self.checkpoint_dir / f".{self.CHECKPOINT}.old"  # crash between the two renames
            if not (old / "state.json").exists():
                return None
            os.replace(old, final)
        state = RunState(**json.loads((final / "state.json").read_text()))
        state.grad_norms += [None] * (len(state.train_losses) - len(state.grad_norms))  # older checkpoints
        names = [task_name(t) for t in self.tasks]
        if state.tasks != names:
            raise ValueError(f"checkpoint tasks {state.tasks} differ from this run's tasks {names}")
        self.method.attach(self.model)
        self.method.load(self.model, str(final / "method"))
        self.method.load_extra_state(state.method_state)
        if hasattr(self.kind, "load_extra_state"):
            self.kind.load_extra_state(state.kind_state)
        self.model.to(self.runtime.device).eval()
        return state
