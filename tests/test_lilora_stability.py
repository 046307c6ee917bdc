"""LiLoRA's stability options (methods/lilora.py): ``release`` (B0 frozen after the first task),
``paper`` (L_reg = (1 - sim_t) ||B0 - B0_prev||_F^2, B0 trainable) and ``a_cosine`` (the earlier
cosine loss on A / B0), on tiny CPU models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_lilora import lilora, make, tiny_config, train
from torch import nn

from continual_lora.errors import ConfigDeprecationWarning
from continual_lora.methods import LiLoRA
from continual_lora.methods.lilora import paper_loss, stability_loss


# --- a_cosine: the earlier loss, kept for comparison ----------------------------------------------
def _hand_stability(model: nn.Module, target: str) -> torch.Tensor:
    per_layer = []
    for b in lilora(model).values():
        terms = []
        if target in ("A", "both"):
            a, ap = b.A, b.A_prev  # rows: (r, in)
            terms.append((1 - (a * ap).sum(1) / (a.norm(dim=1) * ap.norm(dim=1))).mean())
        if target in ("B0", "both"):
            m, mp = b.B0, b.B0_prev  # columns: (out, r)
            terms.append((1 - (m * mp).sum(0) / (m.norm(dim=0) * mp.norm(dim=0))).mean())
        per_layer.append(sum(terms) / len(terms))
    return sum(per_layer) / len(per_layer)


@pytest.mark.parametrize("target", ["A", "B0", "both"])
def test_stability_loss(target: str) -> None:
    model, _, method = make(stability="a_cosine", stability_target=target, lambda_stab=0.5,
                            freeze_shared_b_after_first_task=False)
    method.begin_task(model, "t0", 0)
    assert method.loss_terms(model, None) == {}  # no stability term on the first task
    train(model, method, "t0", 0)
    method.begin_task(model, "t1", 1)  # snapshot
    assert stability_loss(model).item() == pytest.approx(0.0, abs=1e-6)
    names = ("A", "B0") if target == "both" else (target,)
    first = next(iter(lilora(model).values()))
    with torch.no_grad():
        for name in names:
            getattr(first, name).add_(torch.randn_like(getattr(first, name)))
    terms = method.loss_terms(model, None)
    assert set(terms) == {"stability"} and terms["stability"].item() > 1e-3
    torch.testing.assert_close(terms["stability"], 0.5 * _hand_stability(model, target))
    model.zero_grad(set_to_none=True)
    terms["stability"].backward()
    for name in names:
        assert getattr(first, name).grad.abs().sum() > 0
    assert LiLoRA(tiny_config()).loss_terms(model, None) == {}  # lambda_stab = 0: the release


def test_lambda_alone_still_means_a_cosine_with_a_warning() -> None:
    with pytest.warns(ConfigDeprecationWarning, match="stability: a_cosine"):
        config = tiny_config(lambda_stab=0.3)  # a 0.2 config: lambda_stab without `stability`
    assert config.stability == "a_cosine" and config.lambda_stab == 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tiny_config().lambda_stab == 0.0 and tiny_config().freeze_shared_b_after_first_task


# --- paper -----------------------------------------------------------------------------------------
def set_factors(branch, task: str, p: torch.Tensor, q: torch.Tensor) -> None:
    with torch.no_grad():
        branch.P[task].copy_(p)
        branch.Q[task].copy_(q)


def paper_pair(seed: int = 0):
    """A tiny model in paper mode after task t0, at the start of t1, with every factor set by hand."""
    model, _, method = make(seed, stability="paper", lambda_stab=2.0)
    method.begin_task(model, "t0", 0)
    method.end_task(model, "t0", 0)
    g = torch.Generator().manual_seed(seed)
    for b in lilora(model).values():
        with torch.no_grad():
            b.B0.copy_(torch.randn(b.B0.shape, generator=g))
    method.begin_task(model, "t1", 1)  # snapshot B0
    return model, method


def test_paper_loss_by_hand() -> None:
    model, method = paper_pair()
    g = torch.Generator().manual_seed(1)
    expected = []
    for b in lilora(model).values():
        out, s, r = b.out_features, b.inner_rank, b.rank
        p0, q0, p1, q1 = (torch.randn(shape, generator=g) for shape in ((out, s), (s, r), (out, s), (s, r)))
        set_factors(b, "t0", p0, q0)
        set_factors(b, "t1", p1, q1)
        delta = torch.randn(b.B0.shape, generator=g)
        with torch.no_grad():
            b.B0.add_(delta)
        sim = F.cosine_similarity((p1 @ q1).flatten(), (p0 @ q0).flatten(), dim=0)
        expected.append((1 - sim) * delta.square().sum())
    terms = method.loss_terms(model, None)
    torch.testing.assert_close(terms["stability"], 2.0 * sum(expected) / len(expected))  # mean over layers
    torch.testing.assert_close(paper_loss(model, "t1", "t0", reduce="sum"), sum(expected))


def test_paper_loss_compares_with_the_task_just_before() -> None:
    model, method = paper_pair()
    method.end_task(model, "t1", 1)
    method.begin_task(model, "t2", 2)  # a new snapshot of B0
    g = torch.Generator().manual_seed(2)
    for b in lilora(model).values():
        out, s, r = b.out_features, b.inner_rank, b.rank
        for task in ("t0", "t1", "t2"):
            set_factors(b, task, torch.randn((out, s), generator=g), torch.randn((s, r), generator=g))
        with torch.no_grad():
            b.B0.add_(torch.randn(b.B0.shape, generator=g))
    to_t1, to_t0 = paper_loss(model, "t2", "t1"), paper_loss(model, "t2", "t0")
    assert not torch.allclose(to_t1, to_t0)  # the check below can tell the two apart
    torch.testing.assert_close(method.loss_terms(model, None)["stability"], 2.0 * to_t1)


def test_paper_loss_is_zero_for_the_same_product_and_the_full_l2_term_for_orthogonal_ones() -> None:
    model, _ = paper_pair()
    for b in lilora(model).values():
        out, s, r = b.out_features, b.inner_rank, b.rank
        p = torch.randn(out, s)
        q = torch.randn(s, r)
        set_factors(b, "t0", p, q)
        set_factors(b, "t1", 3.0 * p, q)  # same direction: sim = 1
        with torch.no_grad():
            b.B0.add_(1.0)
    assert paper_loss(model, "t1", "t0").item() == pytest.approx(0.0, abs=1e-5)
    norms = []
    for b in lilora(model).values():
        out, s, r = b.out_features, b.inner_rank, b.rank
        p0, q0 = torch.zeros(out, s), torch.zeros(s, r)
        p0[0, 0], q0[0, 0] = 1.0, 1.0  # product: entry (0, 0)
        p1, q1 = torch.zeros(out, s), torch.zeros(s, r)
        p1[1, 0], q1[0, 1] = 1.0, 1.0  # product: entry (1, 1): orthogonal
        set_factors(b, "t0", p0, q0)
        set_factors(b, "t1", p1, q1)
        norms.append((b.B0 - b.B0_prev).square().sum())
    torch.testing.assert_close(paper_loss(model, "t1", "t0"), sum(norms) / len(norms))


@pytest.mark.parametrize("detach", [True, False])
def test_paper_gradients_reach_b0_only_through_the_l2_term_when_sim_is_detached(detach) -> None:
    model, method = paper_pair()
    for b in lilora(model).values():
        out, s, r = b.out_features, b.inner_rank, b.rank
        set_factors(b, "t0", torch.randn(out, s), torch.randn(s, r))  # (trained: P_0 Q_0 != 0)
        set_factors(b, "t1", torch.randn(out, s), torch.randn(s, r))
        with torch.no_grad():
            b.B0.add_(0.5)
    model.zero_grad(set_to_none=True)
    paper_loss(model, "t1", "t0", detach_sim=detach).backward()
    for b in lilora(model).values():
        sim = F.cosine_similarity((b.P["t1"] @ b.Q["t1"]).flatten(), (b.P["t0"] @ b.Q["t0"]).flatten(), dim=0)
        n = len(lilora(model))
        torch.testing.assert_close(b.B0.grad, 2 * (1 - sim.detach()) * (b.B0 - b.B0_prev).detach() / n)
        assert b.A.grad is None and b.P["t0"].grad is None  # the previous task's product is a constant
        if detach:
            assert b.P["t1"].grad is None and b.Q["t1"].grad is None
        else:
            assert b.P["t1"].grad.abs().sum() > 0


def test_paper_schedule_trains_b0_and_is_zero_on_the_first_task() -> None:
    model, _, method = make(stability="paper", lambda_stab=1.0)
    method.begin_task(model, "t0", 0)
    assert method.loss_terms(model, None) == {}
    train(model, method, "t0", 0)
    method.begin_task(model, "t1", 1)
    assert all(b.B0.requires_grad for b in lilora(model).values())  # release: frozen from here on
    assert method.loss_terms(model, None)["stability"].item() == pytest.approx(0.0, abs=1e-10)  # B0 = snapshot
    release, _, other = make()
    train(release, other, "t0", 0)
    other.begin_task(release, "t1", 1)
    assert not any(b.B0.requires_grad for b in lilora(release).values()) and other.loss_terms(release, None) == {}


def test_paper_loss_resumes_from_a_saved_adapter(tmp_path) -> None:
    model, base, method = make(stability="paper", lambda_stab=1.0)
    train(model, method, "t0", 0)
    train(model, method, "t1", 1, steps=3)
    before = method.loss_terms(model, None)["stability"]
    assert before.item() > 0
    method.save(model, str(tmp_path / "m"))
    fresh = copy.deepcopy(base)
    loaded = LiLoRA(tiny_config(stability="paper", lambda_stab=1.0))
    loaded.load(fresh, str(tmp_path / "m"))
    loaded.begin_task(fresh, "t1", 1)  # resuming task t1 keeps its snapshot of B0
    torch.testing.assert_close(loaded.loss_terms(fresh, None)["stability"], before)
