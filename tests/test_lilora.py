"""LiLoRA (arXiv 2508.06202): layer maths, accounting, task schedule, merge, save / load and the
stock-peft export, on tiny CPU models (the stability losses: test_lilora_stability.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip
from torch import nn

from continual_lora.adapters import (
    UnknownTaskError,
    add_task,
    branches,
    config_from_dict,
    inject_adapters,
    merge,
    parameter_counts,
    set_task,
    unmerge,
    use_task,
)
from continual_lora.methods import LiLoRA, LiLoRAConfig, build_method, export_peft_lora
from continual_lora.methods.lilora import LiLoRABranch, stability_loss


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_config(**kw) -> LiLoRAConfig:
    base = dict(targets=("fc1", "fc2"), rank=4, alpha=8.0, inner_rank=2, dropout=0.0)
    return LiLoRAConfig(**{**base, **kw})


def make(seed: int = 0, **kw) -> tuple[nn.Module, nn.Module, LiLoRA]:
    """(adapted model, untouched copy of its base, method)."""
    torch.manual_seed(seed)
    model = TwoLayer()
    base = copy.deepcopy(model)
    method = LiLoRA(tiny_config(**kw))
    method.attach(model)
    return model, base, method


def train(model: nn.Module, method: LiLoRA, task: str, index: int, steps: int = 5) -> None:
    method.begin_task(model, task, index)
    model.zero_grad(set_to_none=True)
    opt = torch.optim.Adam(method.trainable_parameters(model), lr=0.05)
    gen = torch.Generator().manual_seed(100 + index)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 5, generator=gen)
        loss = F.mse_loss(model(x), y) + sum(method.loss_terms(model, x).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    method.end_task(model, task, index)


def lilora(model: nn.Module) -> dict[str, LiLoRABranch]:
    return {n: b for n, b in branches(model).items() if isinstance(b, LiLoRABranch)}


# --- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(rank=0), "rank"), (dict(rank=-3), "rank"), (dict(rank=2.5), "rank"), (dict(alpha=0.0), "alpha"),
        (dict(inner_rank=0), "inner_rank"), (dict(dropout=1.0), "dropout"), (dict(gate_init="uniform"), "gate_init"),
        (dict(gate_init=float("nan")), "gate_init"), (dict(stability_target="C"), "stability_target"),
        (dict(stability="a_cosine", lambda_stab=-1.0), "lambda_stab"),
        (dict(stability="a_cosine", stability_target="B0", lambda_stab=1.0), "B0"), (dict(stability="x"), "stability"),
        (dict(stability="a_cosine", stability_target="both", lambda_stab=1.0), "both"),
        (dict(stability="paper", paper_layer_reduce="Mean"), "paper_layer_reduce"),
        (dict(stability="paper", freeze_shared_b_after_first_task=True), "freeze_shared_b_after_first_task"),
    ],
)
def test_config_validation(bad: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiny_config(**bad)


def test_config_round_trip_and_registry() -> None:
    cfg = tiny_config(gate_init=0.0, stability="a_cosine", stability_target="both", lambda_stab=0.1,
                      freeze_shared_b_after_first_task=False)
    assert config_from_dict(cfg.to_dict()) == cfg
    method = build_method("lilora", rank=4, inner_rank=2, alpha=4.0)
    assert isinstance(method, LiLoRA) and method.uses_task_id and method.config.inner_rank == 2


# --- layer ----------------------------------------------------------------------------------
def test_forward_matches_hand_computation() -> None:
    torch.manual_seed(0)
    model = TwoLayer()
    inject_adapters(model, tiny_config(targets=("fc1",), gate_init=0.3))
    add_task(model, "t0")
    layer = model.fc1
    br = layer.adapter
    assert torch.equal(br.B0, torch.zeros(10, 4)) and torch.equal(br.P["t0"], torch.zeros(10, 2))
    assert br.g["t0"].item() == pytest.approx(0.3) and br.Q["t0"].abs().sum() > 0
    with torch.no_grad():  # nonzero everything, by hand
        br.B0.copy_(torch.randn(10, 4))
        br.P["t0"].copy_(torch.randn(10, 2))
        br.Q["t0"].copy_(torch.randn(2, 4))
        br.g["t0"].fill_(-0.7)
    x = torch.randn(3, 6)
    gate = 1.0 / (1.0 + math.exp(0.7))
    b_t = gate * br.B0 + (1.0 - gate) * (br.P["t0"] @ br.Q["t0"])  # (out, r)
    scale = 8.0 / 4
    expected = x @ layer.weight.T + layer.bias + scale * (x @ br.A.T) @ b_t.T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(br.delta_weight("t0"), scale * b_t @ br.A, atol=1e-6, rtol=1e-6)
    br.dropout = nn.Dropout(0.5)  # dropout acts on the input of A only
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    expected = x @ layer.weight.T + layer.bias + scale * (F.dropout(x, 0.5, training=True) @ br.A.T) @ b_t.T
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)


def test_gate_init() -> None:
    for gate_init in ("normal", -1.5):
        torch.manual_seed(0)
        model = TwoLayer()
        inject_adapters(model, tiny_config(gate_init=gate_init))
        for task in ("t0", "t1"):
            add_task(model, task)
        gates = torch.stack([g for b in lilora(model).values() for g in b.g.values()])  # (layers * tasks,)
        if gate_init == "normal":  # one N(0, 1) draw per task and layer
            assert gates.unique().numel() == gates.numel() and gates.abs().max() < 6
        else:
            assert torch.equal(gates, torch.full_like(gates, -1.5))


def test_parameter_counts_llava_release_on_meta() -> None:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14),
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, vocab_size=32000),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    targets = r".*language_model.*\.(gate_proj|up_proj|down_proj)|.*multi_modal_projector\.linear_[12]"
    chosen = inject_adapters(model, LiLoRAConfig(targets=targets, rank=128, alpha=256.0, inner_rank=64))
    assert len(chosen) == 32 * 3 + 2 and not any("vision_tower" in n for n in chosen)
    add_task(model, "t0")
    assert all(b.A.is_meta and b.P["t0"].is_meta for b in lilora(model).values())
    counts = parameter_counts(model)
    assert counts["shared"] == 187_301_888
    assert counts["per_task"] == {"t0": 54_804_578}


# --- task schedule --------------------------------------------------------------------------
@pytest.mark.parametrize("freeze_b", [True, False])
def test_schedule_freezes_and_gradients(freeze_b: bool) -> None:
    model, _, method = make(freeze_shared_b_after_first_task=freeze_b)
    train(model, method, "t0", 0)
    before = {n: {k: v.detach().clone() for k, v in b.named_parameters()} for n, b in lilora(model).items()}
    train(model, method, "t1", 1)
    for name, b in lilora(model).items():
        old = before[name]
        for key in ("P.t0", "Q.t0", "g.t0"):
            assert torch.equal(dict(b.named_parameters())[key], old[key]), key
        assert torch.equal(b.B0, old["B0"]) == freeze_b
        assert not torch.equal(b.A, old["A"])
        # gradients reach exactly what the schedule trains
        assert b.A.grad is not None and (b.B0.grad is None) == freeze_b
        assert all(t["t0"].grad is None for t in (b.P, b.Q, b.g))
        assert all(t["t1"].grad is not None for t in (b.P, b.Q, b.g))
        assert b.active_task == "t1"
        # the flags too (old factors are outside the graph anyway, but must not be handed to an optimiser)
        assert [t["t0"].requires_grad for t in (b.P, b.Q, b.g)] == [False] * 3
        assert b.B0.requires_grad != freeze_b and b.A.requires_grad
    shared_b = sum(b.B0.numel() for b in lilora(model).values())
    per_task = parameter_counts(model)["per_task"]["t1"]
    assert parameter_counts(model)["trainable"] == per_task + shared_b * (not freeze_b) + 4 * 6 + 4 * 10


@pytest.mark.parametrize("freeze_a", [True, False])
def test_frozen_shared_a_keeps_old_task_outputs_exact(freeze_a: bool) -> None:
    model, _, method = make(freeze_shared_a=freeze_a)
    x = torch.randn(4, 6)
    train(model, method, "t0", 0)
    with use_task(model, "t0"):
        y0 = model(x)
    train(model, method, "t1", 1)
    with use_task(model, "t0"):
        assert torch.equal(model(x), y0) == freeze_a
    assert all((b.A.grad is None) == freeze_a for b in lilora(model).values())


# --- inference: merge, task switch, errors, save / load -------------------------------------
def test_merge_switch_errors_and_save_load(tmp_path) -> None:
    release = make()[0]  # lambda_stab = 0: no snapshot buffers are stored
    assert not any(n.endswith("_prev") for n in release.state_dict())
    model, base, method = make(stability="a_cosine", lambda_stab=0.1)
    train(model, method, "t0", 0)
    train(model, method, "t1", 1)
    model.eval()
    x = torch.randn(4, 6)
    outs = {}
    for task in ("t0", "t1"):
        with use_task(model, task):
            outs[task] = model(x)
    assert not torch.allclose(outs["t0"], outs["t1"], atol=1e-4)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    for task in ("t0", "t1"):
        merge(model, task)
        torch.testing.assert_close(model(x), outs[task], atol=1e-5, rtol=0)
        unmerge(model)
        for n, p in model.named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)
    with pytest.raises(UnknownTaskError, match=r"'nope'.*\['t0', 't1'\]"):
        set_task(model, "nope")
    with pytest.raises(UnknownTaskError, match="t1"):
        merge(model, "nope")

    method.save(model, str(tmp_path / "ckpt"))
    fresh = copy.deepcopy(base)
    loaded = LiLoRA(tiny_config(stability="a_cosine", lambda_stab=0.1))
    loaded.load(fresh, str(tmp_path / "ckpt"))
    fresh.eval()
    assert loaded.trained_tasks == ["t0", "t1"] and loaded.task_index == 1
    for task in ("t0", "t1"):
        with use_task(fresh, task):
            assert torch.equal(fresh(x), outs[task])
    assert all(torch.equal(b.A_prev, lilora(model)[n].A_prev) for n, b in lilora(fresh).items())
    snapshot = {n: b.A_prev.clone() for n, b in lilora(fresh).items()}
    with torch.no_grad():
        for b in lilora(fresh).values():
            b.A.mul_(2.0)
    loaded.begin_task(fresh, "t1", 1)  # resuming a known task keeps its factors and its snapshot
    assert all(torch.equal(b.A_prev, snapshot[n]) for n, b in lilora(fresh).items())
    assert all(b.P["t1"].requires_grad and not b.P["t0"].requires_grad for b in lilora(fresh).values())


# --- export to stock peft -------------------------------------------------------------------
def _peft_load(base: nn.Module, directory) -> nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


def test_peft_export_round_trip_small(tmp_path) -> None:
    model, base, method = make(gate_init=0.0)
    train(model, method, "t0", 0)
    train(model, method, "t1", 1)
    model.eval()
    x = torch.randn(4, 6)
    for task in ("t0", "t1"):
        out = export_peft_lora(model, task, tmp_path / task)
        with use_task(model, task):
            ours = model(x)
        assert not torch.allclose(ours, base(x), atol=1e-3)  # a silently unloaded adapter would fail
        torch.testing.assert_close(_peft_load(base, out)(x), ours, atol=1e-5, rtol=0)
    with pytest.raises(UnknownTaskError):
        export_peft_lora(model, "nope", tmp_path / "nope")


TINY_CLIP = dict(special_ids={}, intermediate_size=37)  # transformers' default special ids, odd MLP width


def _clip_batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(0, 64, (3, 7), generator=gen),  # (B, L)
        "pixel_values": torch.randn(3, 3, 16, 16, generator=gen),  # (B, C, H, W)
    }


def test_peft_export_round_trip_tiny_clip(tmp_path) -> None:
    model = make_tiny_clip(**TINY_CLIP)
    base = copy.deepcopy(model)
    method = LiLoRA(LiLoRAConfig(rank=4, alpha=8.0, inner_rank=2, dropout=0.0))
    method.attach(model)
    for index, task in enumerate(("t0", "t1")):
        method.begin_task(model, task, index)
        with torch.no_grad():  # nonzero factors by hand instead of training
            for b in lilora(model).values():
                for p in (b.A, b.B0, b.P[task], b.Q[task]):
                    p.normal_(0, 0.3)
    batch = _clip_batch(torch.Generator().manual_seed(1))
    for task in ("t0", "t1"):
        directory = export_peft_lora(model, task, tmp_path / task, base_model_name_or_path="tiny-clip")
        with use_task(model, task):
            ours = model(**batch)
        theirs = _peft_load(base, directory)(**batch)
        for key in ("logits_per_image", "text_embeds", "image_embeds"):
            torch.testing.assert_close(theirs[key], ours[key], atol=1e-5, rtol=0)
        assert not torch.allclose(ours["logits_per_image"], base(**batch)["logits_per_image"], atol=1e-3)


def test_tiny_clip_two_tasks_end_to_end() -> None:
    model = make_tiny_clip(**TINY_CLIP).train()
    method = LiLoRA(LiLoRAConfig(rank=4, alpha=8.0, inner_rank=2, stability="a_cosine", lambda_stab=0.5))
    method.attach(model)
    names = list(lilora(model))
    assert any(n.startswith("text_model.") for n in names) and any(n.startswith("vision_model.") for n in names)
    gen = torch.Generator().manual_seed(0)
    snapshots = {}
    for index, task in enumerate(("t0", "t1")):
        method.begin_task(model, task, index)
        opt = torch.optim.AdamW(method.trainable_parameters(model), lr=1e-2)
        for _ in range(3):
            terms = method.loss_terms(model, None)
            assert set(terms) == ({"stability"} if index else set())
            loss = model(**_clip_batch(gen), return_loss=True).loss + sum(terms.values())
            assert torch.isfinite(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        method.end_task(model, task, index)
        snapshots[task] = {n: [t[task].clone() for t in (b.P, b.Q, b.g)] for n, b in lilora(model).items()}
    assert stability_loss(model).item() > 0
    for name, b in lilora(model).items():
        assert all(torch.equal(a, c) for a, c in zip(snapshots["t0"][name], (b.P["t0"], b.Q["t0"], b.g["t0"])))
    model.eval()
    batch = _clip_batch(gen)
    outs = {}
    for task in ("t0", "t1"):
        with method.evaluating(model, task):
            outs[task] = model(**batch)["logits_per_image"]
    assert not torch.allclose(outs["t0"], outs["t1"])
    counts = parameter_counts(model)
    expected = sum(2 * (b.out_features + 4) + 1 for b in lilora(model).values())
    assert counts["per_task"] == {"t0": expected, "t1": expected}
