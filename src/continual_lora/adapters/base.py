"""The two abstractions every adapter method builds on.

* :class:`AdapterBranch` is the low-rank path added to one frozen weight ``W0`` (out x in)::

      y = W0 x + b + branch(x)          branch(x) == delta_weight(task) @ x   (up to dropout)

  A branch owns its parameters, keeps per-task state in ``nn.ParameterDict`` /
  ``nn.ModuleDict`` keyed by task name, and knows how to materialise its update
  (``delta_weight``) for merging. The layer wrappers in :mod:`.layers` own the frozen
  ``base_layer`` and call the branch; the branch never touches the base weight itself,
  except through :meth:`AdapterBranch.restore`, which receives it explicitly.

* :class:`AdapterConfig` is the typed description of which modules to adapt and how to
  build a branch for each. Method configs subclass it and register themselves with
  :func:`register_adapter`, so a saved adapter can be rebuilt from its JSON config.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..errors import UserError

_TASK_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed block recomputing its forward):
    branches that record statistics in forward (votes, balance terms) must not record them twice."""
    if torch.compiler.is_compiling():  # a compiled forward is traced once and never re-run by the backward
        return False
    return torch._C._current_graph_task_id() != -1


class UnknownTaskError(KeyError):
    """Raised when a task id is not (yet) known to an adapter."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class ExportError(UserError, ValueError):
    """A model, method or run cannot be exported in the asked format; the message says why and what to use."""


def check_task_name(task: str) -> str:
    if not isinstance(task, str) or not _TASK_NAME.match(task):
        raise ValueError(
            f"task name {task!r} must be a non-empty string of letters, digits, '_' or '-' "
            "(it becomes a key of nn.ModuleDict / safetensors)"
        )
    return task


@dataclass(frozen=True)
class ParamCount:
    """Parameter numbers of one branch: ``shared`` across tasks, and owned per task."""

    shared: int = 0
    per_task: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: "ParamCount") -> "ParamCount":
        per_task = dict(self.per_task)
        for task, n in other.per_task.items():
            per_task[task] = per_task.get(task, 0) + n
        return ParamCount(self.shared + other.shared, per_task)


class AdapterBranch(nn.Module):
    """Low-rank update of one weight of shape ``(out_features, in_features)``.

    Subclasses implement :meth:`forward`, :meth:`delta_weight`, :meth:`add_task`,
    :attr:`tasks` and :meth:`parameter_count`; branches whose update is a low-rank product also
    implement :meth:`lora_factors` (what a stock peft LoRA adapter stores).

    ``seq_dim`` says where tokens run in the input the branch sees: 1 for ``(B, L, D)``
    (transformers), 0 for ``(L, B, D)`` (OpenAI CLIP's residual stream), ``None`` when the
    input has no token axis. Only branches that route on a token (Rank-1 pool) read it.
    """

    supports_per_sample: ClassVar[bool] = False  # forward can run each sample through its own task

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.active_task: str | None = None
        self.seq_dim: int | None = 1
        # a mixed batch (use_sample_tasks): (task, positions of its samples) per task, and the batch size
        self.sample_groups: list[tuple[str, torch.Tensor]] | None = None
        self.sample_count = 0

    # --- to implement -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        raise NotImplementedError

    def delta_weight(self, task: str | None = None) -> torch.Tensor:  # (out, in)
        raise NotImplementedError

    def add_task(self, task: str) -> None:
        raise NotImplementedError

    @property
    def tasks(self) -> list[str]:
        raise NotImplementedError

    def parameter_count(self) -> ParamCount:
        raise NotImplementedError

    def lora_factors(self, task: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``task``'s update as one LoRA product with every scale folded into B::

            A: (k, in),  B: (out, k),  B @ A == delta_weight(task)

        so a stock peft LoRA with ``lora_alpha = r`` (scaling 1) reproduces it. Branches whose
        update is not such a product (it depends on the input, say) raise :class:`ExportError`.
        """
        raise ExportError(f"{type(self).__name__}: the update is not a low-rank product A, B that a peft LoRA "
                          "can hold; export the merged model (format hf) instead")

    # --- shared behaviour ---------------------------------------------------------------
    def resolve_task(self, task: str | None) -> str:
        """The task to use: ``task`` or the active one; an unknown id is an error."""
        task = self.active_task if task is None else task
        if task is None:
            raise UnknownTaskError(
                f"no task selected; call set_task(model, name) first (known tasks: {self.tasks})"
            )
        if task not in self.tasks:
            raise UnknownTaskError(f"unknown task {task!r}; known tasks: {self.tasks}")
        return task

    def set_task(self, task: str | None) -> None:
        if task is not None:
            self.resolve_task(task)
        self.active_task = task

    def per_sample(self, x: torch.Tensor, fn: Callable[[torch.Tensor, str], torch.Tensor]) -> torch.Tensor:
        """A mixed batch: ``fn(rows of x, task)`` for each task's samples (``sample_groups``), put back in
        place. The batch axis is the one beside the token axis (``seq_dim``), or axis 0."""
        batch_dim = 1 if self.seq_dim == 0 else 0
        if x.shape[batch_dim] != self.sample_count:
            raise ValueError(f"a mixed batch of {self.sample_count} samples (use_sample_tasks) got an input with "
                             f"{x.shape[batch_dim]} on axis {batch_dim}: run only that batch inside the block")
        out: torch.Tensor | None = None
        for task, rows in self.sample_groups or ():
            rows = rows.to(x.device)
            y = fn(x.index_select(batch_dim, rows), task)
            if out is None:
                shape = list(y.shape)
                shape[batch_dim] = self.sample_count
                out = y.new_zeros(shape)
            out.index_copy_(batch_dim, rows, y)
        assert out is not None
        return out

    def restore(self, base_weight: torch.Tensor) -> None:
        """Called after a saved state is loaded; may fold recorded updates into ``base_weight``.

        Branches whose update lives only in their own parameters do nothing.
        """


@dataclass
class AdapterConfig:
    """Where to put adapters. Method configs subclass this and add their hyper-parameters."""

    method: ClassVar[str] = ""
    # module names to adapt: a list of name suffixes ("q_proj" matches "...attn.q_proj"), or one regex
    targets: Sequence[str] | str = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    # names (suffixes) or a regex of modules never to adapt, even when a target matches
    exclude: Sequence[str] | str = ()
    # token axis of the input that nn.Linear layers see: 1 = (B, L, D), 0 = (L, B, D)
    seq_dim: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.targets, (list, tuple)):
            self.targets = tuple(self.targets)
            if not self.targets:
                raise ValueError("targets: give at least one module name or a regex")
        if isinstance(self.exclude, (list, tuple)):
            self.exclude = tuple(self.exclude)
        if self.seq_dim not in (0, 1):
            raise ValueError(f"seq_dim must be 0 (L, B, D) or 1 (B, L, D), got {self.seq_dim}")

    def build_branch(self, in_features: int, out_features: int) -> AdapterBranch:
        raise NotImplementedError

    def link(self, branches: Sequence[AdapterBranch]) -> None:
        """Called by :func:`inject_adapters` with every branch it built for one model (model order), for
        branches that share work across weights (LiLoRA builds all its B_t together). Default: nothing."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return {"method": self.method, **out}


ADAPTER_CONFIGS: dict[str, type[AdapterConfig]] = {}


def register_adapter(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make a config loadable from a saved ``adapter_config.json``."""
    if not cls.method:
        raise ValueError(f"{cls.__name__}.method must name the method")
    ADAPTER_CONFIGS[cls.method] = cls
    return cls


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    data = dict(data)
    method = data.pop("method", None)
    if method not in ADAPTER_CONFIGS:
        raise ValueError(f"unknown adapter method {method!r}; known: {sorted(ADAPTER_CONFIGS)}")
    cls = ADAPTER_CONFIGS[method]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{method}: unknown config keys {unknown}")
    return cls(**data)
