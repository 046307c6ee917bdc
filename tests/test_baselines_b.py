"""EWC, LwF-VR, WiSE-FT, ZSCL and replay: each one's defining mechanism on a tiny CLIP over the
synthetic stream of conftest.py (tests/test_trainer.py runs each through the trainer with save +
resume equivalence)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import LORA, TASKS
from torch import nn

from continual_lora.adapters import delta_weights
from continual_lora.contract import TaskContext
from continual_lora.kinds.clip import ClipClassification
from continual_lora.methods import EWC, ZSCL, LwFVR, Method, Replay, WiSEFT
from continual_lora.methods.ewc import EWCConfig, _ewc_branches
from continual_lora.methods.lwf_vr import LwFVRConfig
from continual_lora.methods.replay import ReplayConfig
from continual_lora.methods.shared import shared_factors
from continual_lora.methods.wise_ft import WiSEFTConfig
from continual_lora.methods.zscl import ZSCLConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def context(kind: ClipClassification, index: int, seed: int = 0) -> TaskContext:
    return TaskContext(TASKS[index], index, TASKS, kind, torch.Generator().manual_seed(seed))


def start(method: Method, stream: tuple[ClipClassification, nn.Module],
          index: int = 0) -> tuple[nn.Module, TaskContext]:
    """A fresh adapted copy of the base model of ``stream`` (the ``clip_stream`` fixture) with ``method``
    at the start of task 0 (then ``index``), and the task context of task ``index``."""
    kind, base = stream
    model = copy.deepcopy(base)
    method.attach(model)
    ctx = None
    for i in range(index + 1):
        if i:
            method.end_task(model, TASKS[i - 1].name, i - 1, ctx)
        ctx = context(kind, i)
        method.begin_task(model, TASKS[i].name, i, ctx)
    return model, ctx


@torch.no_grad()
def randomise_b(model, std: float = 0.2, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, b in shared_factors(model):
        b.copy_(std * torch.randn(b.shape, generator=g))


@torch.no_grad()
def features(model, kind: ClipClassification) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    return kind.image_features(model, {"images": TASKS[0].test_images[:6]}), kind.class_features(model, TASKS)


# --- EWC ------------------------------------------------------------------------------------
def test_ewc_penalty_zero_at_anchor_gradient_is_lambda_f_delta(clip_stream) -> None:
    method = EWC(EWCConfig(**LORA, ewc_lambda=7.0, fisher_batches=2, fisher_batch_size=6))
    model, ctx = start(method, clip_stream)
    assert method.loss_terms(model) == {}  # no penalty before the first task ends
    randomise_b(model)  # "trained" factors: A and B both get gradients
    method.end_task(model, "alpha", 0, ctx)
    branch = _ewc_branches(model)[0]
    assert branch.fisher_A.gt(0).any() and branch.fisher_B.gt(0).any()
    assert float(method.loss_terms(model)["ewc"].detach()) == 0.0  # exactly at the anchor

    a, _ = branch.factors("shared")
    delta = torch.zeros_like(a)
    delta[0, :3] = torch.tensor([0.1, -0.2, 0.3])
    with torch.no_grad():
        a.add_(delta)
    term = method.loss_terms(model)["ewc"]
    expected = 0.5 * 7.0 * float((branch.fisher_A * delta**2).sum())
    assert float(term.detach()) > 0 and float(term.detach()) == pytest.approx(expected, rel=1e-5)
    a.grad = None
    term.backward()
    torch.testing.assert_close(a.grad, 7.0 * branch.fisher_A * delta)

    fa, fb = branch.fisher_A.clone(), branch.fisher_B.clone()  # online EWC: F <- gamma F + F_t
    branch.consolidate(torch.ones_like(fa), torch.zeros_like(fb), gamma=0.5)
    torch.testing.assert_close(branch.fisher_A, 0.5 * fa + 1.0)
    torch.testing.assert_close(branch.star_A, a.detach())


# --- LwF-VR ---------------------------------------------------------------------------------
def test_lwf_vr_distillation_zero_for_the_teacher_positive_after_a_change(clip_stream) -> None:
    kind, _ = clip_stream
    method = LwFVR(LwFVRConfig(**LORA))
    model, ctx = start(method, clip_stream, index=1)
    # the replayed vocabulary is every class name seen so far: alpha's 3 + beta's 3
    assert method.teacher_text.shape[0] == 6 and [t.name for t in method.vocabulary] == ["alpha", "beta"]
    batch = context(kind, 1).sample(TASKS[1], 8)
    model.train()
    assert float(method.distillation(model, batch, ctx).detach()) == pytest.approx(0.0, abs=1e-6)
    randomise_b(model)
    changed = method.loss_terms(model, batch, ctx)["lwf_vr"]
    assert float(changed.detach()) > 1e-3
    changed.backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for _, b in shared_factors(model))
    assert all(not p.requires_grad for p in method.teacher.parameters())

    method.end_task(model, "beta", 1, ctx)
    method.begin_task(model, "gamma", 2, context(kind, 2))
    assert method.teacher_text.shape[0] == 8  # gamma adds "one", "two"; "red" is already there


# --- WiSE-FT --------------------------------------------------------------------------------
@pytest.mark.parametrize("anchor", ["zeroshot", "previous"])
def test_wise_ft_alpha_0_is_the_anchor_and_alpha_1_the_fine_tuned_model(clip_stream, anchor) -> None:
    kind, base = clip_stream
    base_feats = features(copy.deepcopy(base), kind)
    ends = {}
    for alpha in (0.0, 1.0):
        method = WiSEFT(WiSEFTConfig(**LORA, wise_alpha=alpha, anchor=anchor))
        model, _ = start(method, clip_stream)
        randomise_b(model, seed=1)  # the model task 2 starts from: not the base model
        method.begin_task(model, "beta", 1)
        start_feats = features(model, kind)
        randomise_b(model, seed=2)  # "fine-tuned" on task 2
        tuned = features(model, kind)
        method.end_task(model, "beta", 1)
        ends[alpha] = (features(model, kind), start_feats, tuned)
    assert not torch.equal(ends[0.0][1][0], base_feats[0])
    for got, want in zip(ends[0.0][0], base_feats if anchor == "zeroshot" else ends[0.0][1]):
        assert torch.equal(got, want)  # alpha 0: the anchor, bit for bit
    for got, want in zip(ends[1.0][0], ends[1.0][2]):
        assert torch.equal(got, want)  # alpha 1: the fine-tuned model


def test_wise_ft_zeroshot_scales_the_update_by_alpha(clip_stream) -> None:
    method = WiSEFT(WiSEFTConfig(**LORA, wise_alpha=0.5))
    model, _ = start(method, clip_stream)
    randomise_b(model)
    before = delta_weights(model)
    method.end_task(model, "alpha", 0)
    for name, dw in delta_weights(model).items():
        torch.testing.assert_close(dw, 0.5 * before[name])


# --- ZSCL -----------------------------------------------------------------------------------
def test_zscl_feature_loss_zero_at_start_positive_after_training(clip_stream) -> None:
    kind, _ = clip_stream
    method = ZSCL(ZSCLConfig(**LORA, num_reference_images=24, reference_batch_size=8, num_random_texts=12))
    model, ctx0 = start(method, clip_stream)
    model.train()
    images = TASKS[0].train_images[:4]
    assert float(method.distillation(model, images, ctx0).detach()) == pytest.approx(0.0, abs=1e-6)

    ref = method.reference_images  # (24, 3, 16, 16) crops of sklearn's photos, none from the stream
    assert ref.shape == (24, 3, 16, 16) and 0.0 <= float(ref.min()) and float(ref.max()) <= 1.0
    stream = torch.cat([x for t in TASKS for x in (t.train_images, t.test_images)])
    gap = (ref[:, None] - stream[None]).abs().flatten(2).amax(-1)  # (24, N) max pixel difference
    assert float(gap.min()) > 0.05
    stream_words = {w for t in TASKS for c in t.class_names for w in kind.tokenizer.split(c)}
    assert method.texts and not stream_words & {w for s in method.texts for w in kind.tokenizer.split(s)}

    params = [p for pair in shared_factors(model) for p in pair]
    opt = torch.optim.AdamW(params, lr=2e-2)
    ctx = context(kind, 0, seed=5)
    for _ in range(3):  # fine-tune on the task loss only
        kind.loss(model, ctx.sample(TASKS[0], 8)).backward()
        opt.step()
        opt.zero_grad()
    assert float(method.loss_terms(model, {"images": images}, ctx0)["zscl"].detach()) > 1e-4


def test_zscl_weight_ensemble_is_the_running_mean_from_the_task_start(clip_stream) -> None:
    method = ZSCL(ZSCLConfig(**LORA, weight_ensemble_every=1))
    model, _ = start(method, clip_stream)
    b = shared_factors(model)[0][1]
    values = [b.detach().clone()]  # task start: B = 0
    for step in (1, 2):
        with torch.no_grad():
            b.fill_(float(step))
        values.append(b.detach().clone())
        method.after_step(model)
    method.end_task(model, "alpha", 0)
    torch.testing.assert_close(b.detach(), torch.stack(values).mean(0))


# --- replay ---------------------------------------------------------------------------------
def test_replay_buffers_earlier_tasks_only_with_the_quota(clip_stream) -> None:
    kind, _ = clip_stream
    method = Replay(ReplayConfig(**LORA, samples_per_task=5, replay_batch_size=4))
    model, ctx = start(method, clip_stream)
    assert method.loss_terms(model, None, ctx) == {}  # task 1: nothing to replay
    method.end_task(model, "alpha", 0, ctx)
    ctx = context(kind, 1)
    method.begin_task(model, "beta", 1, ctx)
    assert list(method.buffer) == ["alpha"]
    kept = method.buffer["alpha"]
    assert len(kept) == len(set(kept)) == 5 and all(0 <= i < len(TASKS[0].train_labels) for i in kept)
    replayed = method.replay_batch(ctx)["images"]
    assert len(replayed) == 4
    pool = TASKS[0].train_images[kept]
    assert all(any(torch.equal(x, y) for y in pool) for x in replayed)  # only alpha's kept samples
    term = method.loss_terms(model, None, ctx)
    assert set(term) == {"replay"} and float(term["replay"].detach()) > 0
    method.end_task(model, "beta", 1, ctx)
    assert list(method.buffer) == ["alpha", "beta"] and len(method.buffer["beta"]) == 5
