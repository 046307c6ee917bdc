"""Six baselines: zero_shot, per_task_lora, joint_lora, o_lora, sd_lora, moe_lora.

One test per method checks its defining mechanism on a tiny model (hand computations, fixed
seeds); tests/test_trainer.py runs each through ContinualTrainer on the synthetic stream of
conftest.py and checks that a run resumed from its checkpoint gives the same matrix.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import METHOD_ARGS, TASKS, TRAIN, make_plain, run_stream

from continual_lora.adapters import branches, parameter_counts
from continual_lora.app.runner import RunConfig, results_dict
from continual_lora.contract import TaskContext
from continual_lora.kinds.clip import ClipClassification
from continual_lora.methods import build_method
from continual_lora.methods.sd_lora import frobenius

PLAIN = ("fc1", "fc2")  # adapted layers of conftest's PlainNet (10 -> 20 -> 5 -> 3)

pytestmark = pytest.mark.usefixtures("one_thread")


class CountingKind(ClipClassification):
    """The CLIP kind, counting the training batches drawn from each task."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drawn: Counter[str] = Counter()

    def train_batch(self, task, indices, generator):
        self.drawn[task.name] += 1
        return super().train_batch(task, indices, generator)


def plain_forward(base, x, deltas):
    """PlainNet's forward with ``W + dW`` for the layers in ``deltas``."""
    h = x
    for name, act in (("fc1", torch.relu), ("fc2", None), ("head", None)):
        layer = getattr(base, name)
        h = F.linear(h, layer.weight + deltas.get(name, 0), layer.bias)
        h = act(h) if act is not None else h
    return h


