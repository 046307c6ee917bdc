"""Issue 15 builds LiLoRA's B_t for all adapted weights of a model per shape group
(methods/lilora_up.py). These tests hold it to the per-weight code it replaced
(tests/reference_impls.py, the code of commit 0e986d3): values, gradients and whole training runs
bit for bit, and every rule that must rebuild the kept values."""

from __future__ import annotations

import copy
import pickle

import pytest
import reference_impls as ref
import torch
from conftest import clip_inputs, make_tiny_clip
from torch import nn

from continual_lora.adapters import add_task, branches, inject_adapters, set_task
from continual_lora.methods import LiLoRA, LiLoRAConfig
from continual_lora.methods.lilora import LiLoRABranch

# one intra-op thread (conftest): also makes the batched reductions run in the per-weight code's order
pytestmark = pytest.mark.usefixtures("one_thread")


def lilora_model(seed: int = 0, **kw) -> tuple[nn.Module, LiLoRA]:
    torch.manual_seed(seed)
    model = make_tiny_clip(seed)
    method = LiLoRA(LiLoRAConfig(**{"rank": 4, "alpha": 8.0, "inner_rank": 2, "dropout": 0.0, **kw}))
    method.attach(model)
    method.begin_task(model, "t0", 0)
    with torch.no_grad():
        for branch in branches(model).values():
            branch.B0.normal_()
            branch.P["t0"].normal_()
    return model, method


def patch_old_lilora(model: nn.Module, method: LiLoRA | None = None) -> None:
    for branch in branches(model).values():
        branch.forward = lambda x, branch=branch: ref.lilora_forward(branch, x)


def lilora_step(model: nn.Module, seed: int, **kw) -> torch.Tensor:
    return model(**clip_inputs(batch=3, seed=seed), return_loss=True, **kw).loss


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a: nn.Module, b: nn.Module) -> None:
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert torch.equal(ga[name], gb[name]), name


def test_lilora_batched_up_equals_the_per_weight_formula() -> None:
    model, _ = lilora_model()
    found = branches(model)
    assert len({(b.out_features, b.rank) for b in found.values()}) == 2  # two shape groups
    ups = next(iter(found.values())).ups
    assert ups is not None and all(b.ups is ups for b in found.values())
    for branch in found.values():
        assert torch.equal(ups.get(branch), ref.lilora_up(branch))


def test_lilora_training_matches_the_old_code_exactly() -> None:
    """Two tasks (B0 frozen on the second): per-step losses and final weights bit for bit."""
    base = make_tiny_clip()
    cfg = LiLoRAConfig(rank=4, alpha=8.0, inner_rank=2, dropout=0.1)
    (new, _, new_losses), (old, _, old_losses) = ref.train_twins(LiLoRA, cfg, base, patch_old_lilora, steps=4)
    assert new_losses == old_losses
    new_state, old_state = new.state_dict(), old.state_dict()
    assert all(torch.equal(new_state[k], old_state[k]) for k in new_state)


