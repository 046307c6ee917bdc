"""The seed methods' hot paths as they were before issue 15 made them fast (commit 0e986d3), kept
verbatim as reference implementations: tests/test_fast_paths.py and tests/test_lilora_fast_path.py check that today's code gives the
same outputs, gradients, votes, counts, masks and merged sets (atol 1e-6 where a reformulation
changes float rounding, exactly where it does not)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import clip_inputs

from continual_lora.methods.lilora import LiLoRABranch
from continual_lora.methods.rank1_pool import Rank1PoolBranch


def ranked(t: torch.Tensor) -> torch.Tensor:
    """Indices along the last dim, largest first; equal values keep the lower index first."""
    return torch.sort(t, dim=-1, descending=True, stable=True).indices


def rank1_route(branch: Rank1PoolBranch, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch mask ``m`` (R,), router probabilities (N, r) and per-expert votes (r,)."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and branch.router_mode == "learned"):
        token = branch.routing_input(x).to(branch.router.weight.dtype)
        probs = branch.router(token).softmax(dim=-1)  # (N, r)
    top = ranked(probs.detach())[:, : branch.top_r]  # (N, R) each sample's votes
    votes = torch.zeros(probs.shape, dtype=torch.long, device=probs.device).scatter_(1, top, 1).sum(0)  # (r,)
    if branch.training and dist.is_available() and dist.is_initialized():
        dist.all_reduce(votes)
    mask = ranked(votes)[: branch.top_r].sort().values  # (R,)
    return mask, probs, votes


def rank1_forward(branch: Rank1PoolBranch, x: torch.Tensor, counts: torch.Tensor,
                  forced_mask: torch.Tensor | None = None, count: bool = True) -> torch.Tensor:
    """The pool's forward before issue 15 (index_select + a low-rank pair over the R chosen experts);
    votes go into ``counts`` (the caller's tensor) in training mode."""
    gate = None
    if forced_mask is not None:
        mask = forced_mask
    else:
        mask, probs, votes = rank1_route(branch, x)
        if branch.training and count:
            counts += votes
        if branch.router_mode == "learned":
            gate = probs.index_select(1, mask).mean(0)
    a = branch.lora_A.index_select(0, mask)  # (m, in)
    b = branch.lora_B.index_select(1, mask)  # (out, m)
    h = F.linear(branch.dropout(x), a)  # (..., m)
    if gate is not None:
        h = h * gate.to(h.dtype)
    return F.linear(h, b) * branch.scale  # (..., out)


def rank1_merge_set(counts: torch.Tensor, merge_k: int) -> torch.Tensor:
    return ranked(counts)[:merge_k].sort().values


def lilora_up(branch: LiLoRABranch, task: str | None = None) -> torch.Tensor:
    task = branch.resolve_task(task)
    gate = torch.sigmoid(branch.g[task])
    return gate * branch.B0 + (1 - gate) * (branch.P[task] @ branch.Q[task])


def lilora_forward(branch: LiLoRABranch, x: torch.Tensor) -> torch.Tensor:
    h = F.linear(branch.dropout(x.to(branch.A.dtype)), branch.A)  # (..., r)
    return F.linear(h, lilora_up(branch)) * branch.scale


def rank1_ago_loss(pool: list[Rank1PoolBranch], ago_lambda: float) -> torch.Tensor:
    """``Rank1Pool.loss_terms(...)["ago"]`` before issue 15: one term per branch."""
    terms = []
    for branch in pool:
        if not branch.tasks:
            continue
        past = branch.past_columns()
        current = branch.lora_B.index_select(1, rank1_merge_set(branch.counts, branch.merge_k))  # (out, k)
        terms.append((current.T @ past.detach().to(current.dtype)).abs().sum())
    if not terms:
        return pool[0].lora_B.new_zeros(())
    return ago_lambda * torch.stack(terms).sum() / len(pool)


def train_twins(method_cls, cfg, base, patch, tasks: int = 2, steps: int = 3):
    """Train ``base`` with today's code and a twin with the old forward: same seeds, same batches."""
    runs = []
    for old in (False, True):
        model = copy.deepcopy(base)
        method = method_cls(cfg)
        torch.manual_seed(0)
        method.attach(model)
        if old:
            patch(model, method)
        losses = []
        for index in range(tasks):
            torch.manual_seed(100 + index)
            method.begin_task(model, f"t{index}", index)
            # SGD: AdamW would divide rounding-level differences of near-zero gradient entries by
            # their own size and turn them into weight differences of up to a fraction of lr
            opt = torch.optim.SGD(method.trainable_parameters(model), lr=0.5, momentum=0.9)
            model.train()
            for step in range(steps):
                batch = clip_inputs(batch=4, seed=10 * index + step)
                loss = model(**batch, return_loss=True).loss + sum(method.loss_terms(model, batch).values())
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            model.eval()
            method.end_task(model, f"t{index}", index)
        runs.append((model, method, losses))
    return runs
