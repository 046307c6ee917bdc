"""Shared tiny models for the tests: a tiny transformers CLIP, a tiny LLaVA and a plain module;
the adapter helpers the test_adapter*.py files share (random nonzero factors, outputs); and the
continual-trainer fixtures: a synthetic three-task CLIP stream, one run / stop / resume helper and
the table of tiny settings for every registered method.

Every builder is seeded, so two calls give bit-identical weights ("a freshly built base
model"), and returns the model in eval mode. All run on CPU in milliseconds.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed hub lookup retries for ~46 s

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from continual_lora.adapters import LoRAConfig, add_task, branches, inject_adapters
from continual_lora.benchmarks import Benchmark, BenchmarkConfig, RunSettings, Stream
from continual_lora.continual import ContinualTrainer, RunState, StepLog, TrainConfig
from continual_lora.contract import TaskKind
from continual_lora.kinds.clip import ClipClassification, ImageTask
from continual_lora.methods import Method
from continual_lora.models.word_tokenizer import WordTokenizer

CLIP_VOCAB = 64
CLIP_EOS = CLIP_VOCAB - 1  # pooled text feature = hidden state at the first EOS token
CLIP_SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": CLIP_EOS, "pad_token_id": 0}
LLAVA_VOCAB = 128
LLAVA_IMAGE_TOKEN = LLAVA_VOCAB - 1
LLAVA_IMAGE_TOKENS = (16 // 8) ** 2  # "default" feature strategy: (image / patch)^2 tokens


def make_tiny_clip(seed: int = 0, hidden: int = 32, *, tokenizer: WordTokenizer | None = None,
                   special_ids: dict[str, int] | None = None, **tower: Any) -> CLIPModel:
    """transformers CLIP: both towers 2 x ``hidden``, 4 heads, MLP 2 x hidden, 16 px, patch 8; projection 16.

    The text tower takes its vocabulary size, context length and special-token ids from
    ``tokenizer`` (else CLIP_VOCAB tokens, 16 positions, CLIP_SPECIAL_IDS); ``special_ids``
    replaces those ids ({}: transformers' defaults). ``tower``: more settings for both towers'
    configs (e.g. ``num_attention_heads=2``, ``intermediate_size=37``).
    """
    tower = dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden) | tower
    if tokenizer is None:
        text = dict(vocab_size=CLIP_VOCAB, max_position_embeddings=16)
        ids = CLIP_SPECIAL_IDS if special_ids is None else special_ids
    else:
        text = dict(vocab_size=tokenizer.vocab_size, max_position_embeddings=tokenizer.context_length)
        ids = tokenizer.special_ids() if special_ids is None else special_ids
    config = CLIPConfig(text_config=dict(tower, **text, **ids), vision_config=dict(tower, image_size=16, patch_size=8),
                        projection_dim=16)
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def clip_inputs(batch: int = 3, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, CLIP_EOS, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = 1, CLIP_EOS  # BOS ... EOS
    return {"input_ids": ids, "pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}


def make_tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    """LLaVA: 2-layer CLIP vision tower (16 px, patch 8) + projector + 2-layer Llama (width 32)."""
    vision = CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, image_size=16, patch_size=8)
    text = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, vocab_size=LLAVA_VOCAB, max_position_embeddings=64,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=LLAVA_IMAGE_TOKEN,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def llava_inputs(batch: int = 2, text_tokens: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.full((batch, LLAVA_IMAGE_TOKENS), LLAVA_IMAGE_TOKEN)
    text = torch.randint(3, LLAVA_IMAGE_TOKEN, (batch, text_tokens), generator=g)
    return {"input_ids": torch.cat([image, text], dim=1), "pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}


class PlainNet(nn.Module):
    """A plain MLP: fc1 (10 -> 20) -> ReLU -> fc2 (20 -> 5) -> head (5 -> 3), all with bias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 20)
        self.fc2 = nn.Linear(20, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 10) -> (B, 3)
        return self.head(self.fc2(torch.relu(self.fc1(x))))


def make_plain(seed: int = 0) -> PlainNet:
    torch.manual_seed(seed)
    return PlainNet().eval()