def test_lilora_values_are_rebuilt_whenever_they_would_be_stale() -> None:
    model, method = lilora_model()
    old = copy.deepcopy(model)
    patch_old_lilora(old)
    first = next(iter(branches(model).values()))
    opt_new = torch.optim.SGD(method.trainable_parameters(model), lr=0.1)
    opt_old = torch.optim.SGD([p for p in old.parameters() if p.requires_grad], lr=0.1)
    # gradient accumulation: two micro-batches (forward, backward each), then one step
    for twin in (model, old):
        for seed in (1, 2):
            lilora_step(twin, seed).backward()
    assert_same_grads(model, old)
    opt_new.step(), opt_old.step()
    # two forwards sharing the values, then two backward calls
    model.zero_grad(), old.zero_grad()
    for twin in (model, old):
        losses = [lilora_step(twin, seed) for seed in (3, 4)]
        for loss in losses:
            loss.backward()
    assert_same_grads(model, old)
    # built without grad (evaluation), then used with grad: rebuilt, so gradients reach P, Q, g
    model.zero_grad(), old.zero_grad()
    with torch.no_grad():
        lilora_step(model, 5)
    assert not first.ups.values[0].requires_grad  # type: ignore[index]
    for twin in (model, old):
        lilora_step(twin, 5).backward()
    assert_same_grads(model, old)
    # an in-place change without a backward (load_state_dict, a hand edit) is seen
    with torch.no_grad():
        lilora_step(model, 6)
        first.P["t0"].add_(1.0)
        dict(old.named_parameters())[[n for n, p in model.named_parameters() if p is first.P["t0"]][0]].add_(1.0)
        assert torch.equal(lilora_step(model, 6), lilora_step(old, 6))
    # a new task (new factors, B0 frozen) and switching tasks
    for twin in (model, old):
        torch.manual_seed(3)  # the new task's Q and g are drawn
        method.begin_task(twin, "t1", 1) if twin is model else LiLoRA(method.config).begin_task(twin, "t1", 1)
    with torch.no_grad():
        for twin in (model, old):
            for b in branches(twin).values():
                b.P["t1"].normal_(generator=torch.Generator().manual_seed(7))
        assert torch.equal(lilora_step(model, 8), lilora_step(old, 8))
        set_task(model, "t0"), set_task(old, "t0")
        assert torch.equal(lilora_step(model, 8), lilora_step(old, 8))
    # copies and pickles carry no built values and keep the branches linked
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        found = list(branches(twin).values())
        assert found[0].ups is not first.ups and all(b.ups is found[0].ups for b in found)
        assert found[0].ups.values is None
        with torch.no_grad():
            assert torch.equal(lilora_step(twin, 8), lilora_step(old, 8))


def test_lilora_gradient_checkpointing_reuses_the_forward_values() -> None:
    model, _ = lilora_model(dropout=0.0)
    plain = copy.deepcopy(model)
    model.train(), plain.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lilora_step(model, 1).backward()
    lilora_step(plain, 1).backward()
    assert_same_grads(model, plain)


def test_lilora_factors_not_materialised_are_left_to_their_branch() -> None:
    """DeepSpeed ZeRO-3 holds a parameter as an empty tensor until its module runs (and again after it,
    unless persistent): the other branches still build together, that one builds its own B_t."""
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 5))
    inject_adapters(model, LiLoRAConfig(targets=["0", "1", "2"], rank=4, inner_rank=2, dropout=0.0))
    add_task(model, "a")
    found = branches(model)
    with torch.no_grad():
        for b in found.values():
            b.B0.normal_(), b.P["a"].normal_()
    x = torch.randn(3, 5)
    second, third = found["1"], found["2"]
    kept = third.P["a"].data
    third.P["a"].data = torch.empty(0)  # partitioned
    assert torch.equal(second(x), ref.lilora_forward(second, x))
    assert second.ups.values[2] is None and second.ups.values[1] is not None
    third.P["a"].data = kept  # fetched: its stamp changed, so the values are rebuilt with it
    assert torch.equal(third(x), ref.lilora_forward(third, x)) and second.ups.values[2] is not None
    third.P["a"].ds_persist = False  # a ZeRO-3 parameter that is partitioned again after each forward
    second.ups.clear()
    assert torch.equal(third(x), ref.lilora_forward(third, x)) and second.ups.values[2] is None


def test_lilora_branches_without_a_link_use_the_per_weight_formula() -> None:
    layer = nn.Linear(6, 5)
    inject_adapters(layer_holder := nn.Sequential(layer), LiLoRAConfig(targets=["0"], rank=4, inner_rank=2))
    add_task(layer_holder, "a")
    branch = next(iter(branches(layer_holder).values()))
    assert isinstance(branch, LiLoRABranch) and branch.ups is not None
    branch.ups = None  # e.g. a branch built by hand
    x = torch.randn(3, 6)
    assert torch.equal(branch(x), ref.lilora_forward(branch, x))
