"""What a continual-learning method is to the trainer: adapters plus a few hooks.

The trainer calls, in order (``context`` is the :class:`~continual_lora.contract.TaskContext` of the
task being trained; hooks that need no data beyond the batch ignore it)::

    method.attach(model)                                   once, before the first task
    for index, task in enumerate(tasks):
        method.begin_task(model, task, index, context)     new per-task state, freezing
        steps = method.train_steps(index, default, context)
        for batch in task:
            loss = task_loss + sum(method.loss_terms(model, batch, context).values())
            ... backward, step ...
            method.after_step(model)
        method.end_task(model, task, index, context)       merging, snapshots, records, router statistics
    with method.evaluating(model, task) as routing: ...    how to evaluate any task (seen or not; routing:
                                                           a task router's per-sample choice, or None)

A method never reaches into the trainer: it returns loss terms (already weighted) and the
trainer adds them. All state that must survive a restart lives in the model's branches
(``nn.ParameterDict`` / buffers keyed by task) or in :meth:`extra_state`. The hooks can also be
called by hand without a trainer (``context=None``); a method that needs the context then says so.

Registering: ``@register_method`` on the method class enters it in :data:`METHODS` and its own
config class in the adapter core's registry under the same name (so a saved adapter rebuilds
from its ``adapter_config.json``); the name is written once, as ``Method.name``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..adapters import (
    AdapterBranch,
    AdapterConfig,
    add_task,
    disable_adapters,
    inject_adapters,
    load_adapter,
    merge,
    read_adapter_config,
    register_adapter,
    save_adapter,
    use_task,
)
from ..adapters.inject import branches
from ..contract import Routing, TaskContext
from ..errors import CheckpointError
from .task_router import ROUTED, ROUTER_FILE, MethodRouting, PrototypeRouter


class Method:
    """Base class; subclasses set ``name`` and ``config_cls`` and override what they need."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[AdapterConfig]] = AdapterConfig
    uses_task_id: ClassVar[bool] = True  # evaluation selects the task's own adapter
    peft_chain: ClassVar[bool] = False  # True: its peft adapters are applied one after another (see peft_adapters)

    def __init__(self, config: AdapterConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise TypeError(f"{self.name} expects a {self.config_cls.__name__}, got {type(self.config).__name__}")
        self.trained_tasks: list[str] = []
        # the task router of a task-id method whose config has one (task_router.py)
        self.routing_mode: str = getattr(self.config, "task_router", "none")
        self.router = (PrototypeRouter(self.config.router_metric, self.config.router_shrinkage)  # type: ignore[attr-defined]
                       if self.routing_mode == "prototype" else None)
        self._routing: tuple[Any, MethodRouting] | None = None

    # --- lifecycle ----------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        inject_adapters(model, self.config)

    def train_steps(self, index: int, default: int, context: TaskContext | None = None) -> int:
        """Optimiser steps for task ``index`` (e.g. 0 for a method that does not train then)."""
        return default

    def begin_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        raise NotImplementedError

    def loss_terms(self, model: nn.Module, batch: Any, context: TaskContext | None = None) -> dict[str, torch.Tensor]:
        return {}

    def after_step(self, model: nn.Module) -> None:
        pass

    def end_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        if self.router is not None:  # the frozen base model's features of the task's training inputs
            ctx = self.need_context(context)
            with disable_adapters(model), ctx.autocast():  # the precision evaluation routes at
                features = ctx.kind.route_features(model, ctx.task, self.config.router_samples)  # type: ignore[attr-defined]
            self.router.observe(task, features)
        self.trained_tasks.append(task)

    def need_context(self, context: TaskContext | None) -> TaskContext:
        """``context``, or an error saying that this method needs the trainer's task context."""
        if context is None:
            raise RuntimeError(f"{self.name} needs the trainer's task context: pass context=TaskContext(...) "
                               "to the hook (the continual trainer does)")
        return context

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    # --- evaluation ---------------------------------------------------------------------
    @contextlib.contextmanager
    def evaluating(self, model: nn.Module, task: str | None) -> Iterator[Routing | None]:
        """Select the adapter to evaluate ``task`` with; yields the routing the kind's evaluation
        must use (None: the model as selected).

        Task-id methods use the task's own adapter; a task not trained yet sees the base
        model (its score is zero-shot transfer). ``task=None`` means no task id is given
        (X-TAIL): a task-id method with a task router (``task_router``) then yields its routing, which
        picks a trained task per sample (with ``route: all`` it does so for every evaluation); one
        without falls back to the most recently trained adapter.
        """
        if not self.uses_task_id:
            yield
            return
        if self.routing_mode in ROUTED and self.trained_tasks and (task is None or self.config.route == "all"):  # type: ignore[attr-defined]
            yield self.routing(model)
            return
        if task is None and self.trained_tasks:
            task = self.trained_tasks[-1]
        if task in self.trained_tasks:
            with use_task(model, task):
                yield
        else:
            with disable_adapters(model):
                yield

    def routing(self, model: nn.Module) -> MethodRouting:
        """The routing over the trained tasks (kept, with the classifiers a kind caches in it, until
        the trained tasks change)."""
        if self.routing_mode not in ROUTED:
            raise ValueError(f"{self.name} has no task router (set task_router: prototype or confidence)")
        key = (id(model), tuple(self.trained_tasks))
        if self._routing is None or self._routing[0] != key:
            self._routing = (key, MethodRouting(model, self.trained_tasks, self.routing_mode, self.router))
        return self._routing[1]

    def prepare_inference(self, model: nn.Module, task: str | None = None) -> nn.Module:
        """The model for zero-overhead serving of ``task``: its update merged into the weights."""
        merge(model, task)
        return model

    def peft_adapters(self, model: nn.Module) -> dict[str, str | None]:
        """The stock peft LoRA adapters that express the trained model: directory name -> the task key
        whose update (``AdapterBranch.lora_factors``) it holds, None for the active one.

        Task-id methods: one adapter per trained task, each alone on the base model is that task's
        model. Other methods: one adapter, ``"final"``, the model that serves every task. With
        ``peft_chain`` (Rank-1 pool) the adapters are instead applied in order, each merged into the
        base before the next, and together give the final model.
        """
        if self.uses_task_id:
            return {task: task for task in self.trained_tasks}
        return {"final": None}

    # --- checkpoints --------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """JSON-able method state beyond the branches' tensors."""
        return {"trained_tasks": list(self.trained_tasks)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.trained_tasks = list(state.get("trained_tasks", []))

    def save(self, model: nn.Module, directory: str) -> None:
        save_adapter(model, directory, extra={"method": self.name, **self.extra_state()})
        if self.router is not None:
            self.router.save(directory, self.router.tasks)

    def load(self, model: nn.Module, directory: str) -> None:
        """Restore into a model built like the original (adapters injected or not)."""
        load_adapter(model, directory)
        self.load_extra_state(read_adapter_config(directory)["extra"])
        if self.router is not None:
            if not (Path(directory) / ROUTER_FILE).exists():
                raise CheckpointError(f"{directory} was saved without a task router; this {self.name} has "
                                 f"task_router: {self.routing_mode}")
            self.router.load(directory)
        self._routing = None

    # --- helpers ------------------------------------------------------------------------
    @staticmethod
    def branches(model: nn.Module) -> dict[str, Any]:
        return branches(model)


B = TypeVar("B", bound=AdapterBranch)


def typed_branches(model: nn.Module, cls: type[B]) -> dict[str, B]:
    """The model's branches of type ``cls`` (an error if there are none: the method is not attached)."""
    found = {name: b for name, b in branches(model).items() if isinstance(b, cls)}
    if not found:
        raise ValueError(f"model has no {cls.__name__} adapters; attach the method (or inject its config) first")
    return found


def open_task(model: nn.Module, found: dict[str, Any], task: str) -> None:
    """Create ``task``'s factors (unless resuming it), select it, and train only its factors.

    ``found`` are branches with per-task factors and ``freeze_task(task, frozen)``.
    """
    if task not in next(iter(found.values())).tasks:  # a resumed task keeps its factors
        add_task(model, task)
    for branch in found.values():
        branch.set_task(task)
        for other in branch.tasks:
            branch.freeze_task(other, frozen=other != task)


METHODS: dict[str, type[Method]] = {}
CONTEXT_HOOKS = ("train_steps", "begin_task", "loss_terms", "end_task")  # hooks the trainer passes the context to


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: ``METHODS[cls.name] = cls``; a config class of the method's own (not a shared
    one such as ``LoRAConfig``) gets ``method = cls.name`` and is registered with the adapter core."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}.name must be set")
    old = [hook for hook in CONTEXT_HOOKS if "context" not in inspect.signature(getattr(cls, hook)).parameters]
    if old:  # hooks written for continual-lora <= 0.1.0, which had set_context instead
        raise TypeError(f"{cls.__name__}: the hooks {old} must accept the task context as an argument "
                        "(e.g. def loss_terms(self, model, batch, context=None)); see docs/architecture.md")
    config = cls.config_cls
    if "method" not in vars(config):  # the method's own config class: it is named after the method
        config.method = cls.name
        register_adapter(config)
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, **config: Any) -> Method:
    """``build_method("lilora", rank=8)``: a method from its registered name and config keys."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    cls = METHODS[name]
    return cls(cls.config_cls(**config))