class SeqFirstBlock(nn.Module):
    """OpenAI-CLIP-style residual block on (L, N, D): nn.MultiheadAttention + Linear MLP."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4)  # batch_first=False
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (L, N, D)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(x)))


class SeqFirstNet(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.blocks = nn.Sequential(SeqFirstBlock(d), SeqFirstBlock(d))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (L, N, D) -> (N, 3)
        return self.head(self.blocks(x)[0])


def make_seq_first(seed: int = 0) -> SeqFirstNet:
    torch.manual_seed(seed)
    return SeqFirstNet().eval()


@pytest.fixture
def tiny_clip() -> CLIPModel:
    return make_tiny_clip()


@pytest.fixture
def tiny_llava() -> LlavaForConditionalGeneration:
    return make_tiny_llava()


@pytest.fixture
def plain_model() -> PlainNet:
    return make_plain()


# --- adapter helpers (tests/test_adapter*.py) ----------------------------------------------
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Give every task of every branch random, nonzero A and B (B = 0 would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    for _, branch in sorted(branches(model).items()):
        for task in branch.tasks:
            for table in (branch.lora_A, branch.lora_B):
                table[task].copy_(torch.randn(table[task].shape, generator=g) * std)


def adapt(model: nn.Module, tasks=("t1",), seed: int = 0, rank: int = 4, alpha: float = 8.0,
          targets=CLIP_TARGETS, **kw) -> nn.Module:
    inject_adapters(model, LoRAConfig(rank=rank, alpha=alpha, targets=targets, **kw))
    for task in tasks:
        add_task(model, task)
    randomize(model, seed)
    return model


@torch.no_grad()
def clip_out(model: nn.Module, inputs=None) -> torch.Tensor:
    out = model(**(inputs or clip_inputs()))
    return torch.cat([out.logits_per_image.flatten(), out.text_embeds.flatten(), out.image_embeds.flatten()])


def module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


# --- the continual trainer on a synthetic CLIP stream (test_trainer.py, test_baselines_*.py) -------
def make_task(name: str, classes: tuple[str, ...], seed: int) -> ImageTask:
    """Each class is a fixed random 16x16 pattern plus noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(len(classes), 3, 16, 16, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % len(classes)
        x = (protos[y] + 0.15 * torch.randn(n, 3, 16, 16, generator=g)).clamp(0, 1)
        return x, y

    (xtr, ytr), (xte, yte) = draw(24), draw(30)
    return ImageTask(name, classes, ("a photo of a {}.", "an image of a {}."), xtr, ytr, xte, yte)


TASKS = [
    make_task("alpha", ("red", "green", "blue"), 1),
    make_task("beta", ("cat", "dog", "cow"), 2),
    make_task("gamma", ("one", "two", "red"), 3),  # "red" also in alpha: x-tail merges the name
]
TRAIN = TrainConfig(iterations=6, batch_size=8, lr=5e-3, progress=False)

# tiny settings for every registered method (tests/test_trainer.py checks that none is missing)
STREAM_TARGETS = ("q_proj", "v_proj", "fc1")
LORA = dict(rank=4, alpha=8.0, targets=STREAM_TARGETS)
METHOD_ARGS: dict[str, dict[str, Any]] = {
    "ewc": dict(LORA, ewc_lambda=50.0, fisher_batches=2, fisher_batch_size=6),
    "joint_lora": dict(rank=2, alpha=4.0, targets=STREAM_TARGETS),
    "lilora": dict(rank=4, alpha=8.0, inner_rank=2, dropout=0.0, targets=STREAM_TARGETS),
    "lwf_vr": dict(LORA),
    "moe_lora": dict(num_experts=3, expert_rank=2, alpha=4.0, top_k=2, lambda_balance=0.01, targets=STREAM_TARGETS),
    "o_lora": dict(rank=2, alpha=4.0, lambda_l2=0.01, targets=STREAM_TARGETS),
    "per_task_lora": dict(rank=2, alpha=4.0, targets=STREAM_TARGETS),
    "rank1_pool": dict(rank=6, top_r=4, alpha=16.0, dropout=0.0, targets=STREAM_TARGETS),
    "replay": dict(LORA, samples_per_task=4, replay_batch_size=4),
    "sd_lora": dict(rank=2, alpha=4.0, targets=STREAM_TARGETS),
    "seq_lora": dict(rank=4, targets=STREAM_TARGETS),
    "wise_ft": dict(LORA, wise_alpha=0.5),
    "zero_shot": {},
    "zscl": dict(LORA, num_reference_images=16, reference_batch_size=6, num_random_texts=8, weight_ensemble_every=1,
                 l2_lambda=1.0),
}


def stream_tokenizer() -> WordTokenizer:
    """A word tokenizer over every prompt of TASKS (context length 16)."""
    texts = [t.format(c) for task in TASKS for c in task.class_names for t in task.templates]
    return WordTokenizer.from_texts(texts, context_length=16)


@pytest.fixture(scope="module")
def clip_stream() -> tuple[ClipClassification, CLIPModel]:
    """(the CLIP kind of TASKS, a tiny CLIP over its tokenizer's vocabulary: the trainer runs' base model).
    The kind holds no state of a run, so runs can share it."""
    tokenizer = stream_tokenizer()
    return ClipClassification(tokenizer, TASKS), make_tiny_clip(tokenizer=tokenizer)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """These models are tiny: one intra-op thread avoids OpenMP spin-waits on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def continual_trainer(base: nn.Module, method: Method, kind: TaskKind, tasks: Sequence[Any], train: TrainConfig, *,
                      tmp: str | Path | None = None, stop_after: int | None = None,
                      on_end: Callable[[RunState], None] | None = None, xtail: bool = False,
                      on_step: Callable[[StepLog], None] | None = None) -> ContinualTrainer:
    """A trainer on a deep copy of ``base``, checkpointing to ``tmp``. After each task's checkpoint it
    calls ``on_end(state)``, then raises KeyboardInterrupt once ``stop_after`` tasks are done;
    ``on_step`` is the trainer's per-step callback."""

    def end(state: RunState) -> None:
        if on_end is not None:
            on_end(state)
        if stop_after is not None and state.completed == stop_after:
            raise KeyboardInterrupt  # a run killed right after a checkpoint

    return ContinualTrainer(copy.deepcopy(base), method, kind, tasks, train, checkpoint_dir=tmp, xtail=xtail,
                            on_task_end=end, on_step=on_step)


def run_stream(base: nn.Module, method: Method, kind: TaskKind, tasks: Sequence[Any], train: TrainConfig, *,
               tmp: str | Path | None = None, resume: bool = False, stop_after: int | None = None,
               on_end: Callable[[RunState], None] | None = None, xtail: bool = False,
               on_step: Callable[[StepLog], None] | None = None) -> tuple[RunState, ContinualTrainer]:
    """Run a :func:`continual_trainer` to its end (or its stop), from the checkpoint in ``tmp`` if
    ``resume``; returns (the final state, the trainer)."""
    trainer = continual_trainer(base, method, kind, tasks, train, tmp=tmp, stop_after=stop_after, on_end=on_end,
                                xtail=xtail, on_step=on_step)
    return trainer.run(resume=resume), trainer


# --- a benchmark registered the way benchmarks/<name>.py + one registry line would register it ------
@dataclasses.dataclass
class SyntheticConfig(BenchmarkConfig):
    """The synthetic stream of TASKS as a benchmark (CLI tests: seconds, no data, no pretraining)."""

    name: str = "synthetic"
    tasks: int = 3  # how many of TASKS to train on
    nan_task: int | None = None  # this task's training images are NaN: its loss diverges


def build_synthetic(bench: SyntheticConfig, run: RunSettings) -> Stream:
    tokenizer = stream_tokenizer()
    tasks = TASKS[: bench.tasks]
    if bench.nan_task is not None:
        bad = tasks[bench.nan_task]
        tasks[bench.nan_task] = dataclasses.replace(bad, train_images=torch.full_like(bad.train_images, float("nan")))
    return Stream(make_tiny_clip(tokenizer=tokenizer), ClipClassification(tokenizer, tasks, device=run.device), tasks)


SYNTHETIC_RUN = """name: synth
benchmark: {name: synthetic, tasks: 2}
train: {iterations: 2, batch_size: 8, progress: false}
methods: [{name: seq_lora, rank: 2, targets: [q_proj, v_proj]}]
"""


@pytest.fixture
def synthetic(monkeypatch, tmp_path) -> Path:
    """Registers the ``synthetic`` benchmark for the test and writes a run config using it (returned)."""
    from continual_lora.benchmarks import BENCHMARKS

    monkeypatch.setitem(BENCHMARKS, "synthetic", Benchmark(SyntheticConfig, build_synthetic))  # the registry line
    path = tmp_path / "synthetic.yaml"
    path.write_text(SYNTHETIC_RUN)
    return path


# --- one real two-task run through the public CLI, with every tracker (test_tracking.py, test_export.py) ------
TINY_RUN = """
name: exp
benchmark: {domains: [digits, animals], shots: 2, max_test_per_task: 20}
model: {source: random, clip_config: tiny}
train: {iterations: 4, batch_size: 8, progress: false}
logging: {trackers: [tensorboard, wandb, mlflow], every: 3}
methods:
  - {name: lilora, rank: 2, inner_rank: 1, alpha: 4.0, dropout: 0.0}
  - {name: rank1_pool, rank: 4, top_r: 2, alpha: 8.0, dropout: 0.0}
"""


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """``continual-lora run`` of TINY_RUN (a random-init tiny CLIP on two mtil-mini domains, 4 steps per
    task, logging every 3rd step to TensorBoard, W&B offline and MLflow's file store); -> runs/exp."""
    from continual_lora.cli import main

    root = tmp_path_factory.mktemp("tiny_run")
    (root / "tiny.yaml").write_text(TINY_RUN)
    cache = os.environ.get("CONTINUAL_LORA_TEST_CACHE", str(root / "cache"))
    saved = {k: os.environ.get(k) for k in ("CONTINUAL_LORA_CACHE", "WANDB_MODE")}
    os.environ.update(CONTINUAL_LORA_CACHE=cache, WANDB_MODE="offline")  # offline twice over: never the network
    try:
        assert main(["run", str(root / "tiny.yaml"), f"output_dir={root / 'runs'}"]) == 0
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return root / "runs" / "exp"
