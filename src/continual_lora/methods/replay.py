"""Experience replay on one shared LoRA: a small buffer of earlier tasks' training samples.

At the end of task t, ``samples_per_task`` of its training samples are drawn without
replacement (with the trainer's seeded generator) and their indices kept in the buffer
``M = {task: indices}``. While training task t' > t, every step draws one buffered task
uniformly and ``replay_batch_size`` of its kept samples, and the trainer adds::

    L = L_task(batch) + w * L_task(replay batch from M)            (loss term "replay")

One task per replay batch because a batch's loss is defined over one task's label space
(CLIP's contrastive targets, a task's prompts). The LoRA is a single update trained through
all tasks (as in SeqLoRA). The buffer holds indices only, saved in the method's extra state
(JSON), so a resumed run replays exactly the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters import LoRAConfig
from ..contract import TaskContext
from .base import register_method
from .seq_lora import SeqLoRA


@dataclass
class ReplayConfig(LoRAConfig):
    samples_per_task: int = 16  # training samples of each finished task kept in the buffer
    replay_batch_size: int = 16  # buffered samples per replay batch (at most a task's quota)
    replay_weight: float = 1.0  # w, weight of the replay loss term

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("samples_per_task", "replay_batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not self.replay_weight >= 0:
            raise ValueError(f"replay_weight must be >= 0, got {self.replay_weight!r}")


@register_method
class Replay(SeqLoRA):
    """SeqLoRA plus a replayed minibatch of earlier tasks' kept samples at every step."""

    name = "replay"
    config_cls = ReplayConfig

    def __init__(self, config: ReplayConfig | None = None) -> None:
        super().__init__(config)
        self.buffer: dict[str, list[int]] = {}  # finished task -> indices of its kept training samples

    @staticmethod
    def _task(context: TaskContext, name: str) -> Any:
        for task in context.tasks:
            if task.name == name:
                return task
        raise KeyError(f"replay buffer names task {name!r}, which is not in this stream")

    def replay_batch(self, context: TaskContext) -> Any:
        """A batch of one uniformly drawn buffered task (None while the buffer is empty)."""
        if not self.buffer:
            return None
        names = list(self.buffer)
        name = names[int(torch.randint(len(names), (1,), generator=context.generator))]
        kept = torch.tensor(self.buffer[name], dtype=torch.long)
        pick = kept[torch.randperm(len(kept), generator=context.generator)[: self.config.replay_batch_size]]
        return context.kind.train_batch(self._task(context, name), pick, context.generator)

    def loss_terms(self, model: nn.Module, batch: object = None, context: TaskContext | None = None) -> dict[str, torch.Tensor]:
        if not self.buffer:
            return {}
        context = self.need_context(context)
        replay = self.replay_batch(context)
        return {"replay": self.config.replay_weight * context.kind.loss(model, replay)}

    def end_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        context = self.need_context(context)
        n = context.kind.num_train(context.task)
        keep = torch.randperm(n, generator=context.generator)[: self.config.samples_per_task]
        self.buffer[task] = sorted(keep.tolist())
        super().end_task(model, task, index, context)

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "buffer": {t: list(i) for t, i in self.buffer.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.buffer = {t: [int(i) for i in idx] for t, idx in state.get("buffer", {}).items()}
