"""O-LoRA, orthogonal subspace learning (Wang et al., arXiv 2310.14152; release cmnfriend/O-LoRA).

Each task t gets a new LoRA ``(A_t, B_t)``; earlier tasks' LoRAs are frozen and *kept in the
model*: the update is the sum over every task so far, so inference needs no task id. For a
frozen weight ``W0`` (out x in), with ``s = alpha / r``::

    y = W0 x + b + s * sum_{i <= t} B_i (A_i dropout(x))          A_i: r x in,  B_i: out x r

While task t trains, its A is pushed into a subspace orthogonal to the earlier tasks' ones::

    L_orth = sum_layers sum_{i < t} sum_{j,k} |(A_i A_t^T)[j, k]|    (A_i detached; r x r blocks)
    L_l2   = sum_layers (||A_t||_F + ||B_t||_F)
    L      = L_task + lambda_orth * L_orth + lambda_l2 * L_l2

Sums over layers, not means, and absolute entries, as in the release; lambda_orth = 0.5 (paper)
and the L2 term off by default (lambda_l2 = 0). Past tasks' A are detached and frozen, so the
gradient of L_orth reaches only the current A. ``delta_weight(t)`` is the summed update of the
tasks up to and including t, i.e. the model as it was right after task t; as one LoRA of rank
t r (``lora_factors``, what a stock peft adapter holds) it is ``[A_1; ...; A_t]`` and
``s [B_1, ..., B_t]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import LoRABranch, LoRAConfig
from ..contract import TaskContext
from .base import Method, open_task, register_method, typed_branches


@dataclass
class OLoRAConfig(LoRAConfig):
    lambda_orth: float = 0.5  # weight of the orthogonality loss |A_past A_cur^T|_1 (paper: 0.5)
    lambda_l2: float = 0.0  # weight of ||A_cur||_F + ||B_cur||_F (0: off)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lambda_orth", "lambda_l2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def build_branch(self, in_features: int, out_features: int) -> "OLoRABranch":
        return OLoRABranch(in_features, out_features, self)


class OLoRABranch(LoRABranch):
    """Per-task ``A[t]``, ``B[t]`` as in LoRA; the forward sums all tasks up to the active one."""

    supports_per_sample = False  # its forward sums tasks; no mixed batch

    def upto(self, task: str | None = None) -> list[str]:
        """The tasks whose LoRAs are summed: every task up to ``task`` (default: the active one)."""
        task = self.resolve_task(task)
        names = self.tasks
        return names[: names.index(task) + 1]

    def stacked(self, task: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All summed LoRAs as one LoRA of rank r * k: ``(k r, in)`` and ``(out, k r)``."""
        names = self.upto(task)
        a = torch.cat([self.lora_A[t] for t in names])
        b = torch.cat([self.lora_B[t] for t in names], dim=1)
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        a, b = self.stacked()
        x = x.to(a.dtype)
        return F.linear(F.linear(self.dropout(x), a), b) * self.scale  # (..., out)

    def delta_weight(self, task: str | None = None) -> torch.Tensor:  # (out, in)
        a, b = self.stacked(task)
        return (b @ a) * self.scale

    def lora_factors(self, task: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.stacked(task)
        return a, b * self.scale  # one LoRA of rank k r: the sum of the tasks' products

    def orthogonality(self) -> torch.Tensor:
        """``sum_{i < t} |A_i A_t^T|_1`` for the active task t (0 on the first task)."""
        names = self.upto()
        current = self.lora_A[names[-1]]
        if len(names) == 1:
            return current.new_zeros(())
        past = torch.cat([self.lora_A[t] for t in names[:-1]]).detach()  # ((t-1) r, in)
        return (past @ current.T).abs().sum()

    def l2(self) -> torch.Tensor:
        task = self.resolve_task(None)
        return torch.linalg.vector_norm(self.lora_A[task]) + torch.linalg.vector_norm(self.lora_B[task])


@register_method
class OLoRA(Method):
    """A new LoRA per task, earlier ones frozen and summed; orthogonality loss on the current A."""

    name = "o_lora"
    config_cls = OLoRAConfig
    uses_task_id = False
    config: OLoRAConfig

    def begin_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        open_task(model, typed_branches(model, OLoRABranch), task)

    def loss_terms(self, model: nn.Module, batch: Any = None, context: TaskContext | None = None) -> dict[str, torch.Tensor]:
        found = list(typed_branches(model, OLoRABranch).values())
        terms: dict[str, torch.Tensor] = {}
        if self.config.lambda_orth > 0 and len(found[0].upto()) > 1:
            terms["orth"] = self.config.lambda_orth * torch.stack([b.orthogonality() for b in found]).sum()
        if self.config.lambda_l2 > 0:
            terms["l2"] = self.config.lambda_l2 * torch.stack([b.l2() for b in found]).sum()
        return terms
