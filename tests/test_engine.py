"""The continual trainer on a synthetic task stream with a tiny CLIP (fast, CPU)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from continual_lora.continual.clip_kind import ClipClassification
from continual_lora.continual.clip_task import WordTokenizer
from continual_lora.continual.engine import ContinualTrainer, TrainConfig
from continual_lora.methods import Method, build_method
from continual_lora.methods.seq_lora import SeqLoRA


@dataclass
class Task:
    name: str
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def make_task(name: str, classes: tuple[str, ...], seed: int) -> Task:
    """Each class is a fixed random 16x16 pattern plus noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(len(classes), 3, 16, 16, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % len(classes)
        x = (protos[y] + 0.15 * torch.randn(n, 3, 16, 16, generator=g)).clamp(0, 1)
        return x, y

    (xtr, ytr), (xte, yte) = draw(24), draw(30)
    return Task(name, classes, ("a photo of a {}.", "an image of a {}."), xtr, ytr, xte, yte)


TASKS = [
    make_task("alpha", ("red", "green", "blue"), 1),
    make_task("beta", ("cat", "dog", "cow"), 2),
    make_task("gamma", ("one", "two", "red"), 3),  # "red" also in alpha: x-tail merges the name
]


def tiny_clip(tokenizer: WordTokenizer) -> CLIPModel:
    ids = tokenizer.special_ids()
    text = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16, **ids)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=16, patch_size=8)
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).eval()


@pytest.fixture(scope="module")
def setup():
    texts = [t.format(c) for task in TASKS for c in task.class_names for t in task.templates]
    tokenizer = WordTokenizer.from_texts(texts, context_length=16)
    return tokenizer, tiny_clip(tokenizer)


TRAIN = TrainConfig(iterations=6, batch_size=8, lr=5e-3, progress=False)
METHOD_ARGS = {
    "seq_lora": dict(rank=4, targets=("q_proj", "v_proj", "fc1")),
    "lilora": dict(rank=4, alpha=8.0, inner_rank=2, dropout=0.0, targets=("q_proj", "v_proj", "fc1")),
    "rank1_pool": dict(rank=6, top_r=4, alpha=16.0, dropout=0.0, targets=("q_proj", "v_proj", "fc1")),
}


def run(setup, method: Method, tmp=None, resume=False, xtail=False, stop_after=None, seed=0):
    tokenizer, base = setup
    kind = ClipClassification(tokenizer, TASKS)

    def stop(state):
        if stop_after is not None and state.completed == stop_after:
            raise KeyboardInterrupt  # a run killed right after a checkpoint

    cfg = TrainConfig(**{**TRAIN.__dict__, "seed": seed})
    trainer = ContinualTrainer(copy.deepcopy(base), method, kind, TASKS, cfg, checkpoint_dir=tmp, xtail=xtail,
                               on_task_end=stop)
    return trainer.run(resume=resume), trainer


@pytest.mark.parametrize("name", sorted(METHOD_ARGS))
def test_schedule_matrix_and_resume_equivalence(setup, tmp_path, name) -> None:
    full, _ = run(setup, build_method(name, **METHOD_ARGS[name]))
    assert len(full.zero_shot) == 3 and len(full.matrix) == 3 and all(len(r) == 3 for r in full.matrix)
    assert full.finished and len(full.trainable_params) == 3 and min(full.trainable_params) > 0
    # training moved the model: the first task's score changed from zero-shot
    assert full.matrix[0][0] != full.zero_shot[0] or full.matrix[1][1] != full.zero_shot[1]

    with pytest.raises(KeyboardInterrupt):
        run(setup, build_method(name, **METHOD_ARGS[name]), tmp=tmp_path, stop_after=2)
    assert (tmp_path / "checkpoint" / "state.json").exists()
    resumed, _ = run(setup, build_method(name, **METHOD_ARGS[name]), tmp=tmp_path, resume=True)
    assert resumed.matrix == full.matrix  # bit-identical accuracy matrix
    assert resumed.zero_shot == full.zero_shot


def test_deterministic_for_a_seed_and_different_across_seeds(setup) -> None:
    a, _ = run(setup, build_method("seq_lora", **METHOD_ARGS["seq_lora"]))
    b, _ = run(setup, build_method("seq_lora", **METHOD_ARGS["seq_lora"]))
    c, _ = run(setup, build_method("seq_lora", **METHOD_ARGS["seq_lora"]), seed=1)
    assert a.matrix == b.matrix and a.train_losses == b.train_losses
    assert a.train_losses != c.train_losses


def test_xtail_never_beats_task_aware_classification(setup) -> None:
    """The union classifier contains each task's own classes, so its accuracy can only be lower."""
    state, trainer = run(setup, build_method("rank1_pool", **METHOD_ARGS["rank1_pool"]), xtail=True)
    assert len(state.xtail_matrix) == 3 and len(state.xtail_zero_shot) == 3
    for row, xrow in zip([state.zero_shot, *state.matrix], [state.xtail_zero_shot, *state.xtail_matrix]):
        assert all(x <= t + 1e-9 for x, t in zip(xrow, row))
    assert trainer.kind.union == ["red", "green", "blue", "cat", "dog", "cow", "one", "two"]


class PullToZero(SeqLoRA):
    """SeqLoRA plus a loss term that pulls every LoRA B towards a constant: proves the trainer adds it."""

    def loss_terms(self, model, batch):
        bs = [p for n, p in model.named_parameters() if "lora_B" in n]
        return {"pull": 100.0 * sum(((b - 1.0) ** 2).mean() for b in bs)}


def test_trainer_adds_the_methods_loss_terms(setup) -> None:
    state, trainer = run(setup, PullToZero(build_method("seq_lora", **METHOD_ARGS["seq_lora"]).config))
    bs = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    mean_b = torch.stack([b.mean() for b in bs]).mean().item()
    plain, t2 = run(setup, build_method("seq_lora", **METHOD_ARGS["seq_lora"]))
    plain_b = torch.stack([p.mean() for n, p in t2.model.named_parameters() if "lora_B" in n]).mean().item()
    # AdamW moves each B entry by about lr per step towards 1: ~18 steps * lr 5e-3 (less warm-up/decay)
    assert mean_b > 0.03, (mean_b, plain_b)
    assert abs(plain_b) < mean_b / 3, (mean_b, plain_b)


def test_task_id_methods_see_the_base_model_on_future_tasks(setup) -> None:
    """LiLoRA's row j on a task not trained yet equals the zero-shot score of that task."""
    state, _ = run(setup, build_method("lilora", **METHOD_ARGS["lilora"]))
    assert state.matrix[0][1:] == state.zero_shot[1:]
    assert state.matrix[1][2] == state.zero_shot[2]


def test_epochs_override_iterations() -> None:
    cfg = TrainConfig(epochs=2, batch_size=8, grad_accum=2)
    assert cfg.steps_for(40) == 5  # ceil(2 * 40 / 16)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
