"""The Rank-1 Expert Pool's hot paths in few operator launches (used by ``rank1_pool.py``).

A module of its own because it is how the pool *runs*, not what it *is*: ``rank1_pool.py`` keeps the
maths; this file makes a training step pay little per adapted weight, which is what a GPU step at
ViT-B/16 sizes is bound by (kernel launches, not FLOPs). Two things:

1. **Routing as one operator.** For router probabilities ``p`` (N, r), R = ``top_r``::

    votes_i      = #{n : expert i is among the R largest entries of p_n}      (r,) int64
    chosen       = the R experts with most votes                              (R experts)
    multiplier_i = scale if i in chosen else 0                                (r,) in ``dtype``
    counts      += votes                                                      (when ``count``)

   Ties rank the lower index first, at both steps (what a stable descending sort gives; a NaN ranks
   above every number, as in ``torch.sort``). So ``multiplier`` is the batch mask with the update
   scale folded in: ``B diag(multiplier) A x`` is the pool's ``scale * B[:, m] A[m, :] x``.
   Operators (``torch.ops.continual_lora``; the schema marks ``counts`` as mutated):

   * ``rank1_route(probs, counts, top_r, scale, count, dtype) -> (multiplier, votes)``: all of it;
   * ``rank1_votes(probs, top_r) -> votes`` and ``rank1_mask(votes, counts, top_r, scale, count,
     dtype) -> multiplier``: the two halves, for a data-parallel run that all-reduces the votes.

   Implementations: the ATen one (every device; exactly the pool's original code: a stable sort, a
   scatter and a sum for the votes, a stable sort for the batch mask) and, on CUDA when Triton is
   installed, one Triton kernel per call that ranks by pairwise comparison (same integers, same
   ties). ``CONTINUAL_LORA_TRITON=0`` keeps CUDA on the ATen path; ranks above ``TRITON_MAX_RANK``
   always use it. Each operator has a fake implementation, so ``torch.compile`` traces through it
   without a graph break.

2. **The AGO loss batched over layers** (:func:`ago_total`): the weights whose B, past columns and
   counts have the same shapes are stacked, and ``sum_{i in C, j in P} |b_i . p_j|`` becomes one
   batched matmul with the critical set C as a mask, per shape group instead of ~13 operators per
   adapted weight. Same values up to the order of the final sum; the gradient is the same.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

TRITON_MAX_RANK = 64  # the kernel holds a (samples x r x r) comparison block in registers
_LIB = torch.library.Library("continual_lora", "DEF")
_LIB.define("rank1_route(Tensor probs, Tensor(a!) counts, int top_r, float scale, bool count, "
            "ScalarType dtype) -> (Tensor, Tensor)")
_LIB.define("rank1_votes(Tensor probs, int top_r) -> Tensor")
_LIB.define("rank1_mask(Tensor votes, Tensor(a!) counts, int top_r, float scale, bool count, "
            "ScalarType dtype) -> Tensor")


# --- ATen (every device; the exact reference path) --------------------------------------------
def votes_aten(probs: Tensor, top_r: int) -> Tensor:
    """(N, r) -> (r,): how many samples have each expert among their top ``top_r``."""
    top = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_r]  # (N, R)
    return torch.zeros(probs.shape, dtype=torch.long, device=probs.device).scatter_(1, top, 1).sum(0)


def mask_aten(votes: Tensor, counts: Tensor, top_r: int, scale: float, count: bool, dtype: torch.dtype) -> Tensor:
    """(r,) votes -> (r,) multiplier: ``scale`` on the ``top_r`` most-voted experts; ``counts += votes``."""
    chosen = torch.sort(votes, descending=True, stable=True).indices[:top_r]  # (R,)
    if count:
        counts.add_(votes)
    return torch.zeros(votes.shape, dtype=dtype, device=votes.device).index_fill_(0, chosen, scale)


def route_aten(probs: Tensor, counts: Tensor, top_r: int, scale: float, count: bool,
               dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    votes = votes_aten(probs, top_r)
    return mask_aten(votes, counts, top_r, scale, count, dtype), votes


# --- Triton (CUDA; optional) ------------------------------------------------------------------
def triton_available() -> bool:
    return os.environ.get("CONTINUAL_LORA_TRITON", "1") != "0" and importlib.util.find_spec("triton") is not None


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def route_kernel(probs_ptr, stride_n, n_rows, votes_ptr, counts_ptr, out_ptr, scale,
                     RANK: tl.constexpr, TOP_R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                     VOTE: tl.constexpr, MASK: tl.constexpr, COUNT: tl.constexpr):
        i = tl.arange(0, BLOCK_R)
        valid = i < RANK
        before = i[None, :] < i[:, None]  # [a, b]: expert b has a lower index than expert a
        if VOTE:  # one program walks the samples in blocks: no atomics, integer sums
            votes = tl.zeros([BLOCK_R], dtype=tl.int32)
            for start in range(0, n_rows, BLOCK_N):
                n = start + tl.arange(0, BLOCK_N)
                live = (n < n_rows)[:, None] & valid[None, :]  # (BN, BR)
                p = tl.load(probs_ptr + n[:, None] * stride_n + i[None, :], mask=live, other=0.0).to(tl.float32)
                nan = p != p
                p_i, p_j = p[:, :, None], p[:, None, :]  # (BN, BR, 1) expert, (BN, 1, BR) competitor
                nan_i, nan_j = nan[:, :, None], nan[:, None, :]
                above = (p_j > p_i) | (nan_j & ~nan_i)  # a NaN ranks above every number (torch.sort)
                level = (p_j == p_i) | (nan_j & nan_i)
                beats = (above | (level & before[None, :, :])) & live[:, None, :]
                rank = tl.sum(beats.to(tl.int32), axis=2)  # (BN, BR): competitors ranked above
                votes += tl.sum(((rank < TOP_R) & live).to(tl.int32), axis=0)
            votes = votes.to(tl.int64)
            tl.store(votes_ptr + i, votes, mask=valid)
        else:
            votes = tl.load(votes_ptr + i, mask=valid, other=0)
        if MASK:
            v_i, v_j = votes[:, None], votes[None, :]
            beats = ((v_j > v_i) | ((v_j == v_i) & before)) & valid[None, :]
            chosen = (tl.sum(beats.to(tl.int32), axis=1) < TOP_R) & valid
            tl.store(out_ptr + i, tl.where(chosen, scale, 0.0).to(out_ptr.dtype.element_ty), mask=valid)
            if COUNT:
                tl.store(counts_ptr + i, tl.load(counts_ptr + i, mask=valid, other=0) + votes, mask=valid)

    return route_kernel


def route_triton(probs: Tensor | None, votes: Tensor | None, counts: Tensor | None, top_r: int, scale: float,
                 count: bool, dtype: torch.dtype | None) -> tuple[Tensor | None, Tensor]:
    """One kernel launch: ``probs`` -> votes (``votes`` None), and/or votes -> multiplier (``dtype`` given).
    Runs wherever Triton does (CUDA; the CPU under ``TRITON_INTERPRET=1``, which the tests use)."""
    vote, mask = probs is not None, dtype is not None
    like = probs if vote else votes
    assert like is not None
    r = like.shape[-1]
    block_r = max(2, 1 << (r - 1).bit_length())
    if vote:
        probs = probs if probs.stride(-1) == 1 else probs.contiguous()
        votes = torch.empty(r, dtype=torch.long, device=like.device)
    out = torch.empty(r, dtype=dtype, device=like.device) if mask else votes
    _kernel()[(1,)](probs if vote else votes, probs.stride(0) if vote else 0, probs.shape[0] if vote else 0,
                    votes, counts if counts is not None else votes, out, float(scale),
                    RANK=r, TOP_R=top_r, BLOCK_R=block_r, BLOCK_N=max(1, min(16, 4096 // (block_r * block_r))),
                    VOTE=vote, MASK=mask, COUNT=bool(count and mask))
    return (out if mask else None), votes  # type: ignore[return-value]


def _use_triton(t: Tensor) -> bool:
    return t.shape[-1] <= TRITON_MAX_RANK and triton_available()


# --- registration -----------------------------------------------------------------------------
def _route_cuda(probs: Tensor, counts: Tensor, top_r: int, scale: float, count: bool,
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if not _use_triton(probs):
        return route_aten(probs, counts, top_r, scale, count, dtype)
    out, votes = route_triton(probs, None, counts, top_r, scale, count, dtype)
    return out, votes  # type: ignore[return-value]


def _votes_cuda(probs: Tensor, top_r: int) -> Tensor:
    return route_triton(probs, None, None, top_r, 0.0, False, None)[1] if _use_triton(probs) else votes_aten(probs, top_r)


def _mask_cuda(votes: Tensor, counts: Tensor, top_r: int, scale: float, count: bool, dtype: torch.dtype) -> Tensor:
    if not _use_triton(votes):
        return mask_aten(votes, counts, top_r, scale, count, dtype)
    return route_triton(None, votes, counts, top_r, scale, count, dtype)[0]  # type: ignore[return-value]


for _name, _aten, _cuda in (("rank1_route", route_aten, _route_cuda), ("rank1_votes", votes_aten, _votes_cuda),
                            ("rank1_mask", mask_aten, _mask_cuda)):
    _LIB.impl(_name, _aten, "CompositeExplicitAutograd")
    _LIB.impl(_name, _cuda, "CUDA")
    _LIB.impl(_name, torch.library.fallthrough_kernel, "Autograd")  # not differentiable: outputs carry no graph


@torch.library.register_fake("continual_lora::rank1_route", lib=_LIB)
def _route_fake(probs: Tensor, counts: Tensor, top_r: int, scale: float, count: bool,
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    r = probs.shape[-1]
    return probs.new_empty(r, dtype=dtype), probs.new_empty(r, dtype=torch.long)


@torch.library.register_fake("continual_lora::rank1_votes", lib=_LIB)
def _votes_fake(probs: Tensor, top_r: int) -> Tensor:
    return probs.new_empty(probs.shape[-1], dtype=torch.long)


@torch.library.register_fake("continual_lora::rank1_mask", lib=_LIB)
def _mask_fake(votes: Tensor, counts: Tensor, top_r: int, scale: float, count: bool, dtype: torch.dtype) -> Tensor:
    return votes.new_empty(votes.shape[-1], dtype=dtype)


rank1_route = torch.ops.continual_lora.rank1_route
rank1_votes = torch.ops.continual_lora.rank1_votes
rank1_mask = torch.ops.continual_lora.rank1_mask


# --- AGO, batched -------------------------------------------------------------------------------
def ago_total(pool: Sequence[Any]) -> Tensor:
    """``sum over branches with records of sum_{i in C, j in P} |b_i . p_j|``, with C = the top-``merge_k``
    experts by the running counts (ties: lower index) and P the branch's ``past_columns()`` (detached);
    one stacked computation per group of equal shapes."""
    groups: dict[tuple, list[Any]] = {}
    for branch in pool:
        if branch.records:
            key = (branch.lora_B.shape, len(branch.records), branch.keep_all_columns, branch.merge_k,
                   branch.lora_B.dtype, branch.lora_B.device)
            groups.setdefault(key, []).append(branch)
    total: Tensor | None = None
    for members in groups.values():
        first = members[0]
        b = torch.stack([m.lora_B for m in members])  # (G, out, r)
        past = torch.cat([torch.stack([getattr(m.records[t], "B_all" if first.keep_all_columns else "B")
                                       for m in members]) for t in first.records], dim=2)  # (G, out, P)
        order = torch.sort(torch.stack([m.counts for m in members]), dim=1, descending=True, stable=True).indices
        critical = torch.zeros(order.shape, dtype=torch.bool, device=order.device).scatter_(
            1, order[:, : first.merge_k], True)  # (G, r): C of each weight
        # (G, P, r): p_j . b_i, with B the right operand so that B's gradient comes out contiguous
        overlap = torch.bmm(past.detach().to(b.dtype).transpose(1, 2), b)
        part = torch.where(critical[:, None, :], overlap.abs(), 0.0).sum()
        total = part if total is None else total + part
    assert total is not None, "no branch has records"
    return total
