"""Joint LoRA: one LoRA (Hu et al., arXiv 2106.09685) trained on every task at once.

The upper reference ("multitask" in the CVIT tables): not a continual method, since it sees all
tasks' data together. With ``T`` tasks, per-task step budgets ``S_i`` (the trainer's
``steps_for``) and one shared update ``dW = (alpha / r) B A``, it trains only at task index 0::

    steps at index 0 = sum_i S_i                 (budget="steps": the same optimiser steps as the
                                                   sequential methods; each step sees T batches)
                     = ceil(sum_i S_i / T)        (budget="samples": the same number of training
                                                   samples as the sequential methods)
    L(step)          = sum_i L_i(batch_i)         batch_0 from the trainer, batch_i (i >= 1) drawn by
                                                   ``context.sample(task_i, n)`` and returned as the
                                                   loss terms ``"joint/<task>"``

so every task weighs the same (the sum, not the mean, of per-task mean losses: AdamW is
invariant to that constant factor up to its epsilon and the gradient-clipping threshold).
All T batches are in one autograd graph, so activation memory is T times a sequential step's.
``train_steps`` is 0 from index 1 on and the adapter is frozen then: the rows of the accuracy
matrix after task 0 are identical by construction (no task id, nothing changes). Row 0 already
is the final model; the later rows only keep the matrix shape of the other methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..adapters import LoRAConfig
from ..contract import TaskContext
from .base import Method, register_method
from .shared import SHARED, open_shared

BUDGETS = ("steps", "samples")


@dataclass
class JointLoRAConfig(LoRAConfig):
    budget: Literal["steps", "samples"] = "steps"  # "steps": sum of per-task steps; "samples": that sum / T (same samples seen)
    other_batch_size: int | None = None  # samples drawn from each other task per step (None: trainer's)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        n = self.other_batch_size
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise ValueError(f"other_batch_size must be a positive integer or None, got {n!r}")


@register_method
class JointLoRA(Method):
    """One LoRA trained at task index 0 on the union of all tasks; nothing trains afterwards."""

    name = "joint_lora"
    config_cls = JointLoRAConfig
    uses_task_id = False
    config: JointLoRAConfig

    def __init__(self, config: JointLoRAConfig | None = None) -> None:
        super().__init__(config)
        self.task_index = -1  # index of the task being "trained" (-1: none yet)

    def total_steps(self, default: int, context: TaskContext | None = None) -> int:
        """The joint budget; ``default`` is task 0's own step count."""
        if context is None:
            return default
        # a context without the trainer's budgets: every task gets task 0's budget
        per_task = list(context.task_steps) or [default] * len(context.tasks)
        total = sum(per_task)
        return total if self.config.budget == "steps" else math.ceil(total / len(per_task))

    def train_steps(self, index: int, default: int, context: TaskContext | None = None) -> int:
        return self.total_steps(default, context) if index == 0 else 0

    def begin_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        self.task_index = index
        open_shared(model)
        for branch in self.branches(model).values():  # trainable at index 0 only (reported as 0 trainable later)
            branch.freeze_task(SHARED, frozen=index != 0)

    def loss_terms(self, model: nn.Module, batch: Any, context: TaskContext | None = None) -> dict[str, torch.Tensor]:
        if self.task_index != 0 or context is None:
            return {}
        n = self.config.other_batch_size if self.config.other_batch_size is not None else context.batch_size
        return {f"joint/{t.name}": context.kind.loss(model, context.sample(t, n))
                for t in context.tasks if t is not context.task}

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "task_index": self.task_index}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.task_index = int(state.get("task_index", len(self.trained_tasks) - 1))
