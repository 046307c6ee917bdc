"""Task routers: which task's adapter a task-id method (LiLoRA, per-task LoRA) uses for a sample
when no task id is given (X-TAIL, deployment). The release of LiLoRA has none (an unknown id gets
fresh random factors); this is this project's extension.

``prototype`` (default when a router is asked for): at the end of task t, the frozen base model's
features f of (up to ``router_samples`` of) its training inputs are kept as statistics: their
count n_t, mean mu_t, and the within-task scatter sum_i (f_i - mu_t)(f_i - mu_t)^T pooled over the
tasks seen. A test sample goes to

    cosine:       argmax_t  cos(f, mu_t)
    mahalanobis:  argmin_t  (f - mu_t)^T S^-1 (f - mu_t),   S = (1 - a) W / (N - T) + a (tr(W / (N - T)) / D) I

(W the pooled scatter, N the samples kept, T the tasks, a = ``router_shrinkage``): nearest class
mean with one shared covariance, shrunk towards a scaled identity so that a few shots per task
still give an invertible S. For CLIP the features are the unit image embeddings; for LLaVA the
unit pooled output of the vision tower.

``confidence``: no statistics; each sample is scored through every trained task's adapter over that
task's own classes and goes to the task with the highest maximum softmax probability (T forward
passes per batch: for short streams; CLIP classification only).

The routed forward is one mixed batch (``adapters.use_sample_tasks``): sample n runs through the
adapter of its task.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters import disable_adapters, use_sample_tasks, use_task
from ..contract import Routing

ROUTERS = ("none", "prototype", "confidence", "oracle")  # oracle: X-TAIL with the true id (a bound, not a router)
ROUTED = ("prototype", "confidence")  # the modes that pick a task per sample
ROUTER_FILE = "router.safetensors"


@dataclass
class RouterConfig:
    """Config keys of a task-id method's task router: a mixin listed before the adapter config
    (``class LiLoRAConfig(RouterConfig, AdapterConfig)``)."""

    task_router: Literal["none", "prototype", "confidence", "oracle"] = "none"  # no id at evaluation: none = last task's adapter
    router_metric: Literal["cosine", "mahalanobis"] = "mahalanobis"  # prototype: distance to the task means
    router_shrinkage: float = 0.1  # prototype mahalanobis: weight of the scaled identity in the covariance
    router_samples: int | None = 2048  # prototype: training inputs per task whose features are kept (null: all)
    route: Literal["xtail", "all"] = "xtail"  # where the router replaces the task id: X-TAIL only, or every evaluation

    def __post_init__(self) -> None:
        getattr(super(), "__post_init__", lambda: None)()
        if self.task_router not in ROUTERS:
            raise ValueError(f"task_router must be one of {ROUTERS}, got {self.task_router!r}")
        if self.router_metric not in ("cosine", "mahalanobis"):
            raise ValueError(f"router_metric must be 'cosine' or 'mahalanobis', got {self.router_metric!r}")
        if self.route not in ("xtail", "all"):
            raise ValueError(f"route must be 'xtail' or 'all', got {self.route!r}")
        if not 0.0 < self.router_shrinkage <= 1.0:  # > 0: the covariance stays invertible with few samples
            raise ValueError(f"router_shrinkage must be in (0, 1], got {self.router_shrinkage!r}")
        if self.router_samples is not None and self.router_samples <= 0:
            raise ValueError(f"router_samples must be > 0 or null, got {self.router_samples!r}")


class PrototypeRouter:
    """Per-task feature means and a pooled within-task scatter (float64, on the CPU)."""

    def __init__(self, metric: str = "mahalanobis", shrinkage: float = 0.1) -> None:
        self.metric, self.shrinkage = metric, shrinkage
        self.means: dict[str, torch.Tensor] = {}  # task -> (D,)
        self.counts: dict[str, int] = {}
        self.scatter: torch.Tensor | None = None  # (D, D): sum over tasks of their centred scatter
        self._precision: torch.Tensor | None = None  # cached inverse covariance

    @property
    def tasks(self) -> list[str]:
        return list(self.means)

    def observe(self, task: str, features: torch.Tensor) -> None:
        """Keep task ``task``'s statistics from its (N, D) features."""
        if task in self.means:
            raise ValueError(f"the router already holds task {task!r}")
        if len(features) == 0:
            raise ValueError(f"task {task!r}: no features to route on")
        f = features.detach().to("cpu", torch.float64)
        mean = f.mean(dim=0)
        centred = f - mean
        scatter = centred.t() @ centred
        self.scatter = scatter if self.scatter is None else self.scatter + scatter
        self.means[task], self.counts[task] = mean, len(f)
        self._precision = None

    def covariance(self) -> torch.Tensor:
        """The shrunk pooled within-task covariance S (D, D)."""
        assert self.scatter is not None
        dof = max(sum(self.counts.values()) - len(self.counts), 1)
        pooled = self.scatter / dof
        d = pooled.shape[0]
        scale = pooled.trace() / d
        if not scale > 0:  # no within-task spread at all (one sample per task): the identity's scale
            scale = torch.ones((), dtype=pooled.dtype)
        return (1 - self.shrinkage) * pooled + self.shrinkage * scale * torch.eye(d, dtype=pooled.dtype)

    def distances(self, features: torch.Tensor, tasks: Sequence[str]) -> torch.Tensor:
        """(N, T) distance of each sample to each task of ``tasks`` (smaller = nearer)."""
        f = features.detach().to("cpu", torch.float64)
        means = torch.stack([self.means[t] for t in tasks])  # (T, D)
        if self.metric == "cosine":
            return -torch.nn.functional.normalize(f, dim=-1) @ torch.nn.functional.normalize(means, dim=-1).t()
        if self._precision is None:
            self._precision = torch.linalg.inv(self.covariance())
        diff = f[:, None, :] - means[None, :, :]  # (N, T, D)
        return torch.einsum("ntd,de,nte->nt", diff, self._precision, diff)

    def assign(self, features: torch.Tensor, tasks: Sequence[str]) -> torch.Tensor:
        """(N,) index into ``tasks`` of each sample's nearest task, on the features' device."""
        return self.distances(features, tasks).argmin(dim=1).to(features.device)

    # --- persistence ---------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        out = {f"mean.{t}": m for t, m in self.means.items()}
        out.update({f"count.{t}": torch.tensor(n) for t, n in self.counts.items()})
        if self.scatter is not None:
            out["scatter"] = self.scatter
        return out

    def save(self, directory: str | Path, tasks: Sequence[str]) -> None:
        """Write the statistics (tasks in ``tasks`` order, recorded in the metadata)."""
        state = {k: v.contiguous() for k, v in self.state().items()}
        save_file(state, str(Path(directory) / ROUTER_FILE), metadata={"tasks": "\n".join(tasks)})

    def load(self, directory: str | Path) -> None:
        path = Path(directory) / ROUTER_FILE
        state = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            tasks = [t for t in (handle.metadata() or {}).get("tasks", "").split("\n") if t]
        self.means = {t: state[f"mean.{t}"] for t in tasks}
        self.counts = {t: int(state[f"count.{t}"]) for t in tasks}
        self.scatter = state.get("scatter")
        self._precision = None


