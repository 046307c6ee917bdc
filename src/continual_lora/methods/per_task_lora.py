"""Per-task LoRA ("DirLoRA"): a fresh LoRA (Hu et al., arXiv 2106.09685) for every task.

For task t and a frozen weight ``W0`` (out x in)::

    y = W0 x + b + (alpha / r) * B_t (A_t dropout(x))        A_t: r x in,  B_t: out x r

Task t trains only its own ``A_t, B_t`` (new, A kaiming-uniform, B = 0, so it starts from the
base model); every earlier task's factors are frozen and never change again, so there is no
forgetting by construction. Evaluation needs the task id: task i is scored with its own adapter,
a task not trained yet with the base model (the :class:`Method` default), and without a task id
(X-TAIL) with the adapter its task router picks per sample (``task_router``), or with no router the
most recent adapter. Storage grows by one LoRA per task.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..adapters import LoRABranch, LoRAConfig
from ..contract import TaskContext
from .base import Method, open_task, register_method, typed_branches
from .task_router import RouterConfig


@dataclass
class PerTaskLoRAConfig(RouterConfig, LoRAConfig):
    """Plain LoRA hyper-parameters (``rank``, ``alpha``, ``dropout``, ``init``), one LoRA per task; and
    the task router that picks one when no task id is given (``task_router``, methods/task_router.py)."""



@register_method
class PerTaskLoRA(Method):
    """Task-id learner: one independent LoRA per task, earlier tasks frozen."""

    name = "per_task_lora"
    config_cls = PerTaskLoRAConfig
    uses_task_id = True

    def begin_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        open_task(model, typed_branches(model, LoRABranch), task)
