"""Elastic Weight Consolidation (Kirkpatrick et al., arXiv 1612.00796) on one shared LoRA.

The trainable parameters theta are the factors ``A`` (r x in) and ``B`` (out x r) of a single
LoRA trained through all tasks (as in SeqLoRA). At the end of task t, with theta*_t the factors
then, the diagonal empirical Fisher is estimated from ``n`` minibatches of the task's data::

    F_t = (1 / n) sum_{k=1..n} (d L(batch_k) / d theta)^2            (elementwise)

and accumulated online (Schwarz et al., arXiv 1805.06370, "online EWC")::

    F <- gamma * F + F_t,        theta* <- theta*_t

From the second task on the trainer adds the penalty (returned as the loss term ``"ewc"``)::

    L_ewc = (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2,    dL_ewc / dtheta = lambda F (theta - theta*)

``gamma = 1`` sums every task's Fisher around the latest anchor (Huszar's correction of the
paper's one-penalty-per-task sum, arXiv 1712.03847); ``gamma < 1`` lets old importance fade.
The Fisher uses minibatch gradients because a contrastive loss has no per-sample likelihood
(a batch of one gives it no gradient). ``F`` and ``theta*`` are buffers of the branches
(:class:`EWCBranch`), so ``.to()``, ``state_dict()`` and the safetensors checkpoint carry them
and a resumed run penalises exactly as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import LoRABranch, LoRAConfig
from ..contract import TaskContext
from .base import register_method, typed_branches
from .seq_lora import SeqLoRA
from .shared import SHARED


@dataclass
class EWCConfig(LoRAConfig):
    ewc_lambda: float = 1000.0  # weight of the quadratic penalty; scale-dependent (mtil-mini: 1e5, docs/results.md)
    gamma: float = 1.0  # online-EWC decay of the accumulated Fisher (1 = plain sum over tasks)
    fisher_batches: int = 8  # minibatches of the finished task that estimate its Fisher
    fisher_batch_size: int = 32  # samples per Fisher minibatch

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ewc_lambda >= 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {self.ewc_lambda!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma!r}")
        for key in ("fisher_batches", "fisher_batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")

    def build_branch(self, in_features: int, out_features: int) -> "EWCBranch":
        return EWCBranch(in_features, out_features, self)


class EWCBranch(LoRABranch):
    """A LoRA branch plus the Fisher ``fisher_A`` / ``fisher_B`` and anchors ``star_A`` / ``star_B``
    of its shared factors (zeros until the first task ends: no penalty before it)."""

    def __init__(self, in_features: int, out_features: int, config: EWCConfig) -> None:
        super().__init__(in_features, out_features, config)
        for factor, shape in (("A", (config.rank, in_features)), ("B", (out_features, config.rank))):
            self.register_buffer(f"fisher_{factor}", torch.zeros(shape))
            self.register_buffer(f"star_{factor}", torch.zeros(shape))

    def penalty(self) -> torch.Tensor:
        """sum F (theta - theta*)^2 over this branch's shared factors."""
        a, b = self.factors(SHARED)
        return (self.fisher_A * (a - self.star_A) ** 2).sum() + (self.fisher_B * (b - self.star_B) ** 2).sum()

    @torch.no_grad()
    def consolidate(self, fisher_a: torch.Tensor, fisher_b: torch.Tensor, gamma: float) -> None:
        """F <- gamma F + F_t and theta* <- the current factors."""
        a, b = self.factors(SHARED)
        self.fisher_A.mul_(gamma).add_(fisher_a)
        self.fisher_B.mul_(gamma).add_(fisher_b)
        self.star_A.copy_(a)
        self.star_B.copy_(b)


def _ewc_branches(model: nn.Module) -> list[EWCBranch]:
    return list(typed_branches(model, EWCBranch).values())


@register_method
class EWC(SeqLoRA):
    """SeqLoRA plus the EWC penalty towards the factors of earlier tasks."""

    name = "ewc"
    config_cls = EWCConfig

    def loss_terms(self, model: nn.Module, batch: object = None, context: TaskContext | None = None) -> dict[str, torch.Tensor]:
        if not self.trained_tasks:
            return {}
        total = torch.stack([b.penalty() for b in _ewc_branches(model)]).sum()
        return {"ewc": 0.5 * self.config.ewc_lambda * total}

    def fisher(self, model: nn.Module, context: TaskContext | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The current task's diagonal empirical Fisher, (F_A, F_B) per branch."""
        cfg, ctx = self.config, self.need_context(context)
        params = [p for b in _ewc_branches(model) for p in b.factors(SHARED)]
        squares = [torch.zeros_like(p) for p in params]
        for _ in range(cfg.fisher_batches):
            loss = ctx.kind.loss(model, ctx.sample(ctx.task, cfg.fisher_batch_size))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for sq, g in zip(squares, grads):
                if g is not None:
                    sq.add_(g.detach() ** 2)
        scaled = [sq / cfg.fisher_batches for sq in squares]
        return list(zip(scaled[0::2], scaled[1::2]))

    def end_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        for branch, (fa, fb) in zip(_ewc_branches(model), self.fisher(model, context)):
            branch.consolidate(fa, fb, self.config.gamma)
        super().end_task(model, task, index, context)
