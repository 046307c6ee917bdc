"""Adapters on ``nn.MultiheadAttention`` (OpenAI CLIP / open_clip): the fused in_proj thirds and
out_proj as separate slots, against a hand-written attention in every mask / layout case."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import adapt
from torch import nn

from continual_lora.adapters import (
    AdaptedMultiheadAttention,
    LoRAConfig,
    add_task,
    inject_adapters,
    load_adapter,
    merge,
    save_adapter,
    use_task,
)


# --- nn.MultiheadAttention: fused in_proj thirds + out_proj ----------------------------------
E, HEADS, L, BATCH = 16, 4, 5, 3


class AttentionBlock(nn.Module):
    """Self-attention as OpenAI CLIP's residual blocks call it: ``attn(x, x, x, ...)``."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)

    def forward(self, x: torch.Tensor, **kw):
        return self.attn(x, x, x, **kw)


def make_attention(batch_first: bool, seed: int = 0) -> AttentionBlock:
    torch.manual_seed(seed)
    block = AttentionBlock(batch_first).eval()
    with torch.no_grad():  # nonzero biases so a dropped bias shows up
        block.attn.in_proj_bias.normal_(0, 0.1)
        block.attn.out_proj.bias.normal_(0, 0.1)
    return block


def lora_delta(branch) -> torch.Tensor:
    """(alpha / r) B A by hand from the stored factors."""
    task = branch.active_task
    return branch.scale * branch.lora_B[task].detach() @ branch.lora_A[task].detach()


