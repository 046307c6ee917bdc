"""LiLoRA, "LoRA in LoRA" (Che et al., arXiv 2508.06202): a shared A, a shared basis B0, and a
second, inner low-rank product per task for the up-projection.

For one frozen weight ``W0`` (out x in) and task t::

    B_t  = sigmoid(g_t) * B0 + (1 - sigmoid(g_t)) * P_t Q_t              # (out, r)
    y    = W0 x + b + (alpha / r) * B_t (A dropout(x))                  # never builds (out, in)
    dW_t = (alpha / r) * B_t A                                           # for merging / export

    shared:    A (r x in), B0 (out x r)                 r * (in + out) per layer
    per task:  P_t (out x s), Q_t (s x r), g_t scalar   s * (out + r) + 1 per layer

Initialisation (release): A and Q_t kaiming-uniform (a = sqrt(5)), B0 = 0, P_t = 0, and
g_t ~ N(0, 1) (``gate_init="normal"``) or a fixed logit. Schedule: task 0 trains A, B0 and its
own factors; every later task trains A (unless ``freeze_shared_a``) and its own P, Q, g; B0 is
frozen from the second task on (``freeze_shared_b_after_first_task``, the release's only
stability device); earlier tasks' factors never change again.

Cosine stability loss (paper; absent from the release, formula not published, so this is an
explicit choice): with M the shared matrix named by ``stability_target`` and M_prev its snapshot
taken when task t >= 1 begins,

    L_stab = mean over layers of mean over the r basis directions k of (1 - cos(M_k, M_prev_k))

where the basis directions are the rows of A and the columns of B0 ("both" averages the two
terms). A zero direction has cosine 0 (torch's eps), so it adds a constant 1 and no gradient.
The method returns ``{"stability": lambda_stab * L_stab}`` for t >= 1; ``lambda_stab = 0`` is
the release.

Each task's update is a plain rank-r LoRA (``scale * B_t``, ``A``): :func:`export_peft_lora`
writes it as a stock peft adapter directory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..adapters import AdapterBranch, AdapterConfig, ParamCount, UnknownTaskError
from ..adapters.inject import CONFIG_ATTR, adapted_layers
from ..adapters.layers import AdaptedLinear
from ..contract import TaskContext
from .base import Method, open_task, register_method, typed_branches
from .lilora_up import UpProjections

STABILITY_TARGETS = ("A", "B0", "both")


@dataclass
class LiLoRAConfig(AdapterConfig):
    rank: int = 128  # r, rank of the shared A and of every task's update (release: 128)
    alpha: float = 256.0  # update scale is alpha / rank (release: 256, scale 2)
    inner_rank: int = 64  # s, rank of each task's inner product P_t Q_t (release: 64)
    dropout: float = 0.05  # dropout on the input of A only (release: 0.05)
    gate_init: Literal["normal"] | float = "normal"  # "normal": g_t ~ N(0, 1) (release), or a fixed gate logit
    freeze_shared_b_after_first_task: bool = True  # B0 trains on the first task only (release)
    freeze_shared_a: bool = False  # freeze A from the second task on (release: A always trains)
    stability_target: Literal["A", "B0", "both"] = "A"  # shared matrix of the cosine stability loss: "A", "B0" or "both"
    lambda_stab: float = 0.0  # weight of the stability loss for tasks t >= 1 (0 = release)

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
        if self.stability_target not in STABILITY_TARGETS:
            raise ValueError(f"stability_target must be one of {STABILITY_TARGETS}, got {self.stability_target!r}")
        if not math.isfinite(self.lambda_stab) or self.lambda_stab < 0:
            raise ValueError(f"lambda_stab must be a finite number >= 0, got {self.lambda_stab!r}")
        if self.lambda_stab > 0 and self.stability_target == "B0" and self.freeze_shared_b_after_first_task:
            raise ValueError(
                "stability_target='B0' with freeze_shared_b_after_first_task=True: B0 never moves after the "
                "snapshot, so the loss is constant; use target 'A' or unfreeze B0"
            )

    def build_branch(self, in_features: int, out_features: int) -> "LiLoRABranch":
        return LiLoRABranch(in_features, out_features, self)

    def link(self, branches: Sequence[AdapterBranch]) -> None:
        """The branches of one model build their B_t together (lilora_up.py)."""
        UpProjections([b for b in branches if isinstance(b, LiLoRABranch)])


class LiLoRABranch(AdapterBranch):
    """Shared ``A`` / ``B0`` owned once per layer; per-task ``P[t]``, ``Q[t]``, ``g[t]``."""

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
        # none at lambda_stab = 0, so the release setting stores nothing extra
        targets = {"A": ("A",), "B0": ("B0",), "both": ("A", "B0")}[config.stability_target]
        self.snapshot_names = targets if config.lambda_stab > 0 else ()
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
        up = self.ups.get(self) if self.ups is not None else self.up()  # B_t (out, r)
        return F.linear(h, up) * self.scale

    def delta_weight(self, task: str | None = None) -> torch.Tensor:  # (out, in)
        return (self.up(task) @ self.A) * self.scale

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the current shared tensors into the ``*_prev`` buffers."""
        for name in self.snapshot_names:
            getattr(self, f"{name}_prev").copy_(getattr(self, name))

    def stability_loss(self) -> torch.Tensor:
        """Mean over the r basis directions of ``1 - cos`` to the snapshot (scalar)."""
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
    """Unweighted ``L_stab``: the mean over adapted layers of each branch's stability loss."""
    losses = [b.stability_loss() for b in lilora_branches(model).values()]
    device = losses[0].device
    return sum(loss.to(device) for loss in losses) / len(losses)


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
        if self.config.lambda_stab == 0 or self.task_index < 1:
            return {}
        return {"stability": self.config.lambda_stab * stability_loss(model)}

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "task_index": self.task_index}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.task_index = int(state.get("task_index", len(self.trained_tasks) - 1))


@torch.no_grad()
def export_peft_lora(
    model: nn.Module,
    task: str,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``task``'s update as a stock peft LoRA adapter directory; return the directory.

    ``lora_A = A`` and ``lora_B = (alpha / r) B_t`` with peft's ``lora_alpha = r`` (scaling 1), so
    ``peft.PeftModel.from_pretrained(base, directory)`` reproduces task ``task`` exactly.
    Only ``nn.Linear`` targets can be exported (peft adapts ``nn.MultiheadAttention`` differently).
    """
    config = getattr(model, CONFIG_ATTR, None)
    if not isinstance(config, LiLoRAConfig):
        raise ValueError("model carries no LiLoRA adapters (inject a LiLoRAConfig first)")
    layers = adapted_layers(model)
    unsupported = sorted(name for name, layer in layers.items() if not isinstance(layer, AdaptedLinear))
    if unsupported:
        raise NotImplementedError(
            f"peft export supports nn.Linear targets only; these are nn.MultiheadAttention slots: {unsupported[:5]}"
        )
    state: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        branch = layer.adapter
        assert isinstance(branch, LiLoRABranch)
        prefix = f"base_model.model.{name}"
        state[f"{prefix}.lora_A.weight"] = branch.A.detach().float().cpu().contiguous()  # (r, in)
        state[f"{prefix}.lora_B.weight"] = (branch.up(task) * branch.scale).float().cpu().contiguous()  # (out, r)
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.rank,  # scaling alpha / r = 1: the LiLoRA scale is folded into lora_B
        "lora_dropout": config.dropout,
        "target_modules": sorted(layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return out
