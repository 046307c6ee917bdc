"""MoE-LoRA: a mixture of E LoRA experts with a learned softmax router per layer
(LoRAMoE, Dou et al., arXiv 2312.09979; the "MoELoRA" row of the CVIT tables).

For a frozen weight ``W0`` (out x in), experts ``A_e`` (r_e x in), ``B_e`` (out x r_e) and the
router ``W_r`` (E x in), with ``s = alpha / r_e``::

    g(x) = softmax(top_k(W_r x))                       (..., E)  top_k keeps k logits, -inf elsewhere
    y    = W0 x + b + s * sum_e g_e(x) B_e (A_e dropout(x))

``routing="token"`` routes every token on its own input; ``"sample"`` routes each sample on the
mean of its tokens along ``seq_dim`` (one mixture per sample). ``top_k = None`` (k = E) is the
dense mixture. The experts are tables ``(E, r_e, in)`` / ``(E, out, r_e)`` applied as one rank
``E r_e`` product: every expert is computed (no sparse dispatch), so top-k only masks gates.
The router reads the clean input; experts the dropped-out one. Init: A kaiming-uniform, B = 0
(starts at the base model), router kaiming-uniform (as ``nn.Linear``).

One pool is trained through all tasks with no task id (the ablation the Rank-1 Expert Pool paper
compares against), so it forgets like SeqLoRA unless the router separates the tasks.
Optional load balancing (Switch Transformer, arXiv 2101.03961), per layer over the N routed
tokens with p the full softmax and f_e the share of tokens whose top-1 expert is e::

    L_bal = lambda_balance * mean_layers E * sum_e f_e * mean_n p_{n,e}

It is returned as a loss term (the branch only keeps the last forward's router statistics).
The update depends on the input, so it cannot be merged into the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import AdapterBranch, AdapterConfig, ExportError, ParamCount
from ..adapters.base import check_task_name, in_backward
from ..contract import TaskContext
from .base import Method, register_method, typed_branches
from .shared import open_shared

ROUTINGS = ("token", "sample")
NOT_EXPORTABLE = ("moe_lora: the update g(x)-weights its experts by a router that reads the input, so it is neither a "
                  "fixed weight change (no merged transformers model) nor a LoRA product (no peft adapter); serve "
                  "the adapted model through continual-lora (Method.load on the checkpoint)")


@dataclass
class MoELoRAConfig(AdapterConfig):
    num_experts: int = 4  # E, LoRA experts per adapted weight
    expert_rank: int = 2  # r_e, rank of each expert
    alpha: float = 2.0  # each expert's scale is alpha / expert_rank
    dropout: float = 0.0  # dropout on the experts' input (the router reads the clean input)
    top_k: int | None = None  # experts mixed per token / sample; None = all E (dense mixture)
    routing: Literal["token", "sample"] = "token"  # "token": route each token; "sample": route on the mean over tokens
    lambda_balance: float = 0.0  # weight of the Switch load-balancing loss (0: off)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_experts", "expert_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts):
            raise ValueError(f"top_k must be an integer in [1, num_experts={self.num_experts}] or None, got {k!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if not math.isfinite(self.lambda_balance) or self.lambda_balance < 0:
            raise ValueError(f"lambda_balance must be a finite number >= 0, got {self.lambda_balance!r}")

    def build_branch(self, in_features: int, out_features: int) -> "MoELoRABranch":
        return MoELoRABranch(in_features, out_features, self)


class MoELoRABranch(AdapterBranch):
    """Per task: expert tables ``experts_A[t]`` (E, r_e, in), ``experts_B[t]`` (E, out, r_e), ``router[t]`` (E, in)."""

    def __init__(self, in_features: int, out_features: int, config: MoELoRAConfig) -> None:
        super().__init__(in_features, out_features)
        self.num_experts, self.expert_rank = config.num_experts, config.expert_rank
        self.top_k = config.top_k if config.top_k is not None else config.num_experts
        self.scale = config.alpha / config.expert_rank
        self.routing = config.routing
        self.track_balance = config.lambda_balance > 0
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.experts_A = nn.ParameterDict()  # task -> (E, r_e, in)
        self.experts_B = nn.ParameterDict()  # task -> (E, out, r_e)
        self.router = nn.ParameterDict()  # task -> (E, in)
        self.register_buffer("anchor", torch.empty(0), persistent=False)  # device / dtype of new tasks
        self.balance_terms: list[torch.Tensor] = []  # transient: this step's balance losses, read by the method

    @property
    def tasks(self) -> list[str]:
        return list(self.experts_A.keys())

    def add_task(self, task: str) -> None:
        check_task_name(task)
        if task in self.experts_A:
            raise ValueError(f"task {task!r} already exists")
        e, r = self.num_experts, self.expert_rank
        kw = {"device": self.anchor.device, "dtype": self.anchor.dtype}
        a = torch.empty(e, r, self.in_features, **kw)
        nn.init.kaiming_uniform_(a.view(e * r, self.in_features), a=math.sqrt(5))  # fan_in = in
        router = torch.empty(e, self.in_features, **kw)
        nn.init.kaiming_uniform_(router, a=math.sqrt(5))
        self.experts_A[task] = nn.Parameter(a)
        self.experts_B[task] = nn.Parameter(torch.zeros(e, self.out_features, r, **kw))
        self.router[task] = nn.Parameter(router)

    def gates(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """Mixture weights ``(..., E)``; with ``routing="sample"`` size 1 along ``seq_dim``."""
        task = self.resolve_task(task)
        w = self.router[task]
        if self.routing == "sample" and x.dim() > 2:
            if self.seq_dim is None:
                raise ValueError("routing='sample' needs a token axis (seq_dim) for inputs with more than 2 dims")
            x = x.mean(self.seq_dim, keepdim=True)
        logits = F.linear(x.to(w.dtype), w)  # (..., E)
        if self.training and self.track_balance and torch.is_grad_enabled():
            term = self.balance(logits)  # also while checkpointing recomputes: the same tensors get saved
            if not in_backward():  # ... but the recomputation's copy is not a second statistic
                self.balance_terms.append(term)
        if self.top_k < self.num_experts:
            top = logits.topk(self.top_k, dim=-1).indices  # (..., k)
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)
            logits = logits.masked_fill(~keep, float("-inf"))
        return logits.softmax(dim=-1)

    def balance(self, logits: torch.Tensor) -> torch.Tensor:
        """Switch loss ``E * sum_e f_e * mean_n p_{n,e}`` over all routed tokens (1 at uniform routing)."""
        probs = logits.reshape(-1, self.num_experts).softmax(dim=-1)  # (N, E)
        share = F.one_hot(probs.argmax(dim=-1), self.num_experts).to(probs.dtype).mean(0)  # (E,) f_e
        return self.num_experts * (share * probs.mean(0)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        task = self.resolve_task(None)
        a, b = self.experts_A[task], self.experts_B[task]
        e, r = self.num_experts, self.expert_rank
        g = self.gates(x, task)  # (..., E)
        h = F.linear(self.dropout(x.to(a.dtype)), a.reshape(e * r, self.in_features))  # (..., E r)
        h = h * g.repeat_interleave(r, dim=-1)  # expert e's r coordinates weighted by g_e
        return F.linear(h, b.permute(1, 0, 2).reshape(self.out_features, e * r)) * self.scale  # (..., out)

    def delta_weight(self, task: str | None = None) -> torch.Tensor:
        raise NotImplementedError("MoE-LoRA's update depends on the input through the router; it cannot be merged")

    def lora_factors(self, task: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise ExportError(NOT_EXPORTABLE)

    def parameter_count(self) -> ParamCount:
        return ParamCount(0, {t: self.experts_A[t].numel() + self.experts_B[t].numel() + self.router[t].numel()
                              for t in self.tasks})


@register_method
class MoELoRA(Method):
    """One pool of E LoRA experts + router per layer, trained through every task (no task id)."""

    name = "moe_lora"
    config_cls = MoELoRAConfig
    uses_task_id = False
    config: MoELoRAConfig

    def begin_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        open_shared(model, typed_branches(model, MoELoRABranch))

    def loss_terms(self, model: nn.Module, batch: Any = None, context: TaskContext | None = None) -> dict[str, torch.Tensor]:
        if self.config.lambda_balance == 0:
            return {}
        per_layer = []
        for branch in typed_branches(model, MoELoRABranch).values():
            terms, branch.balance_terms = branch.balance_terms, []
            if terms:
                per_layer.append(torch.stack(terms).mean())
        if not per_layer:
            return {}
        return {"balance": self.config.lambda_balance * torch.stack(per_layer).mean()}

    def prepare_inference(self, model: nn.Module, task: str | None = None) -> nn.Module:
        raise ExportError(NOT_EXPORTABLE)

    def peft_adapters(self, model: nn.Module) -> dict[str, str | None]:
        raise ExportError(NOT_EXPORTABLE)
