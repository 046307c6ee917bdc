"""Shared tiny models for the tests: a tiny transformers CLIP, a tiny LLaVA and a plain module;
plus the adapter helpers the test_adapter*.py files share (random nonzero factors, outputs).

Every builder is seeded, so two calls give bit-identical weights ("a freshly built base
model"), and returns the model in eval mode. All run on CPU in milliseconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed hub lookup retries for ~46 s

import pytest
import torch
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

CLIP_VOCAB = 64
CLIP_EOS = CLIP_VOCAB - 1  # pooled text feature = hidden state at the first EOS token
LLAVA_VOCAB = 128
LLAVA_IMAGE_TOKEN = LLAVA_VOCAB - 1
LLAVA_IMAGE_TOKENS = (16 // 8) ** 2  # "default" feature strategy: (image / patch)^2 tokens


def make_tiny_clip(seed: int = 0, hidden: int = 32) -> CLIPModel:
    """transformers CLIP: both towers 2 x ``hidden``, 4 heads, MLP 2 x hidden, 16 px, patch 8."""
    tower = dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=CLIP_VOCAB, max_position_embeddings=16,
                         bos_token_id=1, eos_token_id=CLIP_EOS, pad_token_id=0),
        vision_config=dict(tower, image_size=16, patch_size=8),
        projection_dim=16,
    )
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
