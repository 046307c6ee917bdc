"""Layer wrappers: a frozen ``base_layer`` plus one :class:`AdapterBranch` per adapted weight.

``AdaptedLinear`` wraps ``nn.Linear``::

    y = base_layer(x) + branch(x)

``AdaptedMultiheadAttention`` wraps ``nn.MultiheadAttention`` (OpenAI CLIP / open_clip use it
with a fused ``in_proj_weight``). Its q, k and v thirds and ``out_proj`` are separately
adaptable *slots*; when any branch is active it runs the attention itself (same maths as
``F.multi_head_attention_forward``)::

    q = x_q Wq^T + bq + branch_q(x_q)        (likewise k, v)
    o = softmax(q k^T / sqrt(d_head) + mask) v
    y = o Wo^T + bo + branch_out(o)

Merging adds ``delta_weight`` to the slot's view of the base weight in place and unmerging
subtracts it again, so the module keeps its parameters (and optimiser state) either way.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterBranch

MHA_SLOTS = ("q_proj", "k_proj", "v_proj", "out_proj")


class AdaptedModule(nn.Module):
    """Common state of the wrappers: merge bookkeeping and the enable switch."""

    base_layer: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.merged_task: str | None = None  # task whose update is folded into base_layer
        self.merged = False
        self.adapters_enabled = True

    def slots(self) -> dict[str, AdapterBranch]:
        raise NotImplementedError

    def slot_weight(self, slot: str) -> torch.Tensor:
        raise NotImplementedError

    def sites(self) -> Iterator[tuple[str, AdapterBranch, torch.Tensor]]:
        """(slot, branch, view of the base weight) for every adapted weight of this layer."""
        for slot, branch in self.slots().items():
            yield slot, branch, self.slot_weight(slot)

    @property
    def active(self) -> bool:
        return self.adapters_enabled and not self.merged

    @torch.no_grad()
    def merge(self, task: str | None = None) -> None:
        if self.merged:
            raise RuntimeError(f"already merged (task {self.merged_task!r}); unmerge first")
        resolved = None
        for _, branch, weight in self.sites():
            resolved = branch.resolve_task(task) if branch.tasks else task
            weight.add_(branch.delta_weight(resolved).to(weight.dtype))
        self.merged, self.merged_task = True, resolved

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for _, branch, weight in self.sites():
            weight.sub_(branch.delta_weight(self.merged_task).to(weight.dtype))
        self.merged, self.merged_task = False, None


class AdaptedLinear(AdaptedModule):
    """``nn.Linear`` with a low-rank branch; ``base_layer`` is the original module."""

    def __init__(self, base_layer: nn.Linear, branch: AdapterBranch) -> None:
        super().__init__()
        if branch.in_features != base_layer.in_features or branch.out_features != base_layer.out_features:
            raise ValueError("branch shape does not match the wrapped nn.Linear")
        self.base_layer = base_layer
        self.adapter = branch

    # nn.Linear attributes that model code reads directly (e.g. ``layer.weight.dtype``)
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def slots(self) -> dict[str, AdapterBranch]:
        return {"": self.adapter}

    def slot_weight(self, slot: str) -> torch.Tensor:
        return self.base_layer.weight.data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.active:
            return y
        return y + self.adapter(x).to(y.dtype)


class AdaptedMultiheadAttention(AdaptedModule):
    """``nn.MultiheadAttention`` whose q / k / v / out_proj weights carry branches."""

    def __init__(self, base_layer: nn.MultiheadAttention, branches: dict[str, AdapterBranch]) -> None:
        super().__init__()
        unknown = set(branches) - set(MHA_SLOTS)
        if unknown:
            raise ValueError(f"unknown attention slots {sorted(unknown)}; use {MHA_SLOTS}")
        if base_layer.bias_k is not None or base_layer.add_zero_attn:
            raise NotImplementedError("nn.MultiheadAttention with add_bias_kv/add_zero_attn is not supported")
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict(branches)
        for branch in self.adapters.values():
            branch.seq_dim = 1  # forward() works batch-first internally

    def slots(self) -> dict[str, AdapterBranch]:
        return dict(self.adapters.items())

    def _index(self, slot: str) -> int:
        return ("q_proj", "k_proj", "v_proj").index(slot)

    def slot_weight(self, slot: str) -> torch.Tensor:
        m = self.base_layer
        if slot == "out_proj":
            return m.out_proj.weight.data
        if m._qkv_same_embed_dim:
            e, i = m.embed_dim, self._index(slot)
            return m.in_proj_weight.data[i * e : (i + 1) * e]
        return getattr(m, f"{slot[0]}_proj_weight").data

    def _slot_bias(self, slot: str) -> torch.Tensor | None:
        m = self.base_layer
        if m.in_proj_bias is None:
            return None
        e, i = m.embed_dim, self._index(slot)
        return m.in_proj_bias[i * e : (i + 1) * e]

    def _project(self, x: torch.Tensor, slot: str) -> torch.Tensor:
        m = self.base_layer
        if slot == "out_proj":
            y = m.out_proj(x)
        elif m._qkv_same_embed_dim:
            e, i = m.embed_dim, self._index(slot)
            y = F.linear(x, m.in_proj_weight[i * e : (i + 1) * e], self._slot_bias(slot))
        else:
            y = F.linear(x, getattr(m, f"{slot[0]}_proj_weight"), self._slot_bias(slot))
        if slot in self.adapters:
            y = y + self.adapters[slot](x).to(y.dtype)
        return y

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.base_layer
        if not self.active:
            return m(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                     attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        unbatched = query.dim() == 2
        if unbatched:  # (L, E) -> (1, L, E)
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not m.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))

        q = self._project(query, "q_proj")  # (B, Lq, E)
        k = self._project(key, "k_proj")  # (B, Lk, E)
        v = self._project(value, "v_proj")  # (B, Lk, E)
        bsz, lq, e = q.shape
        lk, h = k.shape[1], m.num_heads
        hd = e // h
        q, k, v = (t.reshape(bsz, -1, h, hd).transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd)

        mask = _additive_mask(attn_mask, key_padding_mask, is_causal, bsz, h, lq, lk, q.dtype, q.device)
        dropout = m.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(hd)  # (B, H, Lq, Lk)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, p=dropout, training=self.training) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(bsz, lq, e)  # (B, Lq, E)
        out = self._project(out, "out_proj")

        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not m.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    bsz: int,
    heads: int,
    lq: int,
    lk: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """nn.MultiheadAttention's mask conventions as one additive (B, H, Lq, Lk) float mask."""

    def to_float(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:  # True = not allowed to attend
            return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    if attn_mask is None and is_causal:
        attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=device).triu(1)
    out = None
    if attn_mask is not None:
        am = to_float(attn_mask)
        out = am.view(bsz, heads, lq, lk) if am.dim() == 3 else am.view(1, 1, lq, lk)
    if key_padding_mask is not None:
        kp = to_float(key_padding_mask).view(bsz, 1, 1, lk)
        out = kp if out is None else out + kp
    return out
