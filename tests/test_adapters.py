"""The adapter core against references: peft's LoRA, a hand-written attention, hand counts.

Every model here is tiny (see conftest.py) and on CPU; the file runs in seconds.
"""

from __future__ import annotations

import ast
import copy
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import clip_inputs, llava_inputs, make_plain, make_tiny_clip
from torch import nn

import continual_lora
from continual_lora.adapters import (
    AdaptedLinear,
    AdaptedMultiheadAttention,
    LoRAConfig,
    UnknownTaskError,
    adapted_layers,
    add_task,
    branches,
    disable_adapters,
    inject_adapters,
    load_adapter,
    merge,
    parameter_counts,
    parameter_table,
    save_adapter,
    set_task,
    unload,
    unmerge,
    use_task,
)

TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(continual_lora.__file__).resolve().parent


# --- helpers -----------------------------------------------------------------------------
@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Give every task of every branch random, nonzero A and B (B = 0 would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    for _, branch in sorted(branches(model).items()):
        for task in branch.tasks:
            for table in (branch.lora_A, branch.lora_B):
                table[task].copy_(torch.randn(table[task].shape, generator=g) * std)


def adapt(model: nn.Module, tasks=("t1",), seed: int = 0, rank: int = 4, alpha: float = 8.0,
          targets=TARGETS, **kw) -> nn.Module:
    inject_adapters(model, LoRAConfig(rank=rank, alpha=alpha, targets=targets, **kw))
    for task in tasks:
        add_task(model, task)
    randomize(model, seed)
    return model


@torch.no_grad()
def clip_out(model: nn.Module, inputs=None) -> torch.Tensor:
    out = model(**(inputs or clip_inputs()))
    return torch.cat([out.logits_per_image.flatten(), out.text_embeds.flatten(), out.image_embeds.flatten()])


def module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


# --- plain LoRA == peft LoRA ---------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # transformers, via peft
def test_lora_matches_peft_outputs_and_gradients():
    from peft import LoraConfig, get_peft_model

    base = make_tiny_clip()
    ours = copy.deepcopy(base)
    targets = ["q_proj", "v_proj", "out_proj", "fc1"]
    rank, alpha = 4, 12.0
    chosen = inject_adapters(ours, LoRAConfig(rank=rank, alpha=alpha, targets=targets))
    add_task(ours, "t1")
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    inner = theirs.base_model.model

    peft_layers = {n for n, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert set(chosen) == peft_layers and len(chosen) == 16

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, branch in branches(ours).items():
            a = torch.randn(branch.lora_A["t1"].shape, generator=g) * 0.2
            b = torch.randn(branch.lora_B["t1"].shape, generator=g) * 0.2  # nonzero B
            branch.lora_A["t1"].copy_(a)
            branch.lora_B["t1"].copy_(b)
            layer = inner.get_submodule(name)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)

    inputs = clip_inputs()
    out_ours, out_theirs = ours(**inputs, return_loss=True), theirs(**inputs, return_loss=True)
    for key in ("logits_per_image", "text_embeds", "image_embeds", "loss"):
        torch.testing.assert_close(out_ours[key], out_theirs[key], atol=1e-6, rtol=0)
    # the update must matter, or the comparison above proves nothing
    assert not torch.allclose(out_ours.logits_per_image, base(**inputs).logits_per_image, atol=1e-3)

    (out_ours.loss + out_ours.text_embeds.square().sum()).backward()
    (out_theirs.loss + out_theirs.text_embeds.square().sum()).backward()
    for name, branch in branches(ours).items():
        layer = inner.get_submodule(name)
        for mine, peft_param in ((branch.lora_A["t1"], layer.lora_A["default"].weight),
                                 (branch.lora_B["t1"], layer.lora_B["default"].weight)):
            assert mine.grad is not None and mine.grad.abs().sum() > 0, name
            torch.testing.assert_close(mine.grad, peft_param.grad, atol=1e-6, rtol=0)


# --- merge / unmerge / unload / disable ----------------------------------------------------
def test_merge_unmerge_roundtrip():
    base = make_tiny_clip()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = adapt(copy.deepcopy(base))
    unmerged = clip_out(model)
    merge(model, "t1")
    assert all(layer.merged for layer in adapted_layers(model).values())
    torch.testing.assert_close(clip_out(model), unmerged, atol=1e-5, rtol=0)
    changed = model.text_model.encoder.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(changed, base_state["text_model.encoder.layers.0.self_attn.q_proj.weight"])
    unmerge(model)
    restored = unload(model, merge=False).state_dict()
    for key, value in base_state.items():
        torch.testing.assert_close(restored[key], value, atol=1e-6, rtol=0)


def test_unload_merge_gives_base_types_keys_and_adapted_outputs():
    base = make_tiny_clip()
    model = adapt(copy.deepcopy(base))
    adapted = clip_out(model)
    unloaded = unload(model, merge=True)
    assert module_types(unloaded) == module_types(base)
    assert list(unloaded.state_dict()) == list(base.state_dict())
    assert not hasattr(unloaded, "continual_lora_config")
    torch.testing.assert_close(clip_out(unloaded), adapted, atol=1e-5, rtol=0)


def test_unload_merges_the_named_task_even_if_another_is_merged():
    model = adapt(make_tiny_clip(), tasks=("t1", "t2"))
    with use_task(model, "t2"):
        wanted = clip_out(model)
    merge(model, "t1")
    torch.testing.assert_close(clip_out(unload(model, merge=True, task="t2")), wanted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("merged_first", [False, True])
def test_unload_without_merge_gives_base_outputs(merged_first):
    base = make_tiny_clip()
    model = adapt(copy.deepcopy(base))
    if merged_first:
        merge(model, "t1")
    unloaded = unload(model, merge=False)
    assert module_types(unloaded) == module_types(base)
    if merged_first:  # the update was added and subtracted again: fp32 rounding only
        torch.testing.assert_close(clip_out(unloaded), clip_out(base), atol=1e-5, rtol=0)
    else:  # the weights were never touched
        assert torch.equal(clip_out(unloaded), clip_out(base))


@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapters_gives_base_and_restores(merged):
    base = make_tiny_clip()
    model = adapt(copy.deepcopy(base))
    adapted, reference = clip_out(model), clip_out(base)
    assert not torch.allclose(adapted, reference, atol=1e-3)
    if merged:
        merge(model, "t1")
    with disable_adapters(model):
        torch.testing.assert_close(clip_out(model), reference, atol=1e-5, rtol=0)
    assert all(layer.merged == merged for layer in adapted_layers(model).values())
    torch.testing.assert_close(clip_out(model), adapted, atol=1e-5, rtol=0)


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


# --- models and targeting ------------------------------------------------------------------
def test_tiny_clip_all_targets():
    base = make_tiny_clip()
    model = copy.deepcopy(base)
    chosen = inject_adapters(model, LoRAConfig(rank=4, targets=TARGETS))
    assert len(chosen) == 2 * 2 * 6  # two towers, two layers, six weights
    add_task(model, "t1")
    assert torch.equal(clip_out(model), clip_out(base))  # B = 0 at init: exactly the base model
    randomize(model)
    assert not torch.allclose(clip_out(model), clip_out(base), atol=1e-3)


def test_tiny_llava_language_mlp_and_projector(tiny_llava):
    base = copy.deepcopy(tiny_llava)
    inputs = llava_inputs()
    targets = ["gate_proj", "up_proj", "down_proj", "multi_modal_projector.linear_1",
               "multi_modal_projector.linear_2"]
    chosen = inject_adapters(tiny_llava, LoRAConfig(rank=4, targets=targets))
    assert len(chosen) == 2 * 3 + 2
    assert all(isinstance(tiny_llava.get_submodule(n), AdaptedLinear) for n in chosen)
    add_task(tiny_llava, "t1")
    with torch.no_grad():
        assert torch.equal(tiny_llava(**inputs).logits, base(**inputs).logits)
    randomize(tiny_llava)
    logits = tiny_llava(**inputs).logits
    assert not torch.allclose(logits, base(**inputs).logits, atol=1e-3)
    logits.square().mean().backward()
    graded = {n for n, p in tiny_llava.named_parameters() if p.grad is not None}
    assert graded and all(".lora_A." in n or ".lora_B." in n for n in graded)
    assert len(graded) == 2 * len(chosen)


def test_plain_module(plain_model):
    base = copy.deepcopy(plain_model)
    x = torch.randn(4, 10)
    chosen = inject_adapters(plain_model, LoRAConfig(rank=2, targets=["fc1", "fc2"]))
    assert chosen == ["fc1", "fc2"] and isinstance(plain_model.head, nn.Linear)
    add_task(plain_model, "t1")
    randomize(plain_model)
    a1, b1 = plain_model.fc1.adapter.factors()
    a2, b2 = plain_model.fc2.adapter.factors()
    s = plain_model.fc1.adapter.scale
    h = torch.relu(x @ (base.fc1.weight + s * b1 @ a1).T + base.fc1.bias)
    h = h @ (base.fc2.weight + s * b2 @ a2).T + base.fc2.bias
    torch.testing.assert_close(plain_model(x), base.head(h), atol=1e-6, rtol=1e-6)


def test_target_suffixes_versus_regex(tiny_clip):
    names = inject_adapters(copy.deepcopy(tiny_clip), LoRAConfig(targets=["q_proj"]))
    assert len(names) == 4 and all(n.endswith(".q_proj") for n in names)
    assert {n.split(".")[0] for n in names} == {"text_model", "vision_model"}
    # a dotted suffix matches whole name parts
    assert inject_adapters(copy.deepcopy(tiny_clip), LoRAConfig(targets=["self_attn.q_proj"])) == names
    # a regex is matched against the whole name
    regex = r"vision_model\.encoder\.layers\.\d+\.self_attn\.(q|v)_proj"
    chosen = inject_adapters(copy.deepcopy(tiny_clip), LoRAConfig(targets=regex))
    assert sorted(chosen) == sorted(f"vision_model.encoder.layers.{i}.self_attn.{p}_proj"
                                    for i in (0, 1) for p in "qv")
    with pytest.raises(ValueError):
        inject_adapters(copy.deepcopy(tiny_clip), LoRAConfig(targets="q_proj"))  # not a full-name match
    with pytest.raises(ValueError):
        inject_adapters(copy.deepcopy(tiny_clip), LoRAConfig(targets=["proj"]))  # suffixes match whole parts


def test_exclude_list_and_regex(tiny_clip):
    one = "text_model.encoder.layers.0.self_attn.q_proj"
    model = copy.deepcopy(tiny_clip)
    chosen = inject_adapters(model, LoRAConfig(targets=["q_proj"], exclude=[one]))
    assert len(chosen) == 3 and one not in chosen
    assert type(model.get_submodule(one)) is nn.Linear
    chosen = inject_adapters(copy.deepcopy(tiny_clip), LoRAConfig(targets=["q_proj"], exclude=r"text_model\..*"))
    assert len(chosen) == 2 and all(n.startswith("vision_model.") for n in chosen)


def test_no_match_error_names_close_candidates(tiny_clip):
    with pytest.raises(ValueError) as info:
        inject_adapters(tiny_clip, LoRAConfig(targets=["q_prj", "fc_1"]))
    close = re.search(r"[Cc]lose candidates:?\s*\[([^\]]*)\]", str(info.value))
    assert close, str(info.value)
    assert "q_proj" in close.group(1) and "fc1" in close.group(1)
    assert not any(isinstance(m, AdaptedLinear) for m in tiny_clip.modules())  # nothing half-done


def test_only_adapter_parameters_trainable(tiny_clip):
    inject_adapters(tiny_clip, LoRAConfig(rank=4, targets=TARGETS))
    add_task(tiny_clip, "t1")
    adapter = {id(p) for b in branches(tiny_clip).values() for p in b.parameters()}
    trainable = {id(p) for p in tiny_clip.parameters() if p.requires_grad}
    assert trainable == adapter and len(adapter) == 2 * 24


def test_parameter_accounting_by_hand(plain_model):
    inject_adapters(plain_model, LoRAConfig(rank=2, targets=["fc1", "fc2"]))
    add_task(plain_model, "t1")
    add_task(plain_model, "t2")
    # fc1 10 -> 20: A 2x10 + B 20x2 = 60; fc2 20 -> 5: A 2x20 + B 5x2 = 50; per task 110
    # base: fc1 200+20, fc2 100+5, head 15+3 = 343
    counts = parameter_counts(plain_model)
    assert counts == {"base": 343, "trainable": 220, "stored": 220, "shared": 0,
                      "per_task": {"t1": 110, "t2": 110}, "adapted_layers": 2}
    table = parameter_table(plain_model)
    for row, number in (("base parameters", "343"), ("trainable", "220"), ("stored", "220"),
                        ("task t1", "110"), ("task t2", "110"), ("adapted weights", "2")):
        line = next(line for line in table.splitlines() if line.startswith(row))
        assert re.search(rf"\b{number}\b", line), line
    assert "32.07 %" in table  # 110 / 343
    for branch in branches(plain_model).values():
        branch.freeze_task("t1")
    assert parameter_counts(plain_model)["trainable"] == 110


def test_first_task_follows_model_device_and_dtype():
    model = make_tiny_clip().to("meta")  # stands in for an accelerator: no tensor may land on the CPU
    inject_adapters(model, LoRAConfig(rank=4, targets=TARGETS))
    add_task(model, "t1")
    assert {p.device.type for p in model.parameters()} == {"meta"}

    model = make_tiny_clip()
    inject_adapters(model, LoRAConfig(rank=4, targets=TARGETS))
    model.to(torch.float64)
    add_task(model, "t1")
    assert {p.dtype for p in model.parameters()} == {torch.float64}


def test_half_precision_base_with_fp32_adapters():
    model = make_tiny_clip().to(torch.bfloat16)
    inject_adapters(model, LoRAConfig(rank=4, targets=TARGETS))
    add_task(model, "t1")
    randomize(model)
    inputs = clip_inputs()
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    out = model(**inputs, return_loss=True)
    assert out.logits_per_image.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


# --- save / load ---------------------------------------------------------------------------
def test_save_load_roundtrip_several_tasks(tmp_path):
    model = adapt(make_tiny_clip(), tasks=("t1", "t2", "t3"), seed=5)
    set_task(model, "t2")
    save_adapter(model, tmp_path / "ckpt")
    fresh = make_tiny_clip()
    load_adapter(fresh, tmp_path / "ckpt")
    assert torch.equal(clip_out(fresh), clip_out(model))  # the active task comes back too
    outs = []
    for task in ("t1", "t2", "t3"):
        with use_task(model, task), use_task(fresh, task):
            outs.append(clip_out(model))
            assert torch.equal(clip_out(fresh), outs[-1]), task
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)


def test_save_load_roundtrip_attention_slots(tmp_path):
    block = adapt(make_attention(False), tasks=("t1", "t2"), targets=["q_proj", "v_proj", "out_proj"])
    save_adapter(block, tmp_path)
    fresh = load_adapter(make_attention(False), tmp_path)
    x, kw = attention_inputs(False, False, "causal")
    for task in ("t1", "t2"):
        with use_task(block, task), use_task(fresh, task), torch.no_grad():
            assert torch.equal(fresh(x, **kw)[0], block(x, **kw)[0])


def test_load_into_other_shapes_names_layer_and_shapes(tmp_path):
    save_adapter(adapt(make_tiny_clip(), rank=4), tmp_path)
    with pytest.raises(ValueError) as info:
        load_adapter(make_tiny_clip(hidden=48), tmp_path)
    msg = str(info.value)
    layer = re.search(r"'((?:text|vision)_model\.[\w.]+_proj|[\w.]+fc\d)'", msg)
    assert layer, msg
    saved = make_tiny_clip().get_submodule(layer.group(1))
    other = make_tiny_clip(hidden=48).get_submodule(layer.group(1))
    shapes = {(4, saved.in_features), (saved.out_features, 4)}
    other_shapes = {(4, other.in_features), (other.out_features, 4)}
    assert any(str(s) in msg for s in shapes) and any(str(s) in msg for s in other_shapes), msg


@pytest.mark.parametrize("bad", [dict(rank=0), dict(rank=-2), dict(alpha=0.0), dict(alpha=-1.0)])
def test_rank_and_alpha_must_be_positive(bad):
    with pytest.raises(ValueError, match="rank|alpha"):
        LoRAConfig(**bad)


# --- no pickle anywhere in the package -----------------------------------------------------
PICKLE_WHITELIST = {"benchmarks/mtil_mini.py"}  # reads mnist.pkl.gz shipped inside a package


def unsafe_loads(source: str) -> list[str]:
    """Calls that unpickle: torch.load without weights_only=True, pickle.load(s), Unpickler."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        if func == "torch.load" or func.endswith(".torch.load"):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if re.search(r"(^|\.)(pickle|cPickle|dill|joblib)\.(load|loads|Unpickler)$", func):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_unsafe_load_checker_catches_offenders():
    assert unsafe_loads("import torch\nx = torch.load('a.pt')\n")
    assert unsafe_loads("import torch\nx = torch.load('a.pt', weights_only=False)\n")
    assert unsafe_loads("import pickle\nx = pickle.load(open('a', 'rb'))\n")
    assert unsafe_loads("import pickle\nx = pickle.loads(b'')\n")
    assert not unsafe_loads("import torch\nx = torch.load('a.pt', weights_only=True)\n")


def test_package_never_unpickles():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 5
    offenders = []
    for path in files:
        rel = path.relative_to(PACKAGE).as_posix()
        for hit in unsafe_loads(path.read_text()):
            if rel in PICKLE_WHITELIST and "torch.load" not in hit:
                continue
            offenders.append(f"{rel} {hit}")
    assert not offenders, "unpickling outside the whitelist:\n" + "\n".join(offenders)


# --- tasks ---------------------------------------------------------------------------------
def test_unknown_task_lists_known_tasks(tiny_clip):
    adapt(tiny_clip, tasks=("t1", "t2"))
    before = clip_out(tiny_clip)
    for call in (lambda: set_task(tiny_clip, "nope"), lambda: merge(tiny_clip, "nope")):
        with pytest.raises(UnknownTaskError) as info:
            call()
        assert "nope" in str(info.value) and "t1" in str(info.value) and "t2" in str(info.value)
    assert not any(layer.merged for layer in adapted_layers(tiny_clip).values())
    assert torch.equal(clip_out(tiny_clip), before)
    with pytest.raises(ValueError):
        add_task(tiny_clip, "bad name")


def test_task_switching_and_merge_per_task(tiny_clip):
    adapt(tiny_clip, tasks=("t1", "t2"))
    outs = {}
    for task in ("t1", "t2"):
        set_task(tiny_clip, task)
        outs[task] = clip_out(tiny_clip)
    assert not torch.allclose(outs["t1"], outs["t2"], atol=1e-3)
    set_task(tiny_clip, "t2")
    for task in ("t1", "t2"):  # merging names its task, whatever the active one is
        merge(tiny_clip, task)
        torch.testing.assert_close(clip_out(tiny_clip), outs[task], atol=1e-5, rtol=0)
        unmerge(tiny_clip)
    torch.testing.assert_close(clip_out(tiny_clip), outs["t2"], atol=1e-5, rtol=0)


# --- the README's commands -----------------------------------------------------------------
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target,expect", [("demo", "continual-lora"), ("test", "pytest")])
def test_make_targets_parse(target, expect):
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert expect in done.stdout
