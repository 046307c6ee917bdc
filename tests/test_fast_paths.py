"""Issue 15 made the Rank-1 pool and LiLoRA cheap per step (fused routing, a mask multiply, batched
B_t). These tests hold the fast paths to the code they replaced (tests/reference_impls.py, the
code of commit 0e986d3): same seeds, same inputs; votes, counts, masks and merged sets exactly,
outputs and gradients to atol 1e-6 (the pool's mask multiply and folded scale change fp32
rounding) or exactly (LiLoRA's batched B_t)."""

from __future__ import annotations

import copy
import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import reference_impls as ref
import torch
import torch.nn.functional as F
from conftest import clip_inputs, make_tiny_clip
from torch import nn

from continual_lora.adapters import add_task, branches, inject_adapters, set_task
from continual_lora.adapters.base import in_backward
from continual_lora.methods import LiLoRA, LiLoRAConfig, Rank1Pool, Rank1PoolConfig
from continual_lora.methods import rank1_kernels as routing
from continual_lora.methods.lilora import LiLoRABranch
from continual_lora.methods.rank1_pool import Rank1PoolBranch

ATOL = 1e-6


# one intra-op thread (conftest): also makes the batched reductions run in the per-weight code's order
pytestmark = pytest.mark.usefixtures("one_thread")


def close(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m} (max |value| {b.abs().max():.3g})")


# --- the routing operator -------------------------------------------------------------------
def spec_route(probs: torch.Tensor, top_r: int) -> tuple[list[int], list[int]]:
    """rank1_pool.md in plain Python: per-sample top-R votes, then the R most-voted experts
    (ties: lower index; NaN above every number, as torch.sort)."""
    def order(values: list[float]) -> list[int]:
        key = [(0 if v != v else 1, -v if v == v else 0.0, i) for i, v in enumerate(values)]
        return [i for *_, i in sorted(key)]

    r = probs.shape[1]
    votes = [0] * r
    for row in probs.tolist():
        for i in order(row)[:top_r]:
            votes[i] += 1
    chosen = sorted(order([float(v) for v in votes])[:top_r])
    return votes, chosen


