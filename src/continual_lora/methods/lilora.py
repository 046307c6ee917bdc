"""LiLoRA, "LoRA in LoRA" (Che et al., arXiv 2508.06202): a shared A, a shared basis B0, and a
second, inner low-rank product per task for the up-projection.

For one frozen weight ``W0`` (out x in) and task t::

    B_t  = sigmoid(g_t) * B0 + (1 - sigmoid(g_t)) * P_t Q_t              # (out, r)
    y    = W0 x + b + (alpha / r) * B_t (A dropout(x))                  # never builds (out, in)
    dW_t = (alpha / r) * B_t A                                           # for merging / export

    shared:    A (r x in), B0 (out x r)                 r * (in + out) per layer
    per task:  P_t (out x s), Q_t (s x r), g_t scalar   s * (out + r) + 1 per layer

Initialisation (release): A and Q_t kaiming-uniform (a = sqrt(5)), B0 = 0, P_t = 0, and
g_t ~ N(0, 1) (``gate_init="normal"``) or a fixed logit. Every task trains A (unless
``freeze_shared_a``) and its own P, Q, g; earlier tasks' factors never change again. What keeps
the shared basis B0 stable is ``stability``:

``release`` (default; chanceche/LiLoRA): B0 trains on the first task only, then is frozen. No loss.

``paper`` (AAAI-26 paper, as given by an automatically generated digest of the PDF, a secondary
source): B0 trains on every task, held in place by

    L_reg = (1 - sim_t) * || B0^(t) - B0^(t-1) ||_F^2,   sim_t = cos( vec(P_t Q_t), vec(P_{t-1} Q_{t-1}) )
    L     = L_task + lambda * L_reg                        for every task t >= 1

B0^(t-1) is B0 when task t begins (a snapshot), P_{t-1} Q_{t-1} the previous task's (frozen) inner
product. The digest gives the formula and that B0 trains; these choices are this project's:

* per layer: each adapted weight has its own B0, P, Q, so sim_t and the norm are per layer, and
  ``paper_layer_reduce`` combines layers: ``mean`` (default; lambda then does not scale with the
  number of adapted layers, as for ``a_cosine``) or ``sum`` (the formula read as one sum);
* ``paper_detach_sim`` (default true): sim_t is a weight, no gradient flows through it, so the loss
  moves only B0 (a gradient through sim_t would also pull P_t Q_t towards the previous task's
  product, a second regulariser the source does not describe);
* flattening: any order, as long as both products use the same one, gives the same cosine;
* at the start of task t, P_t = 0 so sim_t = 0 (torch's cosine of a zero vector) and the whole
  L2 term applies; as P_t Q_t grows towards the previous product the hold on B0 relaxes.

The release is this loss's lambda -> infinity limit. ``lambda_stab`` is lambda.

``a_cosine`` (this project's guess made before the paper's loss was known, kept for comparison):
with M the shared matrix named by ``stability_target`` and M_prev its snapshot when task t >= 1
begins, ``L_stab = mean over layers of mean over the r basis directions k of (1 - cos(M_k,
M_prev_k))``: the rows of A, the columns of B0 ("both" averages the two). A zero direction has
cosine 0 (torch's eps), so it adds a constant 1 and no gradient.

The method returns ``{"stability": lambda_stab * L}`` for t >= 1 (``paper`` / ``a_cosine``).

Each task's update is a plain rank-r LoRA (``lora_A = A``, ``lora_B = scale * B_t``;
:meth:`LiLoRABranch.lora_factors`): :func:`export_peft_lora` (or ``continual-lora export``) writes
it as a stock peft adapter directory.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import AdapterBranch, AdapterConfig, ParamCount, UnknownTaskError, save_peft_lora
from ..adapters.inject import CONFIG_ATTR
from ..errors import ConfigDeprecationWarning
from ..contract import TaskContext
from .base import Method, open_task, register_method, typed_branches
from .lilora_up import UpProjections
from .task_router import RouterConfig

STABILITY_TARGETS = ("A", "B0", "both")
STABILITY = ("release", "paper", "a_cosine")
PAPER_LAMBDA = 10.0  # lambda of `paper` when not given: best validation Last of 0.01-100 (docs/results.md)
A_COSINE_LAMBDA = 1.0  # lambda of `a_cosine` when not given: best validation Last of 0.1-10 (docs/results.md)


@dataclass
class LiLoRAConfig(RouterConfig, AdapterConfig):
    rank: int = 128  # r, rank of the shared A and of every task's update (release: 128)
    alpha: float = 256.0  # update scale is alpha / rank (release: 256, scale 2)
    inner_rank: int = 64  # s, rank of each task's inner product P_t Q_t (release: 64)
    dropout: float = 0.05  # dropout on the input of A only (release: 0.05)
    gate_init: Literal["normal"] | float = "normal"  # "normal": g_t ~ N(0, 1) (release), or a fixed gate logit
    stability: Literal["release", "paper", "a_cosine"] = "release"  # what holds the shared basis (docstring)
    lambda_stab: float | None = None  # weight of the paper / a_cosine loss; null: PAPER_LAMBDA / A_COSINE_LAMBDA
    paper_layer_reduce: Literal["mean", "sum"] = "mean"  # paper: combine the layers' L_reg by mean or sum
    paper_detach_sim: bool = True  # paper: sim_t is a constant weight (no gradient through it)
    stability_target: Literal["A", "B0", "both"] = "A"  # a_cosine: the shared matrix it compares
    freeze_shared_b_after_first_task: bool | None = None  # null: as `stability` says (release / a_cosine: true)
    freeze_shared_a: bool = False  # freeze A from the second task on (release: A always trains)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("rank", "inner_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        gate = self.gate_init
        if isinstance(gate, bool) or not (gate == "normal" or (isinstance(gate, (int, float)) and math.isfinite(gate))):
            raise ValueError(f"gate_init must be 'normal' (release) or a finite gate logit, got {gate!r}")
        if not isinstance(gate, str):
            self.gate_init = float(gate)
        if self.stability not in STABILITY:
            raise ValueError(f"stability must be one of {STABILITY}, got {self.stability!r}")
        if self.stability_target not in STABILITY_TARGETS:
            raise ValueError(f"stability_target must be one of {STABILITY_TARGETS}, got {self.stability_target!r}")
        if self.stability == "release" and self.lambda_stab:  # continual-lora <= 0.2: lambda alone meant a_cosine
            warnings.warn(f"lilora: lambda_stab={self.lambda_stab} with stability 'release' (which has no loss) is "
                          "read as stability: a_cosine, the loss it meant up to version 0.2; set `stability: "
                          "a_cosine` (or `paper`) explicitly", ConfigDeprecationWarning, stacklevel=3)
            self.stability = "a_cosine"
        if self.lambda_stab is None:
            self.lambda_stab = {"release": 0.0, "paper": PAPER_LAMBDA, "a_cosine": A_COSINE_LAMBDA}[self.stability]
        self.lambda_stab = float(self.lambda_stab)
        if not math.isfinite(self.lambda_stab) or self.lambda_stab < 0:
            raise ValueError(f"lambda_stab must be a finite number >= 0, got {self.lambda_stab!r}")
        if self.freeze_shared_b_after_first_task is None:
            self.freeze_shared_b_after_first_task = self.stability != "paper"
        if self.stability == "paper" and self.freeze_shared_b_after_first_task:
            raise ValueError("stability 'paper' trains B0 on every task (its loss holds B0 in place): "
                             "freeze_shared_b_after_first_task must be false or null")
        if self.paper_layer_reduce not in ("mean", "sum"):
            raise ValueError(f"paper_layer_reduce must be 'mean' or 'sum', got {self.paper_layer_reduce!r}")
        if (self.stability == "a_cosine" and self.lambda_stab > 0 and self.stability_target in ("B0", "both")
                and self.freeze_shared_b_after_first_task):
            raise ValueError(
                f"stability_target={self.stability_target!r} with freeze_shared_b_after_first_task=True: B0 never "
                "moves after the snapshot, so its part of the loss is a constant; use target 'A' or unfreeze B0"
            )

    def snapshot_names(self) -> tuple[str, ...]:
        """The shared tensors the stability loss compares with a snapshot (none without a loss)."""
        if self.lambda_stab == 0 or self.stability == "release":
            return ()
        if self.stability == "paper":
            return ("B0",)
        return {"A": ("A",), "B0": ("B0",), "both": ("A", "B0")}[self.stability_target]

    def build_branch(self, in_features: int, out_features: int) -> "LiLoRABranch":
        return LiLoRABranch(in_features, out_features, self)

    def link(self, branches: Sequence[AdapterBranch]) -> None:
        """The branches of one model build their B_t together (lilora_up.py)."""
        UpProjections([b for b in branches if isinstance(b, LiLoRABranch)])


class LiLoRABranch(AdapterBranch):
    """Shared ``A`` / ``B0`` owned once per layer; per-task ``P[t]``, ``Q[t]``, ``g[t]``."""

    supports_per_sample = True

    def __init__(self, in_features: int, out_features: int, config: LiLoRAConfig) -> None:
        super().__init__(in_features, out_features)
        self.rank, self.inner_rank = config.rank, config.inner_rank
        self.scale = config.alpha / config.rank
        self.gate_init = config.gate_init
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.A = nn.Parameter(torch.empty(config.rank, in_features))  # (r, in)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B0 = nn.Parameter(torch.zeros(out_features, config.rank))  # (out, r)
        self.P = nn.ParameterDict()  # task -> (out, s)
        self.Q = nn.ParameterDict()  # task -> (s, r)
        self.g = nn.ParameterDict()  # task -> () gate logit
        # snapshots of the shared tensors the stability loss compares with (saved with the adapter);
        # none without a loss, so the release setting stores nothing extra
        self.snapshot_names = config.snapshot_names()
        for name in self.snapshot_names:
            self.register_buffer(f"{name}_prev", getattr(self, name).detach().clone())
        self.ups: UpProjections | None = None  # shared with the model's other branches (set by link)
        self.up_index = 0

    @property
    def tasks(self) -> list[str]:
        return list(self.P.keys())

    def add_task(self, task: str) -> None:
        if task in self.P:
            raise ValueError(f"task {task!r} already exists")
        kw = {"device": self.A.device, "dtype": self.A.dtype}
        q = torch.empty(self.inner_rank, self.rank, **kw)
        nn.init.kaiming_uniform_(q, a=math.sqrt(5))
        g = torch.empty((), **kw)
        if self.gate_init == "normal":
            nn.init.normal_(g)
        else:
            g.fill_(float(self.gate_init))
        self.P[task] = nn.Parameter(torch.zeros(self.out_features, self.inner_rank, **kw))
        self.Q[task] = nn.Parameter(q)
        self.g[task] = nn.Parameter(g)

    def freeze_task(self, task: str, frozen: bool = True) -> None:
        if task not in self.P:
            raise UnknownTaskError(f"unknown task {task!r}; known tasks: {self.tasks}")
        for table in (self.P, self.Q, self.g):
            table[task].requires_grad_(not frozen)

    def up(self, task: str | None = None) -> torch.Tensor:
        """``B_t = sigmoid(g_t) B0 + (1 - sigmoid(g_t)) P_t Q_t``, shape (out, r)."""
        task = self.resolve_task(task)
        gate = torch.sigmoid(self.g[task])
        return gate * self.B0 + (1 - gate) * (self.P[task] @ self.Q[task])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        h = F.linear(self.dropout(x.to(self.A.dtype)), self.A)  # (..., r)
        if self.sample_groups is not None:  # a mixed batch: A is shared, B_t per sample's task
            return self.per_sample(h, lambda rows, task: F.linear(rows, self.up(task))) * self.scale
        up = self.ups.get(self) if self.ups is not None else self.up()  # B_t (out, r)
        return F.linear(h, up) * self.scale

    def delta_weight(self, task: str | None = None) -> torch.Tensor:  # (out, in)
        return (self.up(task) @ self.A) * self.scale

    def lora_factors(self, task: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A, self.up(task) * self.scale  # (r, in), (out, r): lora_A = A, lora_B = (alpha / r) B_t

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the current shared tensors into the ``*_prev`` buffers."""
        for name in self.snapshot_names:
            getattr(self, f"{name}_prev").copy_(getattr(self, name))

    def paper_loss(self, task: str, previous: str, detach_sim: bool = True) -> torch.Tensor:
        """``(1 - cos(vec(P_t Q_t), vec(P_prev Q_prev))) * ||B0 - B0_prev||_F^2`` (scalar)."""
        current = (self.P[task] @ self.Q[task]).flatten()
        before = (self.P[previous] @ self.Q[previous]).detach().flatten()
        sim = F.cosine_similarity(current, before, dim=0)
        if detach_sim:
            sim = sim.detach()
        return (1 - sim) * (self.B0 - self.B0_prev).square().sum()

    def stability_loss(self) -> torch.Tensor:
        """a_cosine: mean over the r basis directions of ``1 - cos`` to the snapshot (scalar)."""
        terms = []
        for name in self.snapshot_names:
            dim = 1 if name == "A" else 0  # rows of A (r, in); columns of B0 (out, r)
            cos = F.cosine_similarity(getattr(self, name), getattr(self, f"{name}_prev"), dim=dim)  # (r,)
            terms.append((1 - cos).mean())
        return torch.stack(terms).mean()

    def parameter_count(self) -> ParamCount:
        per_task = {t: self.P[t].numel() + self.Q[t].numel() + self.g[t].numel() for t in self.tasks}
        return ParamCount(self.A.numel() + self.B0.numel(), per_task)


