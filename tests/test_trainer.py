"""The continual trainer on the synthetic task stream of conftest.py with a tiny CLIP (fast, CPU):
every registered method through a full run and a stopped-and-resumed one, then the trainer's schedule."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from conftest import METHOD_ARGS, TASKS, TRAIN, run_stream
from torch import nn

from continual_lora.adapters import branches
from continual_lora.continual import TrainConfig, warmup_cosine
from continual_lora.methods import METHODS, build_method
from continual_lora.methods.seq_lora import SeqLoRA

pytestmark = pytest.mark.usefixtures("one_thread")

# the up-projection factors, zero at initialisation: LoRA B (per task or shared, each MoE expert's),
# LiLoRA's shared B0 and per-task P, the B columns each task's Rank-1 pool record keeps
UP_PROJECTION = re.compile(r"(^|\.)(lora_B|experts_B|B0|P|B)(\.|$)")
NOT_EVERY_TASK = {"zero_shot", "joint_lora"}  # zero_shot trains nothing; joint_lora all on the first task


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter branch's state, keyed ``<layer>.<tensor>``."""
    return {f"{n}.{k}": v for n, b in branches(model).items() for k, v in b.state_dict().items()}


# --- every registered method through the trainer, with save / resume ----------------------------
def test_every_registered_method_has_a_row() -> None:
    assert set(METHOD_ARGS) == set(METHODS)


@pytest.mark.parametrize("name", sorted(METHOD_ARGS))
def test_trains_and_resumes_to_the_same_run(clip_stream, tmp_path, name) -> None:
    kind, base = clip_stream
    full, trainer = run_stream(base, build_method(name, **METHOD_ARGS[name]), kind, TASKS, TRAIN)
    assert len(full.zero_shot) == 3 and len(full.matrix) == 3 and all(len(r) == 3 for r in full.matrix)
    assert full.finished and len(full.trainable_params) == 3
    if name == "zero_shot":
        assert full.matrix == [full.zero_shot] * 3
    else:
        assert full.trainable_params[0] > 0 and full.train_losses[0] is not None
        ups = [v for k, v in adapter_tensors(trainer.model).items() if UP_PROJECTION.search(k)]
        assert ups and any(v.abs().sum() > 0 for v in ups)  # the up-projections (zero at init) trained
        if name in ("seq_lora", "lilora", "rank1_pool"):  # (others: a margin of one test image or none)
            # training moved the model far enough to change the first tasks' scores from zero-shot
            assert full.matrix[0][0] != full.zero_shot[0] or full.matrix[1][1] != full.zero_shot[1]
    if name not in NOT_EVERY_TASK:
        assert min(full.trainable_params) > 0 and all(loss is not None for loss in full.train_losses)

    with pytest.raises(KeyboardInterrupt):
        run_stream(base, build_method(name, **METHOD_ARGS[name]), kind, TASKS, TRAIN, tmp=tmp_path, stop_after=2)
    assert (tmp_path / "checkpoint" / "state.json").exists()
    resumed, again = run_stream(base, build_method(name, **METHOD_ARGS[name]), kind, TASKS, TRAIN, tmp=tmp_path,
                                resume=True)
    assert resumed.matrix == full.matrix  # bit-identical accuracy matrix
    assert resumed.zero_shot == full.zero_shot and resumed.train_losses == full.train_losses
    assert again.method.trained_tasks == [t.name for t in TASKS]
    final, loaded = adapter_tensors(trainer.model), adapter_tensors(again.model)
    assert final.keys() == loaded.keys() and all(torch.equal(final[k], loaded[k]) for k in final)


# --- the trainer's schedule ---------------------------------------------------------------------
def test_deterministic_for_a_seed_and_different_across_seeds(clip_stream) -> None:
    kind, base = clip_stream
    a, _ = run_stream(base, build_method("seq_lora", **METHOD_ARGS["seq_lora"]), kind, TASKS, TRAIN)
    b, _ = run_stream(base, build_method("seq_lora", **METHOD_ARGS["seq_lora"]), kind, TASKS, TRAIN)
    c, _ = run_stream(base, build_method("seq_lora", **METHOD_ARGS["seq_lora"]), kind, TASKS,
                      dataclasses.replace(TRAIN, seed=1))
    assert a.matrix == b.matrix and a.train_losses == b.train_losses
    assert a.train_losses != c.train_losses


