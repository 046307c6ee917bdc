"""SD-LoRA, scalable decoupled LoRA (Wu et al., arXiv 2501.13198, ICLR 2025; release WuYichen-97/SD-Lora-CL).

Each finished task i keeps a frozen, normalised *direction* ``B_i A_i / ||B_i A_i||_F`` and a
learnable *magnitude* ``alpha_i`` that keeps training on every later task. While task t trains,
its own LoRA ``B_t A_t`` (new direction) and magnitude ``alpha_t`` learn too. For a frozen weight
``W0`` (out x in), with ``s = rank_alpha / r``::

    y = W0 x + b + sum_{i < t} alpha_i * B_i (A_i x) / ||B_i A_i||_F     (closed tasks)
                 + alpha_t * s * B_t (A_t x)                             (the open task t)
    ||B A||_F^2  = trace((B^T B)(A A^T)) = sum((B^T B) * (A A^T))       (r x r; out x in never built)

No task id at inference. The open task is trained *unnormalised*, as in the release: its
``B_t = 0`` at the start, where ``B A / ||B A||`` is undefined and its gradient unbounded.
``close`` (end of the task) turns it into a direction exactly: ``alpha_t <- alpha_t * s ||B_t A_t||_F``,
so the function the task was trained to is unchanged and ``alpha_t`` is then the Frobenius norm
of its update. Departures from the release (documented choices): the norm is ``||B A||_F`` (the
paper's) instead of the release's ``||B||_F ||A||_F``, and a closed task keeps its trained
magnitude instead of restarting from 0.8. ``alpha_t`` starts at ``magnitude_init`` (release 0.8).
Which tasks are closed is a per-task buffer, so a checkpoint taken mid-task is exact too.
``delta_weight(t)`` is the summed update of the tasks up to and including t; as one LoRA of rank
t r (``lora_factors``, what a stock peft adapter holds) it is ``[A_1; ...; A_t]`` and
``[c_1 B_1, ..., c_t B_t]`` with c_i each task's coefficient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import LoRABranch, LoRAConfig, ParamCount
from ..contract import TaskContext
from .base import Method, open_task, register_method, typed_branches


@dataclass
class SDLoRAConfig(LoRAConfig):
    magnitude_init: float = 0.8  # alpha_t of a new task (release: 0.8), on top of the scale alpha / rank

    def __post_init__(self) -> None:
        super().__post_init__()
        m = self.magnitude_init
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise ValueError(f"magnitude_init must be a finite number, got {m!r}")

    def build_branch(self, in_features: int, out_features: int) -> "SDLoRABranch":
        return SDLoRABranch(in_features, out_features, self)


def frobenius(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||b @ a||_F`` for ``a`` (r, in), ``b`` (out, r) through r x r Gram matrices."""
    sq = ((b.T @ b) * (a @ a.T)).sum()
    return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()


class SDLoRABranch(LoRABranch):
    """LoRA factors per task plus ``magnitude[t]`` (a learnable scalar) and a ``closed_<t>`` flag buffer."""

    supports_per_sample = False  # its forward sums tasks; no mixed batch

    def __init__(self, in_features: int, out_features: int, config: SDLoRAConfig) -> None:
        super().__init__(in_features, out_features, config)
        self.magnitude_init = float(config.magnitude_init)
        self.magnitude = nn.ParameterDict()  # task -> () alpha_t

    def add_task(self, task: str) -> None:
        super().add_task(task)
        ref = self.lora_A[task]
        self.magnitude[task] = nn.Parameter(torch.tensor(self.magnitude_init, device=ref.device, dtype=ref.dtype))
        self.register_buffer(f"closed_{task}", torch.zeros((), dtype=torch.bool, device=ref.device))

    def is_closed(self, task: str) -> bool:
        return bool(getattr(self, f"closed_{task}"))

    def upto(self, task: str | None = None) -> list[str]:
        task = self.resolve_task(task)
        names = self.tasks
        return names[: names.index(task) + 1]

    def coefficient(self, task: str) -> torch.Tensor:
        """Scalar in front of ``B_t A_t``: ``alpha_t / ||B_t A_t||_F`` (closed) or ``alpha_t * s`` (open)."""
        closed = getattr(self, f"closed_{task}")  # a tensor test: no host sync in the forward pass
        norm = frobenius(self.lora_A[task], self.lora_B[task])
        return self.magnitude[task] / torch.where(closed, norm, norm.new_tensor(1.0 / self.scale))

    def stacked(self, task: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k r, in)``, ``(out, k r)`` and the per-rank coefficients ``(k r,)`` of the summed tasks."""
        names = self.upto(task)
        a = torch.cat([self.lora_A[t] for t in names])
        b = torch.cat([self.lora_B[t] for t in names], dim=1)
        coef = torch.stack([self.coefficient(t) for t in names]).repeat_interleave(self.rank)
        return a, b, coef

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        a, b, coef = self.stacked()
        h = F.linear(self.dropout(x.to(a.dtype)), a)  # (..., k r)
        return F.linear(h * coef, b)  # (..., out)

    def delta_weight(self, task: str | None = None) -> torch.Tensor:  # (out, in)
        a, b, coef = self.stacked(task)
        return (b * coef) @ a

    def lora_factors(self, task: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, coef = self.stacked(task)
        return a, b * coef  # (k r, in), (out, k r): each task's column block scaled by its coefficient

    @torch.no_grad()
    def close(self, task: str) -> None:
        """Freeze ``task``'s direction: ``alpha_t <- alpha_t * s ||B_t A_t||_F`` (same function)."""
        if self.is_closed(task):
            return
        self.magnitude[task].mul_(self.scale * frobenius(self.lora_A[task], self.lora_B[task]))
        getattr(self, f"closed_{task}").fill_(True)

    def parameter_count(self) -> ParamCount:
        return ParamCount(0, {t: self.lora_A[t].numel() + self.lora_B[t].numel() + 1 for t in self.tasks})


@register_method
class SDLoRA(Method):
    """New direction + magnitude per task; past directions frozen, all magnitudes keep learning."""

    name = "sd_lora"
    config_cls = SDLoRAConfig
    uses_task_id = False

    def begin_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        found = typed_branches(model, SDLoRABranch)
        open_task(model, found, task)
        for branch in found.values():
            for other in branch.tasks:
                branch.magnitude[other].requires_grad_(True)  # every magnitude keeps learning
            for other in branch.upto()[:-1]:
                branch.close(other)  # no-op for tasks closed by end_task

    def end_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        for branch in typed_branches(model, SDLoRABranch).values():
            branch.close(task)
        super().end_task(model, task, index)