def reference_attention(mha: nn.MultiheadAttention, deltas: dict[str, torch.Tensor], x: torch.Tensor,
                        attn_mask=None, key_padding_mask=None, average: bool = True):
    """Separate q/k/v projections with W + dW, softmax attention and out_proj, all by hand."""
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(0)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    elif not mha.batch_first:
        x = x.transpose(0, 1)
    w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
    proj = {}
    for i, slot in enumerate(("q_proj", "k_proj", "v_proj")):
        weight = w[i * E:(i + 1) * E] + deltas.get(slot, 0.0)
        proj[slot] = (x @ weight.T + b[i * E:(i + 1) * E]).view(x.shape[0], -1, HEADS, E // HEADS).transpose(1, 2)
    scores = proj["q_proj"] @ proj["k_proj"].transpose(-1, -2) / math.sqrt(E // HEADS)  # (B, H, L, L)
    if attn_mask is not None:
        scores = scores + attn_mask
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    out = (weights @ proj["v_proj"]).transpose(1, 2).reshape(x.shape[0], -1, E)
    out_w = mha.out_proj.weight.detach() + deltas.get("out_proj", 0.0)
    out = out @ out_w.T + mha.out_proj.bias.detach()
    weights = weights.mean(1) if average else weights
    if unbatched:
        return out.squeeze(0), weights.squeeze(0)
    return (out if mha.batch_first else out.transpose(0, 1)), weights


def attention_inputs(batch_first: bool, unbatched: bool, mask: str):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(L, E, generator=g) if unbatched else torch.randn(BATCH, L, E, generator=g)
    if not unbatched and not batch_first:
        x = x.transpose(0, 1).contiguous()  # (L, B, E)
    kw = {}
    if mask in ("causal", "both"):  # what CLIP's text tower builds
        kw["attn_mask"] = torch.full((L, L), float("-inf")).triu_(1)
    if mask in ("padding", "both"):
        pad = torch.zeros(BATCH, L, dtype=torch.bool)
        pad[0, -2:] = True  # the first query never masks every key (position 0 stays visible)
        pad[2, -1] = True
        kw["key_padding_mask"] = pad[0] if unbatched else pad
    return x, kw


ATTENTION_CASES = [
    (bf, unb, mask, nw)
    for unb in (False, True)
    for bf in ((False, True) if not unb else (False,))
    for mask in ("none", "causal", "padding", "both")
    for nw in (True, False)
]


@pytest.mark.parametrize("batch_first,unbatched,mask,need_weights", ATTENTION_CASES)
def test_mha_adapters_match_hand_written_attention(batch_first, unbatched, mask, need_weights):
    block = adapt(make_attention(batch_first), targets=["q_proj", "k_proj", "v_proj", "out_proj"])
    wrapper = block.attn
    assert isinstance(wrapper, AdaptedMultiheadAttention) and set(wrapper.adapters) == {
        "q_proj", "k_proj", "v_proj", "out_proj"}
    deltas = {slot: lora_delta(branch) for slot, branch in wrapper.adapters.items()}
    x, kw = attention_inputs(batch_first, unbatched, mask)
    out, weights = block(x, need_weights=need_weights, **kw)
    ref_out, ref_weights = reference_attention(wrapper.base_layer, deltas, x, **kw)
    assert out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    else:
        assert weights is None
    out.square().sum().backward()  # gradients reach every slot's factors
    for slot, branch in wrapper.adapters.items():
        assert branch.lora_A["t1"].grad.abs().sum() > 0 and branch.lora_B["t1"].grad.abs().sum() > 0, slot


def test_mha_per_head_weights_match_reference():
    block = adapt(make_attention(True), targets=["q_proj", "k_proj", "v_proj", "out_proj"])
    deltas = {slot: lora_delta(b) for slot, b in block.attn.adapters.items()}
    x, kw = attention_inputs(True, False, "both")
    _, weights = block(x, need_weights=True, average_attn_weights=False, **kw)
    _, ref = reference_attention(block.attn.base_layer, deltas, x, average=False, **kw)
    assert weights.shape == (BATCH, HEADS, L, L)
    torch.testing.assert_close(weights, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask")  # torch's own MHA
@pytest.mark.parametrize("batch_first,unbatched,mask,need_weights", ATTENTION_CASES)
def test_mha_with_zero_b_equals_original(batch_first, unbatched, mask, need_weights):
    original = make_attention(batch_first)
    block = copy.deepcopy(original)
    inject_adapters(block, LoRAConfig(rank=4, targets=["q_proj", "k_proj", "v_proj", "out_proj"]))
    add_task(block, "t1")  # B = 0, adapters active: our own attention path runs
    assert block.attn.active
    x, kw = attention_inputs(batch_first, unbatched, mask)
    with torch.no_grad():
        out, weights = block(x, need_weights=need_weights, **kw)
        ref_out, ref_weights = original(x, need_weights=need_weights, **kw)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    if need_weights:
        torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=0)
    else:
        assert weights is None and ref_weights is None


def test_mha_q_proj_target_adapts_only_q_third():
    original = make_attention(False)
    block = adapt(copy.deepcopy(original), targets=["q_proj"])
    assert set(block.attn.adapters) == {"q_proj"}
    delta = lora_delta(block.attn.adapters["q_proj"])
    expected = copy.deepcopy(original)
    with torch.no_grad():
        expected.attn.in_proj_weight[:E] += delta
    x, kw = attention_inputs(False, False, "causal")
    with torch.no_grad():
        torch.testing.assert_close(block(x, **kw)[0], expected(x, **kw)[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(block(x, **kw)[0], original(x, **kw)[0], atol=1e-3)

    merge(block, "t1")
    w, w0 = block.attn.base_layer.in_proj_weight, original.attn.in_proj_weight
    torch.testing.assert_close(w[:E], w0[:E] + delta, atol=1e-6, rtol=0)
    assert torch.equal(w[E:], w0[E:])  # k and v thirds untouched
    assert torch.equal(block.attn.base_layer.out_proj.weight, original.attn.out_proj.weight)


def test_save_load_roundtrip_attention_slots(tmp_path):
    block = adapt(make_attention(False), tasks=("t1", "t2"), targets=["q_proj", "v_proj", "out_proj"])
    save_adapter(block, tmp_path)
    fresh = load_adapter(make_attention(False), tmp_path)
    x, kw = attention_inputs(False, False, "causal")
    for task in ("t1", "t2"):
        with use_task(block, task), use_task(fresh, task), torch.no_grad():
            assert torch.equal(fresh(x, **kw)[0], block(x, **kw)[0])
