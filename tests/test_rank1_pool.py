"""Rank-1 Expert Pool (arXiv 2601.22828): routing, AGO, merge, records, parameter count.

Hand-set routers and factors give exact expected masks, counts and AGO values; training runs
use tiny CPU models (conftest.py) for a few steps.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import clip_inputs, make_seq_first, make_tiny_clip
from torch import nn
from transformers import CLIPConfig, CLIPModel

from continual_lora.adapters import (
    AdaptedLinear,
    AdaptedMultiheadAttention,
    branches,
    config_from_dict,
    parameter_counts,
)
from continual_lora.methods import Rank1Pool, Rank1PoolConfig, build_method
from continual_lora.methods.rank1_pool import (
    Rank1PoolBranch,
    export_records,
    forcing_merge_mask,
    load_records,
    replay_records,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: intra-op threads only add contention (10x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- helpers -----------------------------------------------------------------------------
def identity_router_branch(rank: int = 4, top_r: int = 2, **kw) -> Rank1PoolBranch:
    """in = out = r, router(x) = x, A = B = I: token 0 *is* the logits; output shows the mask."""
    branch = Rank1PoolConfig(rank=rank, top_r=top_r, dropout=0.0, **kw).build_branch(rank, rank)
    with torch.no_grad():
        branch.router.weight.copy_(torch.eye(rank))
        branch.router.bias.zero_()
        branch.lora_A.copy_(torch.eye(rank))
        branch.lora_B.copy_(torch.eye(rank))
    return branch


def with_token0(logits: list[list[float]], length: int = 3) -> torch.Tensor:
    """(N, r) logits -> (N, L, r) input whose token 0 holds them; other tokens are large noise."""
    logits_t = torch.tensor(logits)
    x = torch.randn(len(logits), length, logits_t.shape[1], generator=torch.Generator().manual_seed(0)) * 10
    x[:, 0] = logits_t
    return x


def seq_first_batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, 16, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(n)]


def train_task(method: Rank1Pool, model: nn.Module, task: str, index: int, batches, loss_fn) -> list[float]:
    """begin_task + a few AdamW steps; returns the AGO values seen."""
    method.begin_task(model, task, index)
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=2e-2)
    model.train()
    agos = []
    for batch in batches:
        ago = method.loss_terms(model, batch)["ago"]
        loss = loss_fn(model, batch) + ago
        opt.zero_grad()
        loss.backward()
        opt.step()
        agos.append(float(ago.detach()))
    model.eval()
    return agos


def seq_first_loss(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def clip_loss(model: nn.Module, batch) -> torch.Tensor:
    return model(**batch, return_loss=True).loss


def plain_state(model: nn.Module, method: Rank1Pool) -> dict[str, torch.Tensor]:
    return method.prepare_inference(copy.deepcopy(model)).state_dict()


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# --- config ------------------------------------------------------------------------------
def test_config_defaults_validation_and_registry():
    cfg = Rank1PoolConfig()
    assert (cfg.rank, cfg.top_r, cfg.merge_k, cfg.alpha, cfg.dropout) == (12, 8, 4, 1.0, 0.2)
    assert (cfg.router_mode, cfg.routing_token, cfg.ago_lambda, cfg.ago_past) == ("vote", 0, 0.1, "merged")
    assert config_from_dict(cfg.to_dict()) == cfg
    assert isinstance(build_method("rank1_pool", rank=6, top_r=4), Rank1Pool)
    assert Rank1Pool.uses_task_id is False
    for bad in (dict(rank=0), dict(top_r=13), dict(top_r=1), dict(merge_k=13), dict(alpha=0),
                dict(dropout=1.0), dict(router_mode="soft"), dict(routing_token="cls"),
                dict(routing_token=True), dict(ago_lambda=-1), dict(ago_past="last")):
        with pytest.raises(ValueError):
            Rank1PoolConfig(**bad)


# --- routing -----------------------------------------------------------------------------
def test_mask_votes_ties_and_counts():
    branch = identity_router_branch()  # r = 4, R = 2
    # per-sample top-2: {0, 1}, {1, 2}, {2, 3} -> votes [1, 2, 2, 1] -> mask {1, 2}
    disagree = with_token0([[5, 4, 0, 0], [0, 4, 5, 0], [0, 0, 4, 5]])
    mask, _, votes = branch.route(disagree)
    assert mask.tolist() == [1, 2] and votes.tolist() == [1, 2, 2, 1]
    # votes [1, 1, 1, 1]: every expert tied -> the lowest indices
    tied = with_token0([[0, 0, 5, 4], [5, 4, 0, 0]])
    assert branch.route(tied)[0].tolist() == [0, 1]
    # a sample with all-equal scores votes for the lowest indices too
    assert branch.route(with_token0([[0, 0, 0, 0]]))[2].tolist() == [1, 1, 0, 0]

    # forward uses exactly the mask: A = B = I, so only coordinates 1, 2 pass, scaled by alpha / r
    branch.train()
    y = branch(disagree)
    torch.testing.assert_close(y[..., [1, 2]], disagree[..., [1, 2]] * (1.0 / 4))
    assert y[..., [0, 3]].abs().max() == 0
    assert branch.counts.tolist() == [1, 2, 2, 1]
    branch(tied)
    assert branch.counts.tolist() == [2, 3, 3, 2]
    branch.eval()
    branch(disagree)
    assert branch.counts.tolist() == [2, 3, 3, 2]  # no counting in eval mode
    # forced mask: no routing, no counting
    branch.train()
    branch.forced_mask = torch.tensor([3])
    y = branch(disagree)
    assert y[..., :3].abs().max() == 0 and branch.counts.tolist() == [2, 3, 3, 2]


def test_votes_are_all_reduced_before_the_mask_under_torch_distributed(monkeypatch):
    """Every rank must choose the same experts: the mask and counts use the summed votes."""
    import continual_lora.methods.rank1_pool as r1

    def all_reduce(votes):  # a second rank that voted [0, 0, 3, 3]
        votes += torch.tensor([0, 0, 3, 3])

    monkeypatch.setattr(r1.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(r1.dist, "all_reduce", all_reduce)
    branch = identity_router_branch()
    branch.train()
    branch(with_token0([[5, 4, 0, 0], [4, 5, 0, 0]]))  # locally {0, 1} twice
    assert branch.route(with_token0([[5, 4, 0, 0]]))[0].tolist() == [2, 3]
    assert branch.counts.tolist() == [2, 2, 3, 3]


def test_routing_token_axis_and_mean_pooling():
    branch = Rank1PoolConfig(rank=6, top_r=3).build_branch(8, 8)
    branch.seq_dim = 0
    x = torch.randn(5, 3, 8)  # (L, N, D)
    probs = branch.route(x)[1]
    assert probs.shape == (3, 6)
    torch.testing.assert_close(probs, branch.router(x[0]).softmax(-1))
    changed = x.clone()
    changed[0, 1] += 3.0  # token 0 of sample 1
    new = branch.route(changed)[1]
    assert not torch.allclose(new[1], probs[1]) and torch.equal(new[[0, 2]], probs[[0, 2]])
    changed = x.clone()
    changed[2, 1] += 3.0  # another token of sample 1
    assert torch.equal(branch.route(changed)[1], probs)
    # 2-D inputs route on each row; "mean" pools over the token axis; any length works
    torch.testing.assert_close(branch.route(x[0])[1], probs)
    pooled = Rank1PoolConfig(rank=6, top_r=3, routing_token="mean").build_branch(8, 8)
    for seq_dim in (0, 1):
        pooled.seq_dim = seq_dim
        xb = torch.randn(11, 11, 8)
        torch.testing.assert_close(pooled.route(xb)[1], pooled.router(xb.mean(seq_dim)).softmax(-1))


@pytest.mark.parametrize("mode", ["vote", "learned"])
def test_router_gradient_by_mode(mode):
    torch.manual_seed(0)
    branch = Rank1PoolConfig(rank=6, top_r=3, router_mode=mode).build_branch(8, 5)
    with torch.no_grad():
        branch.lora_B.normal_()
    branch.train()
    x = torch.randn(4, 7, 8)
    mask = branch.route(x)[0]
    branch(x).pow(2).sum().backward()
    if mode == "vote":
        assert branch.router.weight.grad is None and branch.router.bias.grad is None
    else:
        assert branch.router.weight.grad.abs().sum() > 0
    unselected = [i for i in range(6) if i not in mask.tolist()]
    assert branch.lora_A.grad[unselected].abs().max() == 0  # unselected experts get no gradient
    assert branch.lora_A.grad[mask].abs().sum() > 0


# --- AGO ---------------------------------------------------------------------------------
@pytest.mark.parametrize("past, expected", [("merged", 0.4), ("all", 0.95)])
def test_ago_hand_example(past, expected):
    # layer "0": task 1 B = [[1, 2], [3, 4]], counts [5, 1] -> merged column p = (1, 3)
    #            task 2 B = [[1, 0], [-1, 2]], counts [0, 3] -> critical b = (0, 2)
    #            merged: |b.p| = 6;  all: 6 + |(0, 2).(2, 4)| = 14
    # layer "1": task 1 B = [[0, 1], [1, 0]], counts [0, 2] -> merged p = (1, 0)
    #            task 2 B = [[2, 1], [3, -1]], counts [4, 4] (tie -> expert 0) -> b = (2, 3)
    #            merged: 2;  all: |(2, 3).(0, 1)| + 2 = 5
    # L = 0.1 * mean over 2 layers: merged 0.1 * 8 / 2 = 0.4, all 0.1 * 19 / 2 = 0.95
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    method = Rank1Pool(Rank1PoolConfig(targets=("0", "1"), rank=2, top_r=2, merge_k=1, ago_past=past))
    method.attach(model)
    pool = branches(model)
    plan = {"0": ([[1, 2], [3, 4]], [5, 1], [[1, 0], [-1, 2]], [0, 3]),
            "1": ([[0, 1], [1, 0]], [0, 2], [[2, 1], [3, -1]], [4, 4])}
    method.begin_task(model, "t1", 0)
    assert float(method.loss_terms(model, None)["ago"]) == 0.0
    with torch.no_grad():
        for name, (b1, c1, _, _) in plan.items():
            pool[name].lora_B.copy_(torch.tensor(b1, dtype=torch.float))
            pool[name].counts.copy_(torch.tensor(c1))
    method.end_task(model, "t1", 0)
    method.begin_task(model, "t2", 1)
    with torch.no_grad():
        for name, (_, _, b2, c2) in plan.items():
            pool[name].lora_B.copy_(torch.tensor(b2, dtype=torch.float))
            pool[name].counts.copy_(torch.tensor(c2))
    ago = method.loss_terms(model, None)["ago"]
    assert ago.item() == pytest.approx(expected, abs=1e-6)
    ago.backward()
    assert pool["0"].lora_B.grad[:, 0].abs().max() == 0 and pool["0"].lora_B.grad[:, 1].abs().sum() > 0
    assert pool["1"].records["t1"].B.grad is None  # past columns are constants


# --- merge, unload, models ---------------------------------------------------------------
def check_two_tasks(base: nn.Module, method: Rank1Pool, batches, loss_fn, forward) -> None:
    """Train two tasks; at each boundary: forced-mask adapted output == merged plain output."""
    model = copy.deepcopy(base)
    method.attach(model)
    out_base = forward(base)
    for index, task in enumerate(("t1", "t2")):
        before = {name: b.lora_A.detach().clone() for name, b in branches(model).items()}
        method.begin_task(model, task, index)  # fresh pool: new A draw, B = 0, zero counts
        for name, b in branches(model).items():
            assert not torch.equal(b.lora_A, before[name]) and b.lora_B.abs().max() == 0
            assert int(b.counts.abs().sum()) == 0
        agos = train_task(method, model, task, index, batches[index], loss_fn)
        assert (max(agos) > 0) == (index > 0)  # AGO only from the second task on
        assert all(int(b.counts.sum()) > 0 for b in branches(model).values())
        with torch.no_grad(), forcing_merge_mask(model):
            adapted = forward(model)
        method.end_task(model, task, index)
        plain = method.prepare_inference(copy.deepcopy(model))
        with torch.no_grad():
            merged = forward(plain)
        torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
        assert not torch.allclose(merged, out_base, atol=1e-4)  # the tasks did change the model
    plain = method.prepare_inference(model)
    assert [type(m) for m in plain.modules()] == [type(m) for m in base.modules()]
    assert list(plain.state_dict()) == list(base.state_dict())
    assert not any(isinstance(m, (AdaptedLinear, AdaptedMultiheadAttention)) for m in plain.modules())


def test_merge_equivalence_tiny_clip():
    base = make_tiny_clip()
    cfg = Rank1PoolConfig(rank=6, top_r=4)
    batches = [[clip_inputs(batch=4, seed=s + 10 * t) for s in range(3)] for t in range(2)]
    probe = clip_inputs(batch=3, seed=99)

    def forward(m):
        out = m(**probe)
        return torch.cat([out.image_embeds, out.text_embeds], dim=1)

    check_two_tasks(base, Rank1Pool(cfg), batches, clip_loss, forward)


def test_merge_equivalence_multihead_attention_seq_first():
    base = make_seq_first()
    method = Rank1Pool(Rank1PoolConfig(rank=6, top_r=4, seq_dim=0))
    probe = torch.randn(5, 4, 16)
    batches = [seq_first_batches(3, seed=t) for t in range(2)]
    check_two_tasks(base, method, batches, seq_first_loss, lambda m: m(probe))


def test_seq_first_router_reads_token0_of_each_sample():
    model = make_seq_first()
    Rank1Pool(Rank1PoolConfig(rank=6, top_r=3, seq_dim=0)).attach(model)
    pool = branches(model)
    assert pool["blocks.0.fc1"].seq_dim == 0 and pool["blocks.0.attn.q_proj"].seq_dim == 1
    seen = {}
    pool["blocks.0.attn.q_proj"].register_forward_pre_hook(lambda mod, args: seen.update(p=mod.route(args[0])[1]))
    x = torch.randn(5, 4, 16)  # (L, N, D)
    with torch.no_grad():
        model(x)
        probs = seen["p"]
        assert probs.shape == (4, 6)
        x0 = x.clone()
        x0[0, 2] += 2.0  # token 0 of sample 2
        model(x0)
        assert not torch.allclose(seen["p"][2], probs[2]) and torch.equal(seen["p"][[0, 1, 3]], probs[[0, 1, 3]])
        x3 = x.clone()
        x3[3, 2] += 2.0  # token 3 of sample 2
        model(x3)
        assert torch.equal(seen["p"], probs)


# --- records and checkpoints -------------------------------------------------------------
def test_records_replay_and_save_load_round_trip(tmp_path):
    base = make_seq_first()
    cfg = Rank1PoolConfig(rank=6, top_r=4, seq_dim=0, ago_past="all")
    method = Rank1Pool(cfg)
    model = copy.deepcopy(base)
    method.attach(model)
    snapshots = [base.state_dict()]
    for index, task in enumerate(("t1", "t2", "t3")):
        train_task(method, model, task, index, seq_first_batches(2, seed=index), seq_first_loss)
        method.end_task(model, task, index)
        snapshots.append(plain_state(model, method))
    records = export_records(model)
    assert records.tasks == ["t1", "t2", "t3"]
    # per task and weight: B[:, S] + A[S, :] (k = 2) and, with ago_past="all", the full B (r = 6)
    per_weight = sum(2 * (b.in_features + b.out_features) + 6 * b.out_features for b in branches(model).values())
    assert parameter_counts(model)["per_task"] == {t: per_weight for t in ("t1", "t2", "t3")}
    for j in range(4):
        assert_same_state(replay_records(copy.deepcopy(base), records, j).state_dict(), snapshots[j])
    assert_same_state(replay_records(copy.deepcopy(base), records, "t2").state_dict(), snapshots[2])
    assert not torch.allclose(snapshots[1]["blocks.0.fc1.weight"], snapshots[2]["blocks.0.fc1.weight"])

    # a checkpoint taken mid-task 4 (pool trained, counts running) loads into a fresh base model
    train_task(method, model, "t4", 3, seq_first_batches(2, seed=7), seq_first_loss)
    method.save(model, str(tmp_path))
    fresh, reloaded = copy.deepcopy(base), Rank1Pool(cfg)
    reloaded.load(fresh, str(tmp_path))
    fresh.eval()  # injected branches start in training mode (dropout, counting)
    assert reloaded.trained_tasks == ["t1", "t2", "t3"]
    probe = torch.randn(5, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(probe), model(probe), atol=1e-6, rtol=0)
    for name, branch in branches(model).items():
        assert torch.equal(branches(fresh)[name].counts, branch.counts)
    assert_same_state(plain_state(fresh, reloaded), plain_state(model, method))
    from_disk = load_records(str(tmp_path))
    assert_same_state(replay_records(copy.deepcopy(base), from_disk, 3).state_dict(), snapshots[3])


# --- parameter count ---------------------------------------------------------------------
def test_parameter_count_vit_b16_release_setting_on_meta():
    config = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, patch_size=16, image_size=224),
        projection_dim=512,
    )
    with torch.device("meta"):
        model = CLIPModel(config)
    Rank1Pool(Rank1PoolConfig(rank=12)).attach(model)
    counts = parameter_counts(model)
    assert counts["adapted_layers"] == 144
    # per layer r (in + out) for A, B and in * r + r for the router
    assert counts["trainable"] == counts["shared"] == 4_978_368
    assert math.isclose(counts["trainable"] * 4 / 2**20, 18.99, abs_tol=0.01)  # fp32 MB, as reported


def test_gradient_checkpointing_counts_votes_once() -> None:
    """A checkpointed block re-runs its forward inside backward; the votes must not count twice."""
    from torch.utils.checkpoint import checkpoint

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    method = Rank1Pool(Rank1PoolConfig(targets=["0"], rank=4, top_r=2, dropout=0.0))
    method.attach(model)
    method.begin_task(model, "t", 0)
    model.train()
    x = torch.randn(5, 3, 8, requires_grad=True)
    checkpoint(model, x, use_reentrant=False).sum().backward()
    branch = next(iter(branches(model).values()))
    assert int(branch.counts.sum()) == 5 * 2  # 5 samples x top_r votes, counted once