def train_plain(model, method, task, index, x, steps=3, end=True):
    method.begin_task(model, task, index)
    params = method.trainable_parameters(model)
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        loss = (model(x) - 1.0).square().mean() + sum(method.loss_terms(model, None).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    if end:
        method.end_task(model, task, index)
    return params


# --- one test per method: its defining mechanism ---------------------------------------------------
def test_zero_shot_rows_equal_the_zero_shot_row_and_results_work(clip_stream) -> None:
    kind, base = clip_stream
    method = build_method("zero_shot")
    state, trainer = run_stream(base, method, CountingKind(kind.tokenizer, TASKS), TASKS, TRAIN)
    assert state.finished and all(row == state.zero_shot for row in state.matrix)
    assert state.trainable_params == [0, 0, 0] and state.train_losses == [None, None, None]
    assert branches(trainer.model) == {} and sum(trainer.kind.drawn.values()) == 0
    assert not any(p.requires_grad for p in trainer.model.parameters())
    counts = parameter_counts(trainer.model)
    assert counts["trainable"] == 0 and counts["stored"] == 0 and counts["base"] > 0
    results = results_dict(RunConfig(), "zero_shot", method, state, trainer.model, "mtil")
    assert results["params"]["trainable"] == 0 and results["finished"]
    assert results["metrics"]["last"] == pytest.approx(sum(state.zero_shot) / 3)


def test_per_task_lora_freezes_earlier_tasks_and_evaluates_with_the_tasks_adapter() -> None:
    model, x = make_plain(), torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    base = copy.deepcopy(model)
    method = build_method("per_task_lora", rank=2, alpha=4.0, targets=PLAIN)
    method.attach(model)
    train_plain(model, method, "t1", 0, x)
    found = branches(model)
    t1 = {n: (b.lora_A["t1"].detach().clone(), b.lora_B["t1"].detach().clone()) for n, b in found.items()}
    assert all(b.abs().sum() > 0 for _, b in t1.values())  # task 1 trained
    params = train_plain(model, method, "t2", 1, x)
    assert {id(p) for p in params} == {id(t) for b in found.values() for t in (b.lora_A["t2"], b.lora_B["t2"])}
    for name, branch in found.items():  # task 1's factors bitwise unchanged by task 2
        assert torch.equal(branch.lora_A["t1"], t1[name][0]) and torch.equal(branch.lora_B["t1"], t1[name][1])
    with torch.no_grad():
        hand_t1 = plain_forward(base, x, {n: 2.0 * b @ a for n, (a, b) in t1.items()})
        with method.evaluating(model, "t1"):
            assert torch.allclose(model(x), hand_t1, atol=1e-6)
        with method.evaluating(model, "t2"):
            assert not torch.allclose(model(x), hand_t1, atol=1e-3)
        with method.evaluating(model, "t3"):  # not trained yet: the base model
            assert torch.equal(model(x), base(x))


def test_joint_lora_trains_once_on_every_task(clip_stream) -> None:
    kind, base = clip_stream
    method = build_method("joint_lora", **METHOD_ARGS["joint_lora"])
    counting = CountingKind(kind.tokenizer, TASKS)
    snapshots = []
    state, trainer = run_stream(base, method, counting, TASKS, dataclasses.replace(TRAIN, iterations=1),
                                on_end=lambda s: snapshots.append(dict(counting.drawn)))
    # index 0: 3 steps (the sum of the per-task budgets), each with a batch of every task; then nothing
    assert snapshots == [{"alpha": 3, "beta": 3, "gamma": 3}] * 3
    assert state.matrix[1] == state.matrix[0] and state.matrix[2] == state.matrix[0]
    assert state.trainable_params[0] > 0 and state.trainable_params[1:] == [0, 0]
    assert state.train_losses[0] is not None and state.train_losses[1:] == [None, None]
    # the budget options, through a context alone
    ctx = TaskContext(TASKS[0], 0, TASKS, kind, torch.Generator(), task_steps=(5, 5, 5))
    assert method.train_steps(0, 5, ctx) == 15 and method.train_steps(1, 5, ctx) == 0
    samples = build_method("joint_lora", budget="samples")
    assert samples.train_steps(0, 5, ctx) == 5
    samples.begin_task(trainer.model, "alpha", 0, ctx)
    terms = samples.loss_terms(trainer.model, None, ctx)
    assert sorted(terms) == ["joint/beta", "joint/gamma"] and all(t.requires_grad for t in terms.values())


def test_o_lora_orthogonality_loss_and_summed_forward() -> None:
    model, x = make_plain(), torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    base = copy.deepcopy(model)
    method = build_method("o_lora", rank=2, alpha=2.0, lambda_orth=0.5, targets=PLAIN)
    method.attach(model)
    method.begin_task(model, "t1", 0)
    assert method.loss_terms(model) == {}  # no past task yet
    method.end_task(model, "t1", 0)
    method.begin_task(model, "t2", 1)
    found = branches(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in found.values():  # A_t1 on the first 2 input axes, A_t2 on the next 2: orthogonal rows
            eye = torch.eye(b.in_features)
            b.lora_A["t1"].copy_(eye[:2] * 3.0)
            b.lora_A["t2"].copy_(eye[2:4] * -2.0)
    assert method.loss_terms(model)["orth"].item() == 0.0
    with torch.no_grad():
        for b in found.values():
            for t in ("t1", "t2"):
                b.lora_A[t].copy_(torch.randn(b.lora_A[t].shape, generator=g))
                b.lora_B[t].copy_(torch.randn(b.lora_B[t].shape, generator=g))
    orth = method.loss_terms(model)["orth"]
    hand = 0.5 * sum((b.lora_A["t1"] @ b.lora_A["t2"].T).abs().sum() for b in found.values())
    assert orth.item() > 0 and torch.allclose(orth, hand)
    orth.backward()
    for b in found.values():  # only the current A receives gradient
        assert b.lora_A["t2"].grad is not None and b.lora_A["t2"].grad.abs().sum() > 0
        assert b.lora_A["t1"].grad is None and b.lora_B["t1"].grad is None and b.lora_B["t2"].grad is None
    assert {id(p) for p in method.trainable_parameters(model)} == {
        id(t) for b in found.values() for t in (b.lora_A["t2"], b.lora_B["t2"])}
    with torch.no_grad():  # no task id: the sum of every task's LoRA
        deltas = {n: b.lora_B["t1"] @ b.lora_A["t1"] + b.lora_B["t2"] @ b.lora_A["t2"] for n, b in found.items()}
        assert torch.allclose(model(x), plain_forward(base, x, deltas), atol=1e-5)


def test_sd_lora_frozen_directions_learnable_magnitudes_and_hand_forward() -> None:
    model, x = make_plain(), torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    base = copy.deepcopy(model)
    method = build_method("sd_lora", rank=2, alpha=4.0, magnitude_init=0.8, targets=PLAIN)  # s = 2
    method.attach(model)
    train_plain(model, method, "t1", 0, x, end=False)
    found = branches(model)
    open_m = {n: br.magnitude["t1"].detach().clone() for n, br in found.items()}
    assert all(m != 0.8 for m in open_m.values())  # the open task's magnitude trained too
    with torch.no_grad():
        open_out = model(x)
    method.end_task(model, "t1", 0)
    with torch.no_grad():
        assert torch.allclose(model(x), open_out, atol=1e-6)  # closing keeps the function
    for n, br in found.items():  # ... with alpha_1 <- alpha_1 * s * ||B_1 A_1||_F
        norm = torch.linalg.matrix_norm(br.lora_B["t1"] @ br.lora_A["t1"])
        assert torch.allclose(br.magnitude["t1"], open_m[n] * 2.0 * norm) and br.is_closed("t1")
    a = torch.randn(2, 20, generator=torch.Generator().manual_seed(3))
    b = torch.randn(5, 2, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(frobenius(a, b), torch.linalg.matrix_norm(b @ a))  # the trace identity
    method.begin_task(model, "t2", 1)
    with torch.no_grad():
        for br in found.values():
            br.lora_B["t2"].copy_(torch.randn(br.lora_B["t2"].shape, generator=torch.Generator().manual_seed(5)))
        deltas = {}
        for n, br in found.items():
            d1 = br.lora_B["t1"] @ br.lora_A["t1"]
            deltas[n] = br.magnitude["t1"] * d1 / torch.linalg.matrix_norm(d1) \
                + br.magnitude["t2"] * 2.0 * br.lora_B["t2"] @ br.lora_A["t2"]
        assert torch.allclose(model(x), plain_forward(base, x, deltas), atol=1e-5)
    before = {n: (br.lora_A["t1"].clone(), br.lora_B["t1"].clone(), br.magnitude["t1"].clone())
              for n, br in found.items()}
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    for br in found.values():
        assert br.magnitude["t1"].grad is not None and br.magnitude["t1"].grad.abs() > 0
        assert br.lora_A["t1"].grad is None and br.lora_B["t1"].grad is None
        br.zero_grad()
    method.end_task(model, "t2", 1)
    train_plain(model, method, "t3", 2, x)
    for n, br in found.items():  # past direction bitwise frozen, its magnitude kept learning
        assert torch.equal(br.lora_A["t1"], before[n][0]) and torch.equal(br.lora_B["t1"], before[n][1])
        assert not torch.equal(br.magnitude["t1"], before[n][2])


def test_moe_lora_mixture_equals_hand_computation_and_router_learns() -> None:
    model = make_plain()
    method = build_method("moe_lora", num_experts=3, expert_rank=2, alpha=2.0, lambda_balance=0.1, targets=("fc1",))
    method.attach(model)
    method.begin_task(model, "t1", 0)
    layer = model.fc1
    br = layer.adapter
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=g)
    with torch.no_grad():
        br.router["shared"].copy_(torch.randn(3, 10, generator=g))
        br.experts_A["shared"].copy_(torch.randn(3, 2, 10, generator=g))
        br.experts_B["shared"].copy_(torch.randn(3, 20, 2, generator=g))
    wr, a, b = br.router["shared"], br.experts_A["shared"], br.experts_B["shared"]
    w0, b0 = layer.base_layer.weight, layer.base_layer.bias

    def hand(inp, gates):  # (N, 10), (N, 3) -> (N, 20); scale alpha / r_e = 1
        experts = torch.stack([inp @ (b[e] @ a[e]).T for e in range(3)], dim=1)  # (N, E, 20)
        return inp @ w0.T + b0 + (gates.unsqueeze(-1) * experts).sum(1)

    with torch.no_grad():
        dense = torch.softmax(x @ wr.T, dim=-1)
        assert torch.allclose(layer(x), hand(x, dense), atol=1e-5)
        br.top_k = 1  # top-1: only the best expert, with gate 1
        top1 = F.one_hot((x @ wr.T).argmax(-1), 3).float()
        assert torch.allclose(layer(x), hand(x, top1), atol=1e-5)
        br.top_k, br.routing = 3, "sample"  # one mixture per sample from the mean over its tokens
        x3 = torch.randn(2, 4, 10, generator=g)
        gates = torch.softmax(x3.mean(1) @ wr.T, dim=-1)
        want = torch.stack([hand(x3[i], gates[i].expand(4, 3)) for i in range(2)])
        assert torch.allclose(layer(x3), want, atol=1e-5)
        br.routing = "token"
    model.train()
    out = layer(x)
    terms = method.loss_terms(model, None)
    probs = torch.softmax(x @ wr.T, dim=-1)
    share = F.one_hot(probs.argmax(-1), 3).float().mean(0)
    assert torch.allclose(terms["balance"], 0.1 * 3 * (share * probs.mean(0)).sum())
    assert method.loss_terms(model, None) == {}  # statistics are consumed once
    out.square().mean().backward(retain_graph=True)  # the task loss reaches the router through the gates
    assert wr.grad is not None and wr.grad.abs().sum() > 0
    wr.grad = None
    terms["balance"].backward()  # and so does the balance term
    assert wr.grad is not None and wr.grad.abs().sum() > 0


def test_moe_lora_balance_statistics_are_recorded_once_under_gradient_checkpointing() -> None:
    """A checkpointed block re-runs its forward inside backward; that re-run must not record a
    second set of router statistics (the next step's balance term would average in a stale one)."""
    from torch.utils.checkpoint import checkpoint

    model = make_plain()
    method = build_method("moe_lora", num_experts=3, expert_rank=2, alpha=2.0, lambda_balance=0.1, targets=("fc1",))
    method.attach(model)
    method.begin_task(model, "t1", 0)
    model.train()
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    out = checkpoint(model.fc1, x, use_reentrant=False)
    assert len(model.fc1.adapter.balance_terms) == 1
    out.square().mean().backward()  # recomputes fc1's forward
    assert len(model.fc1.adapter.balance_terms) == 1