def probe_probs(kind: str, n: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "softmax":
        return torch.randn(n, r, generator=g).softmax(-1)
    p = torch.randint(0, 3, (n, r), generator=g).float()  # many ties
    if kind == "nan":
        p[torch.rand(n, r, generator=g) < 0.2] = float("nan")
    return p


@pytest.mark.parametrize("kind", ["softmax", "ties", "nan"])
@pytest.mark.parametrize("n, r, top_r", [(1, 4, 2), (5, 6, 3), (32, 12, 8), (7, 12, 1), (9, 5, 5), (0, 4, 2)])
def test_route_operator_is_the_spec_and_the_old_code(kind: str, n: int, r: int, top_r: int) -> None:
    probs = probe_probs(kind, n, r, seed=n * 100 + r)
    counts = torch.arange(r)
    multiplier, votes = routing.rank1_route(probs, counts, top_r, 0.25, True, torch.float32)
    spec_votes, spec_chosen = spec_route(probs, top_r)
    assert votes.tolist() == spec_votes and votes.dtype == torch.long
    assert multiplier.nonzero().flatten().tolist() == spec_chosen
    assert set(multiplier.tolist()) <= {0.0, 0.25} and counts.tolist() == [i + v for i, v in enumerate(spec_votes)]
    # the code before issue 15 (kind "nan" included: both rank NaN first)
    old_top = ref.ranked(probs)[:, :top_r]
    old_votes = torch.zeros(probs.shape, dtype=torch.long).scatter_(1, old_top, 1).sum(0)
    assert torch.equal(votes, old_votes)
    assert ref.ranked(old_votes)[:top_r].sort().values.tolist() == spec_chosen
    # the two halves (data-parallel path) and a count-free call give the same
    again = torch.arange(r)
    assert torch.equal(routing.rank1_votes(probs, top_r), votes)
    assert torch.equal(routing.rank1_mask(votes, again, top_r, 0.25, False, torch.bfloat16), multiplier.bfloat16())
    assert again.tolist() == list(range(r))


def test_route_operator_has_a_fake_kernel_for_the_compiler() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        probs, counts = torch.empty(5, 12), torch.zeros(12, dtype=torch.long)
        multiplier, votes = routing.rank1_route(probs, counts, 8, 0.1, True, torch.bfloat16)
    assert (multiplier.shape, multiplier.dtype, votes.shape, votes.dtype) == ((12,), torch.bfloat16, (12,), torch.long)


# --- the pool's branch against the old branch -------------------------------------------------
def random_pool(seed: int, in_f: int = 16, out_f: int = 12, **kw) -> Rank1PoolBranch:
    torch.manual_seed(seed)
    branch = Rank1PoolConfig(**{"rank": 6, "top_r": 3, **kw}).build_branch(in_f, out_f)
    with torch.no_grad():
        branch.lora_B.normal_(std=0.1)  # (B = 0 at init would hide the output and A's gradient)
    return branch


CASES = [
    dict(),
    dict(dropout=0.0),
    dict(router_mode="learned"),
    dict(router_mode="learned", dropout=0.0, routing_token="mean"),
    dict(rank=12, top_r=8),
    dict(rank=12, top_r=1, merge_k=1, routing_token=2),
    dict(rank=5, top_r=5),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("layout", ["batch_first", "seq_first", "rows"])
def test_pool_branch_matches_the_old_branch(case: int, layout: str) -> None:
    kw = CASES[case]
    new = random_pool(case, **kw)
    old = copy.deepcopy(new)
    shape = {"batch_first": (6, 5, 16), "seq_first": (5, 6, 16), "rows": (7, 16)}[layout]
    new.seq_dim = old.seq_dim = 0 if layout == "seq_first" else 1
    old_counts = old.counts.clone()
    for step in range(3):  # counts accumulate over steps
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(step))  # unit scale, as activations
        x_new, x_old = x.clone().requires_grad_(), x.clone().requires_grad_()
        new.train(), old.train()
        torch.manual_seed(10 + step)
        y_new = new(x_new)
        torch.manual_seed(10 + step)
        y_old = ref.rank1_forward(old, x_old, old_counts)
        close(y_new, y_old, "output")
        weights = torch.randn(y_new.shape, generator=torch.Generator().manual_seed(99))
        (y_new * weights).sum().backward()
        (y_old * weights).sum().backward()
        close(x_new.grad, x_old.grad, "input gradient")
        for name, p_new in new.named_parameters():
            p_old = dict(old.named_parameters())[name]
            if p_old.grad is None:
                assert p_new.grad is None, name  # vote mode: the router gets no gradient
            else:
                close(p_new.grad, p_old.grad, name)
        assert torch.equal(new.counts, old_counts)
        with torch.no_grad():
            mask, probs, votes = new.route(x)
            old_mask, old_probs, old_votes = ref.rank1_route(old, x)
        assert torch.equal(mask, old_mask) and torch.equal(votes, old_votes) and torch.equal(probs, old_probs)
    assert torch.equal(new.merge_set(), ref.rank1_merge_set(old_counts, new.merge_k))
    new.eval(), old.eval()  # evaluation: same output, nothing counted
    with torch.no_grad():
        close(new(x), ref.rank1_forward(old, x, old_counts))
    assert torch.equal(new.counts, old_counts)
    forced = torch.tensor([0, new.rank - 1])
    new.forced_mask = forced
    with torch.no_grad():
        close(new(x), ref.rank1_forward(old, x, old_counts, forced_mask=forced))


def test_pool_branch_under_bf16_autocast_stays_close() -> None:
    new = random_pool(3, dropout=0.0)
    old = copy.deepcopy(new)
    x = torch.randn(4, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_new, y_old = new(x), ref.rank1_forward(old, x, old.counts.clone())
    assert y_new.dtype == y_old.dtype == torch.bfloat16
    torch.testing.assert_close(y_new.float(), y_old.float(), atol=2e-2, rtol=2e-2)


def patch_old_pool(model: nn.Module, method: Rank1Pool) -> None:
    """Make every pool branch of ``model`` and the method's AGO loss run the code before issue 15."""
    pool = list(branches(model).values())
    for branch in pool:
        def forward(x, branch=branch):
            return ref.rank1_forward(branch, x, branch.counts, branch.forced_mask, count=not in_backward())
        branch.forward = forward
    method.loss_terms = lambda model, batch=None, context=None: {"ago": ref.rank1_ago_loss(pool, method.config.ago_lambda)}


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


def test_pool_training_run_matches_the_old_code() -> None:
    """Two tasks on the tiny CLIP (AGO on the second): per-step losses, weights, counts, records and
    the merged sets S of today's code against the old forward."""
    base = make_tiny_clip()
    cfg = Rank1PoolConfig(rank=6, top_r=4, dropout=0.2)
    (new, _, new_losses), (old, _, old_losses) = train_twins(Rank1Pool, cfg, base, patch_old_pool)
    torch.testing.assert_close(torch.tensor(new_losses), torch.tensor(old_losses), atol=ATOL, rtol=0)
    new_state, old_state = new.state_dict(), old.state_dict()
    assert list(new_state) == list(old_state)
    for key in new_state:
        if key.endswith((".S", ".counts")):
            assert torch.equal(new_state[key], old_state[key]), key  # merged sets and counts: exact
        else:
            close(new_state[key], old_state[key], key)


@pytest.mark.parametrize("past", ["merged", "all"])
def test_pool_ago_loss_batched_over_layers_matches_the_old_loss(past: str) -> None:
    """Three finished tasks, then the running pool: the AGO value and B's gradient against one term per
    branch. Branches of three shapes (two groups share a shape)."""
    model = nn.Sequential(nn.Linear(8, 10), nn.Linear(10, 10), nn.Linear(10, 6), nn.Linear(8, 10))
    method = Rank1Pool(Rank1PoolConfig(targets=["0", "1", "2", "3"], rank=6, top_r=4, merge_k=2, ago_past=past))
    torch.manual_seed(0)
    method.attach(model)
    pool = list(branches(model).values())
    for index in range(4):
        method.begin_task(model, f"t{index}", index)
        with torch.no_grad():
            for branch in pool:
                branch.lora_B.normal_()
                branch.counts.copy_(torch.randint(0, 3, (6,)))  # ties in the counts
        if index < 3:
            method.end_task(model, f"t{index}", index)
    new_loss = method.loss_terms(model, None)["ago"]
    new_loss.backward()
    new_grads = [b.lora_B.grad.clone() for b in pool]
    model.zero_grad()
    old_loss = ref.rank1_ago_loss(pool, method.config.ago_lambda)
    old_loss.backward()
    close(new_loss, old_loss, "AGO value")
    for branch, grad in zip(pool, new_grads):
        close(grad, branch.lora_B.grad, "B's gradient")  # (a batched matmul: equal to fp32 rounding)


# --- LiLoRA: batched B_t ----------------------------------------------------------------------
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
    (new, _, new_losses), (old, _, old_losses) = train_twins(LiLoRA, cfg, base, patch_old_lilora, steps=4)
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


# --- Triton kernel (optional; checked on the CPU through Triton's interpreter) -----------------
def test_triton_switch() -> None:
    env = os.environ.get("CONTINUAL_LORA_TRITON")
    try:
        os.environ["CONTINUAL_LORA_TRITON"] = "0"
        assert not routing.triton_available()
    finally:
        if env is None:
            os.environ.pop("CONTINUAL_LORA_TRITON", None)
        else:
            os.environ["CONTINUAL_LORA_TRITON"] = env


TRITON_CHECK = r"""
import torch
from continual_lora.methods import rank1_kernels as routing
g = torch.Generator().manual_seed(0)
for trial in range(40):
    r = [2, 3, 6, 8, 12, 16, 33, 64][trial % 8]
    top_r, n = 1 + trial % r, [1, 2, 5, 17, 32][trial % 5]
    p = torch.randint(0, 3, (n, r), generator=g).float() if trial % 3 else torch.randn(n, r, generator=g).softmax(-1)
    if trial % 3 == 2:
        p[torch.rand(n, r, generator=g) < 0.2] = float("nan")
    counts = torch.randint(0, 5, (r,), generator=g)
    c_aten, c_triton = counts.clone(), counts.clone()
    m_aten, v_aten = routing.route_aten(p, c_aten, top_r, 0.25, True, torch.float32)
    m_triton, v_triton = routing.route_triton(p, None, c_triton, top_r, 0.25, True, torch.float32)
    assert torch.equal(m_aten, m_triton) and torch.equal(v_aten, v_triton) and torch.equal(c_aten, c_triton), trial
    assert torch.equal(routing.route_triton(p, None, None, top_r, 0.0, False, None)[1], v_aten), trial
    c_half = counts.clone()
    half = routing.route_triton(None, v_aten, c_half, top_r, 0.25, True, torch.bfloat16)[0]
    assert torch.equal(half, m_aten.bfloat16()) and torch.equal(c_half, c_aten), trial
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (GPU only)")
def test_triton_kernel_equals_the_aten_path_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).parent, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
