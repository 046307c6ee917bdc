"""WiSE-FT, weight-space ensembles (Wortsman et al., arXiv 2109.01903), task by task on one LoRA.

After fine-tuning task t, the weights are interpolated between an anchor and the fine-tuned
ones with mixing coefficient alpha (0 = anchor, 1 = fine-tuned; paper default 0.5)::

    W_t = (1 - alpha) W_anchor + alpha W_ft

With a single LoRA trained through all tasks (as in SeqLoRA), ``W = W0 + s B A``:

* ``anchor="zeroshot"`` (paper: the zero-shot model W0). Then
  ``(1 - alpha) W0 + alpha (W0 + s B A) = W0 + s (alpha B) A``, so scaling ``B`` by alpha at the
  task end is exact: alpha = 0 gives back the base model bit for bit, alpha = 1 changes nothing.
  The next task starts from the interpolated model.
* ``anchor="previous"`` (the ZSCL release's continual WiSE-FT: ``--wise_ft_model n``, alpha
  0.8, anchor = the model the task started from). A weight-space interpolation of two rank-r
  updates has rank 2r, so here the *factors* are interpolated instead:
  ``A <- (1 - alpha) A_0 + alpha A``, ``B <- (1 - alpha) B_0 + alpha B`` (A_0, B_0 at the task
  start). It is exact at alpha in {0, 1}; in between it differs from the weight-space
  interpolation by ``-alpha (1 - alpha) s (B - B_0)(A - A_0)``.

Everything lives in the LoRA factors, so checkpoints and resume need no extra state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..adapters import LoRAConfig
from ..contract import TaskContext
from .base import register_method
from .seq_lora import SeqLoRA
from .shared import shared_factors

ANCHORS = ("zeroshot", "previous")


@dataclass
class WiSEFTConfig(LoRAConfig):
    wise_alpha: float = 0.5  # mixing coefficient: 0 = anchor model, 1 = fine-tuned model (paper 0.5)
    anchor: Literal["zeroshot", "previous"] = "zeroshot"  # "zeroshot" (paper, exact) or "previous" (release, factor space; see docstring)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.wise_alpha <= 1.0:
            raise ValueError(f"wise_alpha must be in [0, 1], got {self.wise_alpha!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")


@register_method
class WiSEFT(SeqLoRA):
    """SeqLoRA whose update is pulled towards the anchor by weight interpolation after each task."""

    name = "wise_ft"
    config_cls = WiSEFTConfig

    def __init__(self, config: WiSEFTConfig | None = None) -> None:
        super().__init__(config)
        self._start: list[tuple[torch.Tensor, torch.Tensor]] = []  # factors at the task start ("previous")

    def begin_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        super().begin_task(model, task, index, context)
        if self.config.anchor == "previous":
            self._start = [(a.detach().clone(), b.detach().clone()) for a, b in shared_factors(model)]

    @torch.no_grad()
    def interpolate(self, model: nn.Module) -> None:
        """The task-end interpolation of the module docstring, in place on the factors."""
        alpha = self.config.wise_alpha
        if self.config.anchor == "zeroshot":
            for _, b in shared_factors(model):
                b.mul_(alpha)
            return
        if len(self._start) != len(shared_factors(model)):
            raise RuntimeError("wise_ft(anchor='previous'): begin_task did not record the task-start factors")
        for (a, b), (a0, b0) in zip(shared_factors(model), self._start):
            a.copy_(a0 * (1.0 - alpha) + a * alpha)  # exact at alpha = 0 and 1
            b.copy_(b0 * (1.0 - alpha) + b * alpha)

    def end_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        self.interpolate(model)
        super().end_task(model, task, index, context)
