"""The continual trainer: train a method through a task stream, evaluate every task after every task.

Model-agnostic. What a task *is* (images + class names for CLIP, conversations for a
LLaVA-style model) is the business of a :class:`~continual_lora.contract.TaskKind`; what the
adapters do is the business of a :class:`~continual_lora.methods.Method`; how one optimiser step
is computed is ``step.py``; where it runs (one process, DDP, ZeRO) is the runtime's. The trainer
only knows the schedule::

    R0      = evaluate all tasks with the base model                (zero-shot row)
    for j, task in enumerate(tasks):
        method.begin_task; AdamW + warmup/cosine on method.trainable_parameters
        loss = kind.loss(model, batch) + sum(method.loss_terms(model, batch, context).values())
        method.end_task
        R[j] = evaluate all tasks (trained and future)               (row j of the matrix)
               (a kind with ``evaluate_future = False``: tasks 0..j; later entries repeat R0)
        checkpoint (method state + rows so far), atomically

Determinism: every task starts from ``seed`` mixed with the task index, so a run resumed at
a task boundary replays exactly the same batches, dropout masks and initialisations.

Callbacks (the application's logging; the trainer knows no tracker): ``on_start(RunState)`` once the
zero-shot row is known or a checkpoint is loaded (``state.completed`` tasks done), ``on_step(StepLog)``
after every optimiser step, ``on_task_end(RunState)`` after each task's checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import branches
from ..contract import TaskContext, TaskKind
from ..config import describe_changes, diff_keys
from ..errors import CheckpointError, DivergenceError, UserError
from ..methods import Method
from ..methods.task_router import task_id_accuracy
from ..runtime import Runtime, enable_gradient_checkpointing, runtime_from_env
from .checkpoint import CHECKPOINT, RunState, method_dir, read_checkpoint, write_checkpoint
from .step import Objective, TrainConfig, adamw, optimizer_step


FP16_SKIP_LIMIT = 20  # fp16: consecutive non-finite losses (steps the loss scaler skips) before a run diverged


def _non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """None if every floating-point tensor is finite, else what is not."""
    bad = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    return f"{len(bad)} tensors are not finite, e.g. {bad[:3]}" if bad else None


@dataclass(frozen=True)
class StepLog:
    """One optimiser step, as ``on_step`` receives it (the last micro-batch's losses when grad_accum > 1)."""

    task: str  # the task being trained
    task_index: int  # its index in the stream
    step: int  # optimiser step within the task, 1-based
    global_step: int  # optimiser steps since the run began, over all tasks, 1-based
    loss: float  # the total loss: the kind's task loss plus every method term
    task_loss: float  # the kind's loss alone (loss - sum(terms))
    terms: dict[str, float]  # each method loss term, weighted as the trainer adds it
    lr: float  # learning rate of this step (first parameter group)
    grad_norm: float | None  # global gradient norm before clipping (None: not reported, e.g. DeepSpeed)


def runtime_for(train: TrainConfig) -> Runtime:
    """The runtime of this process for a run trained with ``train`` (device, precision, batch, clipping)."""
    return runtime_from_env(train.device, train.precision, batch_size=train.batch_size, grad_accum=train.grad_accum,
                            max_grad_norm=train.max_grad_norm)


class ContinualTrainer:
    """Runs ``method`` on ``model`` through ``tasks``; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        kind: TaskKind,
        tasks: Sequence[Any],
        config: TrainConfig,
        checkpoint_dir: str | os.PathLike | None = None,
        xtail: bool = False,
        on_task_end: Callable[[RunState], None] | None = None,
        runtime: Runtime | None = None,
        record: dict[str, Any] | None = None,
        allow_changes: Sequence[str] = (),
        log: Callable[[str], None] | None = None,
        on_step: Callable[[StepLog], None] | None = None,
        on_start: Callable[[RunState], None] | None = None,
    ) -> None:
        """``record``: the run's effective config as plain data, kept in the checkpoint; a resumed run
        whose record differs is refused, except in the dotted keys of ``allow_changes`` (a key names
        its whole subtree). ``log``: where resume messages go (None: nowhere)."""
        if not isinstance(kind, TaskKind):  # (before 0.2.0 a kind was any object with the protocol's methods)
            raise TypeError(f"the task kind must subclass continual_lora.contract.TaskKind (its loss now takes a "
                            f"gather: loss(model, batch, gather)), got {type(kind).__name__}")
        # one process, or one rank of a torchrun / accelerate launch (see continual_lora.runtime)
        self.runtime = runtime if runtime is not None else runtime_for(config)
        self.runtime.check_batch_size(config.batch_size)
        if config.compile and self.runtime.deepspeed is not None:
            raise ValueError("train.compile is not supported under DeepSpeed (its engine wraps the step); "
                             "use DDP or one process, or set train.compile=false")
        self.model = model.to(self.runtime.device)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        if method.routing_mode not in ("none", "oracle") and method.routing_mode not in kind.routing_modes:
            raise UserError(f"{method.name}: task_router {method.routing_mode!r} is not available for "
                            f"{type(kind).__name__} (it supports: {list(kind.routing_modes) or 'none'})")
        self.method = method
        self.kind = kind
        self.routed_accuracy: dict[str, float] = {}  # task-id accuracy of the latest evaluate_all (a router's)
        self.tasks = list(tasks)
        self.config = config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.xtail = xtail
        self.on_task_end = on_task_end  # callback(state) after each task's checkpoint
        self.record = json.loads(json.dumps(record or {}))  # as the checkpoint will hold it
        self.allow_changes = tuple(allow_changes)
        self.log = log or (lambda message: None)
        self.on_step = on_step  # callback(StepLog) after each optimiser step
        self.on_start = on_start  # callback(state) before the first task this process trains

    # --- evaluation ---------------------------------------------------------------------
    def evaluate_all(self, xtail: bool = False, label: str = "eval", base: bool = False, upto: int | None = None,
                     fill: Sequence[float] = ()) -> list[float]:
        """Score every task; ``base`` = the model before the method's adapters exist.

        ``upto``: score tasks 0..upto only; each later task's entry is copied from ``fill``.
        """
        scores = []
        routed: dict[str, list[int]] = {}  # a task router's [routed right, samples] per task
        bar = tqdm(self.tasks, desc=label, leave=False, disable=not (self.config.progress and self.runtime.is_main))
        for i, task in enumerate(bar):
            if upto is not None and i > upto:
                scores.append(float(fill[i]))
                continue
            # X-TAIL gives no task id, except to `task_router: oracle` (the bound a router could reach)
            oracle = self.method.routing_mode == "oracle"
            select = contextlib.nullcontext() if base else self.method.evaluating(
                self.model, None if xtail and not oracle else task.name)
            with select as routing:
                scores.append(self.runtime.evaluate(self.kind, self.model, task, xtail=xtail, routing=routing))
            if routing is not None:
                routed[task.name] = routing.counts.pop(task.name, [0, 0])
            bar.set_postfix(task=task.name, acc=f"{scores[-1]:.1f}")
        self.routed_accuracy = task_id_accuracy(self.runtime.all_gather_object(routed)) if routed else {}
        return scores

    # --- training -----------------------------------------------------------------------
    def train_task(self, task: Any, index: int, steps_before: int = 0) -> tuple[float | None, float | None, int, int]:
        """Train one task; returns (mean loss and mean pre-clip gradient norm over the last 10 % of
        steps, trainable parameters, optimiser steps). ``steps_before``: optimiser steps of the tasks before."""
        cfg, kind, runtime = self.config, self.kind, self.runtime
        seed = cfg.seed * 100_003 + 1_000 * (index + 1)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        context = TaskContext(task, index, self.tasks, kind, generator, batch_size=cfg.batch_size,
                              task_steps=tuple(cfg.steps_for(kind.num_train(t)) for t in self.tasks),
                              gather=runtime.gather, autocast=runtime.autocast)
        self.method.begin_task(self.model, task.name, index, context)
        params = self.method.trainable_parameters(self.model)
        steps = self.method.train_steps(index, cfg.steps_for(kind.num_train(task)), context)
        if steps > 0 and not params:
            raise RuntimeError(f"{self.method.name}: no trainable parameters for task {task.name!r}")
        optimizer, schedule = (adamw(params, cfg.lr, cfg.weight_decay, steps, int(cfg.warmup_ratio * steps),
                                     cfg.min_lr) if steps else (None, None))
        batches = kind.batches(task, cfg.batch_size, generator, runtime.local_rows(cfg.batch_size))
        trainable = sum(p.numel() for p in params)  # (ZeRO-3 swaps these parameter objects when training ends)
        objective = Objective(self.model, loss=lambda model, batch: kind.loss(model, batch, runtime.gather),
                              terms=lambda model, batch: self.method.loss_terms(model, batch, context),
                              autocast=runtime.autocast, compile_mode=cfg.compile_mode if cfg.compile else None)
        engine = runtime.engine(objective, optimizer)  # DDP-wrapped / a DeepSpeed engine when distributed

        def next_batch() -> Any:
            return next(batches)

        tail_losses: list[float] = []
        tail_norms: list[float] = []
        skipped = 0  # consecutive non-finite losses (fp16: the loss scaler skips such steps)
        diverged: str | None = None
        with runtime.task_rng(seed):  # distributed: per-rank dropout masks while training
            self.model.train()
            bar = tqdm(range(steps), desc=f"train {task.name} [{index + 1}/{len(self.tasks)}]",
                       disable=not (cfg.progress and runtime.is_main), leave=False)
            for step in bar:
                out = optimizer_step(engine, next_batch, params, cfg.grad_accum, cfg.max_grad_norm)
                lr = float(optimizer.param_groups[0]["lr"])  # the rate this step used (the schedule moves it next)
                schedule.step()
                self.method.after_step(self.model)
                value = float(out.total.detach())  # the same global loss on every rank
                skipped = 0 if math.isfinite(value) else skipped + 1
                if skipped > (FP16_SKIP_LIMIT if cfg.precision == "fp16" else 0):
                    diverged = f"at step {step + 1}/{steps} the loss is {value}"
                    break
                terms = {k: float(v.detach()) for k, v in out.terms.items()}
                norm = None if out.grad_norm is None else float(out.grad_norm)
                if step >= steps - max(1, steps // 10):
                    tail_losses.append(value)
                    if norm is not None and math.isfinite(norm):  # (fp16: overflow steps are skipped)
                        tail_norms.append(norm)
                bar.set_postfix(loss=f"{value:.3f}", **{k: f"{v:.3g}" for k, v in terms.items()})
                if self.on_step is not None:
                    self.on_step(StepLog(task.name, index, step + 1, steps_before + step + 1, value,
                                         value - sum(terms.values()), terms, lr, norm))
            batches.close()  # (a kind reading from disk: its DataLoader workers stop)
            # drop every reference to the parameters (the optimiser, its schedule, the last loss's graph)
            # before the engine goes: DDP's gradient hooks, ZeRO-3's partitioned parameters
            del optimizer, schedule, params
            out = None
            engine.close()  # DeepSpeed: ZeRO-3 parameters whole again, the engine's hooks removed
        diverged = diverged or _non_finite((n, p) for n, p in self.model.named_parameters() if p.requires_grad)
        if diverged is not None:
            raise self._divergence(task, index, diverged)
        self.model.eval()
        self.method.end_task(self.model, task.name, index, context)
        diverged = _non_finite((f"{n}.{k}", v) for n, b in branches(self.model).items() for k, v in b.state_dict().items())
        if diverged is not None:  # e.g. a merge or a Fisher estimate of non-finite values at the task's end
            raise self._divergence(task, index, f"after {self.method.name}'s end of task {diverged}")
        runtime.check_replicas(self.model, f"after task {task.name!r}")
        mean_loss = sum(tail_losses) / len(tail_losses) if tail_losses else None
        mean_norm = sum(tail_norms) / len(tail_norms) if tail_norms else None
        return mean_loss, mean_norm, trainable, steps

    def _divergence(self, task: Any, index: int, what: str) -> DivergenceError:
        kept = (f"the checkpoint after task {index} ({self.tasks[index - 1].name!r}) is kept" if index
                else "no checkpoint was written")
        where = f" in {self.checkpoint_dir}" if self.checkpoint_dir is not None and index else ""
        resume = " (or continue from it: --resume --allow-change train.lr)" if index else ""
        return DivergenceError(f"training diverged on task {task.name!r} ({index + 1}/{len(self.tasks)}): {what}; "
                               f"nothing of this task was saved and {kept}{where}. Lower train.lr (now "
                               f"{self.config.lr:g}) or check the method's settings, then run again{resume}")

    # --- the schedule -------------------------------------------------------------------
    def run(self, resume: bool = False) -> RunState:
        state = self._load_checkpoint() if resume else None
        if state is None:
            state = RunState(tasks=[t.name for t in self.tasks], config=self.record)
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
        if self.on_start is not None:
            self.on_start(state)
        for index in range(state.completed, len(self.tasks)):
            task = self.tasks[index]
            start = time.perf_counter()
            loss, norm, trainable, steps = self.train_task(task, index, sum(state.task_steps))
            state.train_losses.append(loss)
            state.grad_norms.append(norm)
            state.trainable_params.append(trainable)
            state.task_steps.append(steps)
            future = self.kind.evaluate_future  # False (CVIT): tasks 0..index, the rest = zero-shot
            state.matrix.append(self.evaluate_all(label=f"eval after {task.name}",
                                                  upto=None if future else index, fill=state.zero_shot))
            state.task_id_accuracy = self.routed_accuracy
            if self.xtail:
                state.xtail_matrix.append(self.evaluate_all(xtail=True, label="eval x-tail"))
                state.xtail_task_id_accuracy = self.routed_accuracy
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
        if self.checkpoint_dir is None:
            return
        if not self.runtime.is_main:  # rank 0 writes; the others only on request, to compare replicas
            if self.config.dump_replicas:
                self.method.save(self.model, str(self.checkpoint_dir / f"rank{self.runtime.rank}" / "method"))
            return
        state.method_state = self.method.extra_state()
        state.kind_state = self.kind.extra_state()
        write_checkpoint(self.checkpoint_dir, state, lambda folder: self.method.save(self.model, folder))

    def _load_checkpoint(self) -> RunState | None:
        if self.checkpoint_dir is None:
            raise ValueError("resume needs a checkpoint directory")
        state = read_checkpoint(self.checkpoint_dir)
        if state is None:
            self.log(f"--resume: no checkpoint in {self.checkpoint_dir}; starting from the first task")
            return None
        names = [t.name for t in self.tasks]
        if state.tasks != names:
            raise CheckpointError(f"{self.checkpoint_dir / CHECKPOINT} holds tasks {state.tasks}, this run has "
                                  f"{names}: resume with the config that started it, or pass --overwrite")
        changed = [k for k in diff_keys(state.config, self.record)
                   if not any(k == a or k.startswith(a + ".") for a in self.allow_changes)] if state.config else []
        if changed:
            raise CheckpointError(f"{self.checkpoint_dir / CHECKPOINT} was written with another config: "
                                  f"{describe_changes(state.config, self.record, changed)}; resume with the same "
                                  "config, accept a change with --allow-change KEY, or start over with --overwrite")
        self.method.attach(self.model)
        try:
            self.method.load(self.model, str(method_dir(self.checkpoint_dir)))
        except UserError as err:
            raise CheckpointError(f"{err} (checkpoint of {self.checkpoint_dir}; --overwrite starts over)") from None
        self.log(f"resuming at task {state.completed + 1}/{len(self.tasks)}" if not state.finished
                 else f"all {len(self.tasks)} tasks were already trained")
        self.method.load_extra_state(state.method_state)
        self.kind.load_extra_state(state.kind_state)
        self.model.to(self.runtime.device).eval()
        return state