def test_xtail_never_beats_task_aware_classification(clip_stream) -> None:
    """The union classifier contains each task's own classes, so its accuracy can only be lower."""
    kind, base = clip_stream
    state, trainer = run_stream(base, build_method("rank1_pool", **METHOD_ARGS["rank1_pool"]), kind, TASKS, TRAIN,
                                xtail=True)
    assert len(state.xtail_matrix) == 3 and len(state.xtail_zero_shot) == 3
    for row, xrow in zip([state.zero_shot, *state.matrix], [state.xtail_zero_shot, *state.xtail_matrix]):
        assert all(x <= t + 1e-9 for x, t in zip(xrow, row))
    assert trainer.kind.union == ["red", "green", "blue", "cat", "dog", "cow", "one", "two"]


class PullToZero(SeqLoRA):
    """SeqLoRA plus a loss term that pulls every LoRA B towards a constant: proves the trainer adds it."""

    def loss_terms(self, model, batch, context=None):
        bs = [p for n, p in model.named_parameters() if "lora_B" in n]
        return {"pull": 100.0 * sum(((b - 1.0) ** 2).mean() for b in bs)}


def test_trainer_adds_the_methods_loss_terms(clip_stream) -> None:
    kind, base = clip_stream
    state, trainer = run_stream(base, PullToZero(build_method("seq_lora", **METHOD_ARGS["seq_lora"]).config), kind,
                                TASKS, TRAIN)
    bs = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    mean_b = torch.stack([b.mean() for b in bs]).mean().item()
    plain, t2 = run_stream(base, build_method("seq_lora", **METHOD_ARGS["seq_lora"]), kind, TASKS, TRAIN)
    plain_b = torch.stack([p.mean() for n, p in t2.model.named_parameters() if "lora_B" in n]).mean().item()
    # AdamW moves each B entry by about lr per step towards 1: ~18 steps * lr 5e-3 (less warm-up/decay)
    assert mean_b > 0.03, (mean_b, plain_b)
    assert abs(plain_b) < mean_b / 3, (mean_b, plain_b)


def test_step_callback_reports_each_step_its_loss_terms_lr_and_global_step(clip_stream, tmp_path) -> None:
    """``on_step`` gets every optimiser step: the total = task loss + the method's terms, the scheduled
    learning rate, the gradient norm, and a global step that a resumed run continues."""
    kind, base = clip_stream
    name = "rank1_pool"  # a method with a loss term ("ago", zero on the first task)
    logs: list = []
    state, _ = run_stream(base, build_method(name, **METHOD_ARGS[name]), kind, TASKS, TRAIN, on_step=logs.append)
    steps = TRAIN.iterations
    assert state.task_steps == [steps] * 3
    assert [log.global_step for log in logs] == list(range(1, 3 * steps + 1))
    assert [(log.task_index, log.task, log.step) for log in logs] == [
        (j, t.name, k) for j, t in enumerate(TASKS) for k in range(1, steps + 1)]
    schedule = warmup_cosine(steps, int(TRAIN.warmup_ratio * steps), TRAIN.lr, TRAIN.min_lr)
    for log in logs:
        assert set(log.terms) == {"ago"} and log.loss == pytest.approx(log.task_loss + log.terms["ago"], abs=1e-6)
        assert log.lr == pytest.approx(TRAIN.lr * schedule(log.step - 1), rel=1e-9)
        assert log.grad_norm is not None and log.grad_norm > 0
    assert all(log.terms["ago"] == 0 for log in logs[:steps]) and any(log.terms["ago"] > 0 for log in logs[steps:])
    # the tail mean of results.json is over the same numbers (6 steps: the last 10 % is the last step)
    assert state.train_losses == [logs[steps * (j + 1) - 1].loss for j in range(3)]

    with pytest.raises(KeyboardInterrupt):
        run_stream(base, build_method(name, **METHOD_ARGS[name]), kind, TASKS, TRAIN, tmp=tmp_path, stop_after=1)
    resumed: list = []
    run_stream(base, build_method(name, **METHOD_ARGS[name]), kind, TASKS, TRAIN, tmp=tmp_path, resume=True,
               on_step=resumed.append)
    assert resumed == logs[steps:]  # same steps, same global step numbers, same losses


def test_task_id_methods_see_the_base_model_on_future_tasks(clip_stream) -> None:
    """LiLoRA's row j on a task not trained yet equals the zero-shot score of that task."""
    kind, base = clip_stream
    state, _ = run_stream(base, build_method("lilora", **METHOD_ARGS["lilora"]), kind, TASKS, TRAIN)
    assert state.matrix[0][1:] == state.zero_shot[1:]
    assert state.matrix[1][2] == state.zero_shot[2]


def test_epochs_override_iterations() -> None:
    cfg = TrainConfig(epochs=2, batch_size=8, grad_accum=2)
    assert cfg.steps_for(40) == 5  # ceil(2 * 40 / 16)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
