"""Rank-1 Expert Pool in a single LoRA (Fa et al., arXiv 2601.22828, AAAI 2026; release Fazhan-cs/DAC).

One rank-r LoRA ``dW = s B A`` (``s = alpha / r``) is a pool of r rank-1 experts ``b_i a_i^T``
(``b_i`` = column i of B, ``a_i`` = row i of A). For one adapted frozen weight ``W0`` (out x in)::

    p_n = softmax(router(x_n[token]))          (N, r)  one router per layer: Linear(in, r)
    v_n = one-hot of the top-R entries of p_n  (N, r)  per-sample votes
    m   = the R experts with most votes        (R,)    sum_n v_n; ties -> lowest index
    y   = W0 x + b + s * B[:, m] (A[m, :] dropout(x))  (low rank: dW is never built)

computed as ``y = W0 x + b + B (mult * (A dropout(x)))`` with ``mult = s * 1[i in m]`` (r,): a mask
multiply on the full rank-r factors instead of gathering rows and columns (unchosen experts still
add exact zeros and get exactly zero gradient). Steps 2-3 and the mask are one fused operator
after the router's softmax (``rank1_kernels.py``: ATen everywhere, one Triton kernel on CUDA), and the
AGO loss of all layers is a few batched operators per group of equal shapes (same file).

``counts`` add up ``sum_n v_n`` over a task (training mode only). From the second task on the
AGO loss pushes the current critical experts ``C`` (top-k by counts) away from past columns ``P``::

    L_orth = (1 / #layers) sum_layers sum_{i in C, j in P} |b_i . p_j|     (P detached)
    L      = L_task + lambda * L_orth

At the end of task t: ``S`` = top-k experts by counts, ``W0 <- W0 + s B[:, S] A[S, :]``, the record
``(A[S, :], B[:, S], S, counts)`` is kept and A, B, router and counts are re-initialised. Inference
is the plain model: no router, no extra module, no task id.

Export to stock peft (``lora_factors``): task t's merged experts are one rank-k LoRA with
``lora_A = A[S_t, :]``, ``lora_B = s B[:, S_t]`` and scaling 1, so applying the tasks' adapters in
training order to the base model (merging each) adds ``sum_t s B[:, S_t] A[S_t, :]`` = the merged model.

Options (default first):
* ``router_mode``: ``"vote"`` (release) uses the router only through top-R indices, so it gets no
  gradient and stays at its random init. ``"learned"`` (extension) scales each selected expert's
  output by its batch-mean router probability ``g_i = mean_n p_n,i`` so the router learns; the
  merge still adds the *unweighted* experts, so in this mode the merged model is not exactly the
  function that was trained (g changes per batch; a straight-through gate would avoid that).
* ``ago_past``: ``"merged"`` (paper) uses the merged columns ``B[:, S]`` of earlier tasks; ``"all"``
  uses every column of their B (what the release runs, through a key bug), so each record then
  also keeps the full B (out x r).
Release differences kept out: it routes on the dropped-out input (here the router reads the
clean input) and infers the batch size from 197 / 77 tokens (here any sequence length works).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..adapters import (
    AdapterBranch,
    AdapterConfig,
    ParamCount,
    config_from_dict,
    inject_adapters,
    read_adapter_config,
    read_adapter_tensors,
    sites,
    unload,
)
from ..adapters.base import check_task_name, in_backward
from ..adapters.inject import CONFIG_ATTR, branches
from ..contract import TaskContext
from .base import Method, register_method, typed_branches
from .rank1_kernels import ago_total, rank1_mask, rank1_route, rank1_votes


@dataclass
class Rank1PoolConfig(AdapterConfig):
    rank: int = 12  # r, rank-1 experts per adapted weight
    top_r: int = 8  # R, experts each sample votes for and experts a batch uses
    merge_k: int | None = None  # k, experts merged per task and AGO's critical set; None -> R // 2
    alpha: float = 1.0  # update scale alpha / rank
    dropout: float = 0.2  # dropout on the branch input only (the router reads the clean input)
    router_mode: Literal["vote", "learned"] = "vote"  # "vote" (release: router never trained) or "learned" (extension)
    routing_token: int | Literal["mean"] = 0  # token index along seq_dim the router reads, or "mean" pooling
    ago_lambda: float = 0.1  # weight lambda of the AGO loss
    ago_past: Literal["merged", "all"] = "merged"  # AGO past columns: "merged" (paper) or "all" (release)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.top_r, bool) or not isinstance(self.top_r, int) or not 1 <= self.top_r <= self.rank:
            raise ValueError(f"top_r must be an integer in [1, rank={self.rank}], got {self.top_r!r}")
        if self.merge_k is None:
            self.merge_k = self.top_r // 2
        if isinstance(self.merge_k, bool) or not isinstance(self.merge_k, int) or not 1 <= self.merge_k <= self.rank:
            raise ValueError(f"merge_k must be an integer in [1, rank={self.rank}] (None: top_r // 2), "
                             f"got {self.merge_k!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.router_mode not in ("vote", "learned"):
            raise ValueError(f"router_mode must be 'vote' or 'learned', got {self.router_mode!r}")
        token = self.routing_token
        if token != "mean" and (isinstance(token, bool) or not isinstance(token, int)):
            raise ValueError(f"routing_token must be a token index (int) or 'mean', got {self.routing_token!r}")
        if self.ago_lambda < 0:
            raise ValueError(f"ago_lambda must be >= 0, got {self.ago_lambda!r}")
        if self.ago_past not in ("merged", "all"):
            raise ValueError(f"ago_past must be 'merged' or 'all', got {self.ago_past!r}")

    def build_branch(self, in_features: int, out_features: int) -> "Rank1PoolBranch":
        return Rank1PoolBranch(in_features, out_features, self)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _ranked(t: torch.Tensor) -> torch.Tensor:
    """Indices along the last dim, largest first; equal values keep the lower index first."""
    return torch.sort(t, dim=-1, descending=True, stable=True).indices


class TaskRecord(nn.Module):
    """One finished task of one weight: ``A[S]`` (k, in), ``B[:, S]`` (out, k), ``S`` (k,), ``counts`` (r,),
    and with ``ago_past="all"`` the full ``B_all`` (out, r). Buffers, so state_dict / safetensors see them."""

    def __init__(self, k: int, r: int, in_f: int, out_f: int, keep_all: bool, like: torch.Tensor) -> None:
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.register_buffer("A", torch.zeros(k, in_f, **kw))
        self.register_buffer("B", torch.zeros(out_f, k, **kw))
        self.register_buffer("S", torch.zeros(k, dtype=torch.long, device=like.device))
        self.register_buffer("counts", torch.zeros(r, dtype=torch.long, device=like.device))
        if keep_all:
            self.register_buffer("B_all", torch.zeros(out_f, r, **kw))


class Rank1PoolBranch(AdapterBranch):
    """The current pool ``lora_A`` (r, in), ``lora_B`` (out, r), ``router`` and ``counts``, plus the
    finished tasks' :class:`TaskRecord` s in ``records`` (keyed by task, in training order)."""

    def __init__(self, in_features: int, out_features: int, config: Rank1PoolConfig) -> None:
        super().__init__(in_features, out_features)
        self.rank, self.top_r, self.merge_k = config.rank, config.top_r, int(config.merge_k)
        self.scale = config.alpha / config.rank
        self.router_mode, self.routing_token = config.router_mode, config.routing_token
        self.keep_all_columns = config.ago_past == "all"
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(config.rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.rank))
        self.router = nn.Linear(in_features, config.rank)
        self.register_buffer("counts", torch.zeros(config.rank, dtype=torch.long))
        self.records = nn.ModuleDict()
        self.forced_mask: torch.Tensor | None = None  # set: these experts, unweighted; no routing or counting
        self._folded: set[str] = set()  # tasks already added to the base weight in this process
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Fresh pool for a new task: A kaiming-uniform, B = 0, new router, zero counts."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B.zero_()
        self.router.reset_parameters()
        self.counts.zero_()

    # --- routing and forward --------------------------------------------------------------
    def routing_input(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (N, in): the routing token along ``seq_dim`` (2-D inputs route on each row)."""
        if x.dim() > 2:
            if self.seq_dim is None:
                raise ValueError("rank1_pool needs a token axis (seq_dim) for inputs with more than 2 dims")
            x = x.mean(self.seq_dim) if self.routing_token == "mean" else x.select(self.seq_dim, self.routing_token)
        return x.reshape(-1, self.in_features)

    def _route(self, x: torch.Tensor, count: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(multiplier (r,): ``scale`` on the batch's experts, 0 elsewhere; probabilities (N, r); votes (r,)).
        ``count``: add the votes to ``counts``. One fused operator after the router (rank1_kernels.py)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.router_mode == "learned"):
            token = self.routing_input(x).to(self.router.weight.dtype)
            probs = self.router(token).softmax(dim=-1)  # (N, r)
        if self.training and _distributed():
            # every rank must pick the same experts (and count the same votes) or the replicas'
            # updates, and later the merged sets S, would differ between ranks. Training only:
            # evaluation scores a different shard (and number of batches) on each rank
            votes = rank1_votes(probs.detach(), self.top_r)
            dist.all_reduce(votes)
            return rank1_mask(votes, self.counts, self.top_r, self.scale, count, dtype), probs, votes
        multiplier, votes = rank1_route(probs.detach(), self.counts, self.top_r, self.scale, count, dtype)
        return multiplier, probs, votes

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch mask ``m`` (R,) ascending, router probabilities (N, r) and per-expert votes (r,); counts nothing."""
        multiplier, probs, votes = self._route(x, count=False, dtype=torch.float32)
        return multiplier.nonzero().flatten(), probs, votes

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        h = F.linear(self.dropout(x), self.lora_A)  # (..., r)
        # under fp16 / bf16 autocast the multiplier stays fp32: scale = alpha / r rounded to bf16 would be
        # off by up to 0.4 % (1/12 -> 0.0835); the second linear casts the product down once
        dtype = torch.float32 if h.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(h.device.type) else h.dtype
        if self.forced_mask is not None:
            mask = self.forced_mask.to(h.device)
            multiplier = torch.zeros(self.rank, dtype=dtype, device=h.device).index_fill_(0, mask, self.scale)
        else:  # gradient checkpointing re-runs forward in backward: count once
            multiplier, probs, _ = self._route(x, self.training and not in_backward(), dtype)
            if self.router_mode == "learned":  # batch-mean probability of each chosen expert
                multiplier = multiplier * probs.mean(0).to(dtype)
        return F.linear(h * multiplier, self.lora_B)  # (..., out): scale * B[:, m] A[m, :] x

    # --- experts, records, merge ----------------------------------------------------------
    def merge_set(self) -> torch.Tensor:
        """S: the top-k experts by this task's counts (ties -> lowest index), ascending."""
        return _ranked(self.counts)[: self.merge_k].sort().values

    @property
    def tasks(self) -> list[str]:
        return list(self.records.keys())

    def add_task(self, task: str) -> None:
        """An empty record for ``task`` (filled by :meth:`commit` or by ``load_state_dict``)."""
        check_task_name(task)
        if task in self.records:
            raise ValueError(f"task {task!r} already has a record")
        self.records[task] = TaskRecord(self.merge_k, self.rank, self.in_features, self.out_features,
                                        self.keep_all_columns, self.lora_A)

    def delta_weight(self, task: str | None = None) -> torch.Tensor:  # (out, in)
        """``task=None``: what merging the current pool would add; else the recorded task's update."""
        if task is None:
            s = self.merge_set()
            b, a = self.lora_B[:, s], self.lora_A[s]
        else:
            record = self.records[self.resolve_task(task)]
            b, a = record.B, record.A
        return (b @ a) * self.scale

    def lora_factors(self, task: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A recorded task's merged experts as a rank-k LoRA: ``A[S, :]`` (k, in), ``s B[:, S]`` (out, k)."""
        if task is None:
            s = self.merge_set()
            return self.lora_A[s], self.lora_B[:, s] * self.scale
        record = self.records[self.resolve_task(task)]
        return record.A, record.B * self.scale

    @torch.no_grad()
    def commit(self, task: str, base_weight: torch.Tensor) -> None:
        """End of task: record the top-k experts, fold them into ``base_weight``, reset the pool."""
        self.add_task(task)
        record, s = self.records[task], self.merge_set()
        record.A.copy_(self.lora_A[s])
        record.B.copy_(self.lora_B[:, s])
        record.S.copy_(s)
        record.counts.copy_(self.counts)
        if self.keep_all_columns:
            record.B_all.copy_(self.lora_B)
        base_weight.add_(self.delta_weight(task).to(base_weight.dtype))
        self._folded.add(task)
        self.reset()

    @torch.no_grad()
    def restore(self, base_weight: torch.Tensor) -> None:
        """Replay the records (in task order) not yet in ``base_weight``: ``W0 += s B_S A_S``."""
        for task in self.tasks:
            if task not in self._folded:
                base_weight.add_(self.delta_weight(task).to(base_weight.dtype))
                self._folded.add(task)

    def past_columns(self) -> torch.Tensor | None:
        """(out, P) columns of earlier tasks that AGO keeps the current experts away from."""
        cols = [r.B_all if self.keep_all_columns else r.B for r in self.records.values()]
        return torch.cat(cols, dim=1) if cols else None

    def parameter_count(self) -> ParamCount:
        trainable = self.lora_A.numel() + self.lora_B.numel() + sum(p.numel() for p in self.router.parameters())
        per_task = {t: sum(v.numel() for k, v in r.state_dict().items() if k in ("A", "B", "B_all"))
                    for t, r in self.records.items()}
        return ParamCount(trainable, per_task)


@contextlib.contextmanager
def forcing_merge_mask(model: nn.Module) -> Iterator[None]:
    """Inside the block every branch uses exactly its merge set S (what :meth:`commit` would add)."""
    pool = _pool(model)
    for branch in pool:
        branch.forced_mask = branch.merge_set()
    try:
        yield
    finally:
        for branch in pool:
            branch.forced_mask = None


def _pool(model: nn.Module) -> list[Rank1PoolBranch]:
    return list(typed_branches(model, Rank1PoolBranch).values())


@register_method
class Rank1Pool(Method):
    """Train one pool per task, AGO from the second task on, merge the top-k experts at its end."""

    name = "rank1_pool"
    config_cls = Rank1PoolConfig
    uses_task_id = False
    peft_chain = True  # the final model is W0 plus every task's merged experts

    def begin_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        for branch in _pool(model):
            branch.reset()

    def loss_terms(self, model: nn.Module, batch: object = None, context: TaskContext | None = None) -> dict[str, torch.Tensor]:
        pool = _pool(model)
        if not any(b.tasks for b in pool):
            return {"ago": pool[0].lora_B.new_zeros(())}
        return {"ago": self.config.ago_lambda * ago_total(pool) / len(pool)}

    def end_task(self, model: nn.Module, task: str, index: int, context: TaskContext | None = None) -> None:
        for _, branch, weight in sites(model):
            branch.commit(task, weight)  # type: ignore[attr-defined]
        super().end_task(model, task, index, context)

    def prepare_inference(self, model: nn.Module, task: str | None = None) -> nn.Module:
        """The plain model: every finished task is already in W0, the in-progress pool is dropped."""
        return unload(model, merge=False)

    def peft_adapters(self, model: nn.Module) -> dict[str, str | None]:
        """One rank-k LoRA per finished task, its merged experts (``lora_factors``), in training order."""
        return {task: task for task in _pool(model)[0].tasks}


# --- records: rebuild the merged model at any task boundary -------------------------------------
@dataclass
class TaskRecords:
    """Everything needed to rebuild the merged weights from the base model."""

    config: Rank1PoolConfig
    tasks: list[str]  # in training order
    tensors: dict[str, torch.Tensor]  # "<adapted weight>.records.<task>.<A|B|S|counts|B_all>"


def export_records(model: nn.Module) -> TaskRecords:
    pool = dict(zip(branches(model), _pool(model)))
    tensors = {f"{name}.records.{k}": v.detach().clone() for name, b in pool.items()
               for k, v in b.records.state_dict().items()}
    return TaskRecords(getattr(model, CONFIG_ATTR), next(iter(pool.values())).tasks, tensors)


def load_records(directory: str | os.PathLike) -> TaskRecords:
    """The records of a checkpoint written by ``Method.save`` / ``save_adapter``."""
    meta = read_adapter_config(directory)
    state = read_adapter_tensors(directory)
    config = config_from_dict(meta["config"])
    if not isinstance(config, Rank1PoolConfig):
        raise ValueError(f"{directory} holds a {config.method!r} adapter, not rank1_pool")
    return TaskRecords(config, list(meta["tasks"]), {k: v for k, v in state.items() if ".records." in k})


def replay_records(model: nn.Module, records: TaskRecords, upto: int | str) -> nn.Module:
    """Fold the first ``upto`` tasks (a count, or the name of the last task) into a freshly built
    base ``model`` (its original weights) and return it as the plain merged model after that task."""
    n = records.tasks.index(upto) + 1 if isinstance(upto, str) else upto
    if not 0 <= n <= len(records.tasks):
        raise ValueError(f"upto must be in [0, {len(records.tasks)}] or a task of {records.tasks}, got {upto!r}")
    inject_adapters(model, records.config)
    for name, branch, weight in sites(model):
        for task in records.tasks[:n]:
            branch.add_task(task)
            record = branch.records[task]  # type: ignore[index]
            prefix = f"{name}.records.{task}."
            missing = [k for k in record.state_dict() if prefix + k not in records.tensors]
            if missing:
                raise ValueError(f"records lack {[prefix + k for k in missing]}")
            record.load_state_dict({k: records.tensors[prefix + k] for k in record.state_dict()}, strict=True)
        branch.restore(weight)
    return unload(model, merge=False)
