"""Zero-shot: the frozen base model, never trained (the lower reference of every MTIL table).

For every task t and every weight ``W0``::

    y = W0 x + b                         (no adapter, no update, no task id)

``train_steps`` is 0 for every task, so the trainer builds no optimiser; ``attach`` injects
nothing and only freezes the base parameters (the trainer then records 0 trainable parameters).
Every row of the accuracy matrix therefore equals the zero-shot row R0 by construction, which
makes this method the check that evaluation itself is deterministic. With no adapter to save, a
checkpoint is a small JSON file of the method state (``zero_shot.json``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..adapters import AdapterBranch, AdapterConfig, ExportError
from ..contract import TaskContext
from .base import Method, register_method

STATE_NAME = "zero_shot.json"


@dataclass
class ZeroShotConfig(AdapterConfig):
    """No hyper-parameters: ``targets`` / ``exclude`` are accepted (shared run configs) and unused."""


    def build_branch(self, in_features: int, out_features: int) -> AdapterBranch:
        raise ValueError("zero_shot adds no adapters; there is no branch to build")


@register_method
class ZeroShot(Method):
    """The base model for every task: no adapters, no training, no task id."""

    name = "zero_shot"
    config_cls = ZeroShotConfig
    uses_task_id = False

    def attach(self, model: nn.Module) -> None:
        for p in model.parameters():  # nothing trains; the trainer reports 0 trainable parameters
            p.requires_grad_(False)

    def train_steps(self, index: int, default: int, context: TaskContext | None = None) -> int:
        return 0

    def begin_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        pass

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return []

    @contextlib.contextmanager
    def evaluating(self, model: nn.Module, task: str | None) -> Iterator[None]:
        yield  # the plain model; needs no adapters

    def prepare_inference(self, model: nn.Module, task: str | None = None) -> nn.Module:
        return model

    def peft_adapters(self, model: nn.Module) -> dict[str, str | None]:
        raise ExportError("zero_shot trains nothing, so there is no adapter: its model is the base model "
                          "(format hf writes it)")

    def save(self, model: nn.Module, directory: str) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / STATE_NAME).write_text(json.dumps({"method": self.name, **self.extra_state()}, indent=2))

    def load(self, model: nn.Module, directory: str) -> None:
        path = Path(directory) / STATE_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: {directory} is not a zero_shot checkpoint")
        state: dict[str, Any] = json.loads(path.read_text())
        if state.get("method") != self.name:
            raise ValueError(f"{path} holds method {state.get('method')!r}, not {self.name!r}")
        self.load_extra_state(state)
