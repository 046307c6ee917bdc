"""What a continual-learning method is to the trainer: adapters plus a few hooks.

The trainer calls, in order::

    method.attach(model)                              once, before the first task
    for index, task in enumerate(tasks):
        method.begin_task(model, task, index)         new per-task state, freezing
        for batch in task:
            loss = task_loss + sum(method.loss_terms(model, batch).values())
            ... backward, step ...
            method.after_step(model)
        method.end_task(model, task, index)           merging, snapshots, records
    with method.evaluating(model, task): ...          how to evaluate any task (seen or not)

A method never reaches into the trainer: it returns loss terms (already weighted) and the
trainer adds them. All state that must survive a restart lives in the model's branches
(``nn.ParameterDict`` / buffers keyed by task) or in :meth:`extra_state`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
    save_adapter,
    use_task,
)
from ..adapters.inject import branches


class Method:
    """Base class; subclasses set ``name`` and ``config_cls`` and override what they need."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[AdapterConfig]] = AdapterConfig
    uses_task_id: ClassVar[bool] = True  # evaluation selects the task's own adapter

    def __init__(self, config: AdapterConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise TypeError(f"{self.name} expects a {self.config_cls.__name__}, got {type(self.config).__name__}")
        self.trained_tasks: list[str] = []
        self.context: Any = None  # the trainer's TaskContext for the current task (see set_context)

    # --- lifecycle ----------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        inject_adapters(model, self.config)

    def set_context(self, context: Any) -> None:
        """Called before ``begin_task`` with the trainer's per-task context (data access, kind)."""
        self.context = context

    def train_steps(self, index: int, default: int) -> int:
        """Optimiser steps for task ``index`` (e.g. 0 for a method that does not train then)."""
        return default

    def begin_task(self, model: nn.Module, task: str, index: int) -> None:
        raise NotImplementedError

    def loss_terms(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        return {}

    def after_step(self, model: nn.Module) -> None:
        pass

    def end_task(self, model: nn.Module, task: str, index: int) -> None:
        self.trained_tasks.append(task)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    # --- evaluation ---------------------------------------------------------------------
    @contextlib.contextmanager
    def evaluating(self, model: nn.Module, task: str | None) -> Iterator[None]:
        """Select the adapter to evaluate ``task`` with.

        Task-id methods use the task's own adapter; a task not trained yet sees the base
        model (its score is zero-shot transfer). ``task=None`` means no task id is given
        (X-TAIL): task-id methods then fall back to the most recently trained adapter.
        """
        if not self.uses_task_id:
            yield
            return
        if task is None and self.trained_tasks:
            task = self.trained_tasks[-1]
        if task in self.trained_tasks:
            with use_task(model, task):
                yield
        else:
            with disable_adapters(model):
                yield

    def prepare_inference(self, model: nn.Module, task: str | None = None) -> nn.Module:
        """The model for zero-overhead serving of ``task``: its update merged into the weights."""
        merge(model, task)
        return model

    # --- checkpoints --------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """JSON-able method state beyond the branches' tensors."""
        return {"trained_tasks": list(self.trained_tasks)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.trained_tasks = list(state.get("trained_tasks", []))

    def save(self, model: nn.Module, directory: str) -> None:
        save_adapter(model, directory, extra={"method": self.name, **self.extra_state()})

    def load(self, model: nn.Module, directory: str) -> None:
        """Restore into a model built like the original (adapters injected or not)."""
        load_adapter(model, directory)
        self.load_extra_state(read_adapter_config(directory)["extra"])

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


def register_method(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__}.name must be set")
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, **config: Any) -> Method:
    """``build_method("lilora", rank=8)``: a method from its registered name and config keys."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    cls = METHODS[name]
    return cls(cls.config_cls(**config))
