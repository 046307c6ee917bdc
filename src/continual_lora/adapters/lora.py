"""Plain LoRA (Hu et al., arXiv 2106.09685), one independent adapter per task.

For task t and a frozen weight ``W0`` (out x in)::

    y = W0 x + b + (alpha / r) * B_t (A_t dropout(x))        A_t: r x in,  B_t: out x r

Initialisation ``"kaiming"`` (peft's default): ``A_t`` kaiming-uniform with a = sqrt(5),
``B_t = 0``, so training starts from the base model. ``"gaussian"``: ``A_t ~ N(0, 1/r)``.
Each task's factors live in ``nn.ParameterDict``s keyed by task name; the forward pass uses
the active task (see :func:`continual_lora.adapters.set_task`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterBranch, AdapterConfig, ParamCount, UnknownTaskError, register_adapter


@register_adapter
@dataclass
class LoRAConfig(AdapterConfig):
    method = "lora"
    rank: int = 8  # r, the rank of every update
    alpha: float = 16.0  # update scale is alpha / rank
    dropout: float = 0.0  # dropout on the input of A only
    init: Literal["kaiming", "gaussian"] = "kaiming"  # "kaiming" (A kaiming-uniform, B = 0; peft's default) or "gaussian"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {self.init!r}")

    def build_branch(self, in_features: int, out_features: int) -> "LoRABranch":
        return LoRABranch(in_features, out_features, self)


class LoRABranch(AdapterBranch):
    """Per-task rank-r factors ``A[t]`` (r x in) and ``B[t]`` (out x r)."""

    supports_per_sample = True

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig) -> None:
        super().__init__(in_features, out_features)
        self.rank = config.rank
        self.scale = config.alpha / config.rank
        self.init = config.init
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterDict()  # task -> (r, in)
        self.lora_B = nn.ParameterDict()  # task -> (out, r)
        # where the first task's factors go: created on the model's device by inject_adapters and
        # moved by .to(); non-persistent, so it is in no checkpoint
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    @property
    def tasks(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_task(self, task: str) -> None:
        if task in self.lora_A:
            raise ValueError(f"task {task!r} already exists")
        ref = next(iter(self.lora_A.values()), self.anchor)
        kw = {"device": ref.device, "dtype": ref.dtype}
        a = torch.empty(self.rank, self.in_features, **kw)
        if self.init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:
            nn.init.normal_(a, std=1.0 / self.rank)
        self.lora_A[task] = nn.Parameter(a)
        self.lora_B[task] = nn.Parameter(torch.zeros(self.out_features, self.rank, **kw))

    def factors(self, task: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        task = self.resolve_task(task)
        return self.lora_A[task], self.lora_B[task]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sample_groups is not None:  # a mixed batch: each sample through its own task
            return self.per_sample(x, self._forward)
        return self._forward(x, None)

    def _forward(self, x: torch.Tensor, task: str | None) -> torch.Tensor:
        a, b = self.factors(task)
        x = x.to(a.dtype)  # e.g. fp32 factors on a bf16 base model; the wrapper casts back
        return F.linear(F.linear(self.dropout(x), a), b) * self.scale  # (..., out)

    def delta_weight(self, task: str | None = None) -> torch.Tensor:
        a, b = self.factors(task)
        return (b @ a) * self.scale  # (out, in)

    def lora_factors(self, task: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.factors(task)
        return a, b * self.scale  # (r, in), (out, r): peft's scaling alpha / r becomes 1

    def freeze_task(self, task: str, frozen: bool = True) -> None:
        if task not in self.lora_A:
            raise UnknownTaskError(f"unknown task {task!r}; known tasks: {self.tasks}")
        self.lora_A[task].requires_grad_(not frozen)
        self.lora_B[task].requires_grad_(not frozen)

    def parameter_count(self) -> ParamCount:
        return ParamCount(0, {t: self.lora_A[t].numel() + self.lora_B[t].numel() for t in self.tasks})
