"""Sequential LoRA (SeqLoRA): one LoRA trained through all tasks in turn.

The forgetting reference of every continual-LoRA paper: a single rank-r update
``dW = (alpha / r) B A`` keeps training on each new task with no protection, so nothing stops
it from overwriting what earlier tasks needed. No task id at inference.
"""

from __future__ import annotations

from torch import nn

from ..adapters import LoRAConfig
from ..contract import TaskContext
from .base import Method, register_method
from .shared import open_shared


@register_method
class SeqLoRA(Method):
    name = "seq_lora"
    config_cls = LoRAConfig
    uses_task_id = False

    def begin_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        open_shared(model)
