"""The adapter core against references: peft's LoRA, merge / unmerge / unload, targeting, hand
counts, task switching. Attention slots: test_adapter_attention.py; files: test_adapter_io.py.

Every model here is tiny (see conftest.py) and on CPU; the file runs in seconds.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import (CLIP_TARGETS, adapt, clip_inputs, clip_out, llava_inputs, make_tiny_clip, module_types,
                      randomize)
from torch import nn

from continual_lora.adapters import (
    AdaptedLinear,
    LoRAConfig,
    UnknownTaskError,
    adapted_layers,
    add_task,
    branches,
    disable_adapters,
    inject_adapters,
    merge,
    parameter_counts,
    parameter_table,
    set_task,
    unload,
    unmerge,
    use_task,
)

ROOT = Path(__file__).resolve().parents[1]


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

# --- models and targeting ------------------------------------------------------------------
def test_tiny_clip_all_targets():
    base = make_tiny_clip()
    model = copy.deepcopy(base)
    chosen = inject_adapters(model, LoRAConfig(rank=4, targets=CLIP_TARGETS))
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
    inject_adapters(tiny_clip, LoRAConfig(rank=4, targets=CLIP_TARGETS))
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
    inject_adapters(model, LoRAConfig(rank=4, targets=CLIP_TARGETS))
    add_task(model, "t1")
    assert {p.device.type for p in model.parameters()} == {"meta"}

    model = make_tiny_clip()
    inject_adapters(model, LoRAConfig(rank=4, targets=CLIP_TARGETS))
    model.to(torch.float64)
    add_task(model, "t1")
    assert {p.dtype for p in model.parameters()} == {torch.float64}


def test_half_precision_base_with_fp32_adapters():
    model = make_tiny_clip().to(torch.bfloat16)
    inject_adapters(model, LoRAConfig(rank=4, targets=CLIP_TARGETS))
    add_task(model, "t1")
    randomize(model)
    inputs = clip_inputs()
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    out = model(**inputs, return_loss=True)
    assert out.logits_per_image.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("bad", [dict(rank=0), dict(rank=-2), dict(alpha=0.0), dict(alpha=-1.0)])
def test_rank_and_alpha_must_be_positive(bad):
    with pytest.raises(ValueError, match="rank|alpha"):
        LoRAConfig(**bad)

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