class MethodRouting(Routing):
    """The :class:`~continual_lora.contract.Routing` of a task-id method over its trained tasks."""

    def __init__(self, model: nn.Module, tasks: Sequence[str], mode: str, router: PrototypeRouter | None) -> None:
        super().__init__()
        self.model, self.tasks, self.mode, self.router = model, list(tasks), mode, router  # type: ignore[assignment]

    def base(self) -> AbstractContextManager[None]:
        return disable_adapters(self.model)

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            raise RuntimeError("confidence routing has no prototypes to assign by")
        return self.router.assign(features, self.tasks)

    def task(self, name: str) -> AbstractContextManager[None]:
        return use_task(self.model, name)

    def per_sample(self, index: torch.Tensor) -> AbstractContextManager[None]:
        return use_sample_tasks(self.model, [self.tasks[i] for i in index.tolist()])


def task_id_accuracy(per_rank: Sequence[dict[str, list[int]]]) -> dict[str, float]:
    """Task-identification accuracy (percent) per task from each rank's [routed right, samples] counts."""
    total: dict[str, list[int]] = {}
    for counts in per_rank:
        for task, (hits, n) in counts.items():
            entry = total.setdefault(task, [0, 0])
            entry[0] += hits
            entry[1] += n
    return {task: 100.0 * hits / n for task, (hits, n) in total.items() if n}