def lilora_branches(model: nn.Module) -> dict[str, LiLoRABranch]:
    return typed_branches(model, LiLoRABranch)


def stability_loss(model: nn.Module) -> torch.Tensor:
    """Unweighted a_cosine ``L_stab``: the mean over adapted layers of each branch's loss."""
    losses = [b.stability_loss() for b in lilora_branches(model).values()]
    device = losses[0].device
    return sum(loss.to(device) for loss in losses) / len(losses)


def paper_loss(model: nn.Module, task: str, previous: str, reduce: str = "mean",
               detach_sim: bool = True) -> torch.Tensor:
    """Unweighted paper ``L_reg`` of ``task`` against ``previous``: each layer's term, summed or averaged."""
    losses = [b.paper_loss(task, previous, detach_sim) for b in lilora_branches(model).values()]
    device = losses[0].device
    total = sum(loss.to(device) for loss in losses)
    return total / len(losses) if reduce == "mean" else total


@register_method
class LiLoRA(Method):
    """Task-id continual learner: one ``P, Q, g`` per task on a shared ``A, B0`` per layer."""

    name = "lilora"
    config_cls = LiLoRAConfig
    uses_task_id = True
    config: LiLoRAConfig

    def __init__(self, config: LiLoRAConfig | None = None) -> None:
        super().__init__(config)
        self.task_index = -1  # index of the task being trained (-1: none yet)

    def begin_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        found = lilora_branches(model)
        if index >= 1 and task not in next(iter(found.values())).tasks:  # a resumed task keeps its snapshot
            for branch in found.values():
                branch.snapshot()
        open_task(model, found, task)
        for branch in found.values():
            branch.B0.requires_grad_(not (index >= 1 and self.config.freeze_shared_b_after_first_task))
            branch.A.requires_grad_(not (index >= 1 and self.config.freeze_shared_a))
        self.task_index = index

    def loss_terms(self, model: nn.Module, batch: Any = None, context: TaskContext | None = None) -> dict[str, torch.Tensor]:
        config = self.config
        if not config.snapshot_names() or self.task_index < 1:
            return {}
        if config.stability == "paper":
            branch = next(iter(lilora_branches(model).values()))
            task = branch.resolve_task(None)
            previous = branch.tasks[branch.tasks.index(task) - 1]  # tasks are kept in training order
            loss = paper_loss(model, task, previous, config.paper_layer_reduce, config.paper_detach_sim)
        else:
            loss = stability_loss(model)
        return {"stability": config.lambda_stab * loss}

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "task_index": self.task_index}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.task_index = int(state.get("task_index", len(self.trained_tasks) - 1))


def export_peft_lora(
    model: nn.Module,
    task: str,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``task``'s update as a stock peft LoRA adapter directory; return the directory.

    ``lora_A = A`` and ``lora_B = (alpha / r) B_t`` with peft's ``lora_alpha = r`` (scaling 1), so
    ``peft.PeftModel.from_pretrained(base, directory)`` reproduces task ``task`` exactly. The
    writer is the adapter core's :func:`~continual_lora.adapters.save_peft_lora` (any method; fused
    attention included); this name checks that the model carries LiLoRA adapters.
    """
    if not isinstance(getattr(model, CONFIG_ATTR, None), LiLoRAConfig):
        raise ValueError("model carries no LiLoRA adapters (inject a LiLoRAConfig first)")
    return save_peft_lora(model, directory, task, base_model_name_or_path)
