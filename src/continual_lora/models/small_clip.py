"""The project's own small CLIP: random init, contrastively pretrained on mtil-mini train splits.

No CLIP weights ship with the dependencies, so the continual benchmarks start from this model.
Two named mixes (``PretrainConfig.mix``; the benchmark picks one when the config leaves it null):

``v2`` (mtil-mini v2, the default benchmark): half of the classes of five stream tasks, so those
start partly solved and fine-tuning has something to add:
  mnist      zero..four of ten digits        fashion  5 of 10 garments
  animals    5 of 10 animals                 colors   3 of 8 colours
  shapes_crop  circle and rectangle of three (triangle never seen)
  digits     never seen; five of its class names seen with mnist images -> at chance (no transfer)
Each part leaves out the rows of its domain that mtil-mini's validation split scores (``skip_validation``).

``v1`` (mtil-mini v1, cvit-mini): mnist and shapes whole, animals 5/10, colours 3/8 (mnist and
shapes high at zero-shot, textile and digits near chance); it draws from whole train splits.

Only *train* splits are drawn from; test images are never seen. The result is cached under
``cache_dir()/pretrained/<hash>/`` (model.safetensors, config.json, tokenizer.json,
pretrain_config.json, zero_shot.json), keyed by the PretrainConfig (its mix resolved to parts) and
the prompt vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from ..continual.step import Objective, adamw, optimizer_step
from ..data.domains import (DOMAINS, KNOWN_DOMAINS, balanced_subset, domain_prompts, domain_task, load_domain,
                            validation_indices)
from ..kinds.clip_ops import contrastive_loss, evaluate_accuracy
from ..runtime import Engine
from ..storage import atomic_cache_dir, cache_dir, cached
from .word_tokenizer import WordTokenizer

PRETRAIN_FORMAT = 1  # bump when the training recipe changes in a way the config does not show


@dataclass(frozen=True)
class MixPart:
    """One slice of the pretraining mix, drawn from a domain's train split."""

    domain: str  # mtil-mini domain name
    classes: tuple[str, ...] = ()  # class names kept (natural-language names); () keeps all
    max_images: int = 2000  # class-balanced, seeded cap on images taken
    # leave out the images benchmark.validation scores (the v2 mix does; False is the v1 mix and the reading of
    # results.json files written before this field existed)
    skip_validation: bool = False

    def __post_init__(self) -> None:
        if self.domain not in KNOWN_DOMAINS:
            raise ValueError(f"MixPart.domain: unknown domain {self.domain!r}; known: {KNOWN_DOMAINS}")
        names = domain_prompts(self.domain)[0]
        bad = [c for c in self.classes if c not in names]
        if bad:
            raise ValueError(f"MixPart.classes: {bad} not classes of {self.domain!r} ({names})")
        if self.max_images < 1:
            raise ValueError(f"MixPart.max_images must be >= 1, got {self.max_images}")


MIXES: dict[str, tuple[MixPart, ...]] = {
    "v1": (
        MixPart("mnist", (), 3000),  # all 10 digits
        MixPart("shapes", (), 3800),  # all 3 shapes (every resolved easy-VQA train image)
        MixPart("animals", ("bird", "cat", "elephant", "giraffe", "horse"), 2000),
        MixPart("colors", ("red", "green", "blue"), 1000),  # 3 of 8 colours
    ),
    "v2": (
        MixPart("mnist", ("zero", "one", "two", "three", "four"), 2500, skip_validation=True),
        MixPart("animals", ("bird", "cat", "elephant", "giraffe", "horse"), 2000, skip_validation=True),
        MixPart("colors", ("red", "green", "blue"), 1000, skip_validation=True),
        MixPart("fashion", ("t-shirt", "trouser", "dress", "sandal", "bag"), 2000, skip_validation=True),
        MixPart("shapes_crop", ("circle", "rectangle"), 1500, skip_validation=True),
    ),
}
"""Named pretraining mixes: ``v1`` (mtil-mini v1 and cvit-mini) and ``v2`` (mtil-mini v2)."""
DEFAULT_MIX = MIXES["v1"]  # what a PretrainConfig with ``mix: null`` trains when no benchmark resolves it


@dataclass(frozen=True)
class PretrainConfig:
    """Architecture, optimisation and data mix of the small CLIP."""

    image_size: int = 32  # input resolution (pixels, square)
    patch_size: int = 8  # ViT patch size; image_size must be a multiple
    vision_width: int = 128  # vision transformer hidden size
    vision_layers: int = 4  # vision transformer blocks
    vision_heads: int = 4  # vision attention heads
    vision_mlp: int = 512  # vision MLP hidden size
    text_width: int = 128  # text transformer hidden size
    text_layers: int = 2  # text transformer blocks (prompts are short and few)
    text_heads: int = 4  # text attention heads
    text_mlp: int = 512  # text MLP hidden size
    projection_dim: int = 128  # shared image-text embedding size
    context_length: int = 16  # text tokens per prompt, incl. <sot> and <eos>
    steps: int = 900  # optimisation steps (~80 s on 2 CPU cores)
    batch_size: int = 64  # image-caption pairs per step
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.1  # AdamW weight decay on matrices (not on biases / norms)
    warmup: int = 100  # linear warm-up steps, then cosine decay to 0
    seed: int = 0  # torch seed for init, data draw and batch order
    mix: tuple[MixPart, ...] | str | None = None  # parts, a MIXES name ("v1", "v2") or null: the benchmark's own
    eval_domains: tuple[str, ...] = ()  # domains of the measured zero-shot row; () = all available

    def __post_init__(self) -> None:
        positive = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "vision_mlp",
                    "text_width", "text_layers", "text_heads", "text_mlp", "projection_dim", "steps", "batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"PretrainConfig.image_size ({self.image_size}) must be a multiple of patch_size")
        for kind in ("vision", "text"):
            if getattr(self, f"{kind}_width") % getattr(self, f"{kind}_heads"):
                raise ValueError(f"PretrainConfig.{kind}_width must be divisible by {kind}_heads")
        if self.context_length < 3:
            raise ValueError(f"PretrainConfig.context_length must be >= 3, got {self.context_length}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup < 0:
            raise ValueError("PretrainConfig.lr must be > 0, weight_decay and warmup >= 0")
        if isinstance(self.mix, str) and self.mix not in MIXES:
            raise ValueError(f"PretrainConfig.mix: unknown mix {self.mix!r}; named mixes: {sorted(MIXES)}")
        if self.mix is not None and not self.mix:
            raise ValueError("PretrainConfig.mix must hold at least one MixPart")
        unknown = [d for d in self.eval_domains if d not in KNOWN_DOMAINS]
        if unknown:
            raise ValueError(f"PretrainConfig.eval_domains: unknown {unknown}; known: {KNOWN_DOMAINS}")


    @property
    def parts(self) -> tuple[MixPart, ...]:
        """The mix as parts: a named mix looked up (without the parts whose domain this machine lacks:
        Fashion-MNIST comes from an optional Debian package), null as ``DEFAULT_MIX``. Parts given
        explicitly are kept as they are (a missing domain then fails when the mix is built)."""
        if self.mix is not None and not isinstance(self.mix, str):
            return self.mix
        named = MIXES[self.mix or "v1"]
        kept = tuple(p for p in named if p.domain in DOMAINS)
        if len(kept) < len(named):
            warnings.warn(f"pretraining mix {self.mix or 'v1'!r} without {[p.domain for p in named if p not in kept]} "
                          "(not installed here): the small CLIP differs from the documented one", stacklevel=2)
        return kept

    def with_mix(self, name: str) -> "PretrainConfig":
        """This config with ``mix: null`` set to the named mix ``name`` (a set mix is kept)."""
        return self if self.mix is not None else replace(self, mix=name)


def build_tokenizer(cfg: PretrainConfig) -> WordTokenizer:
    """Word tokenizer over every known domain's class names and templates (seen or not)."""
    texts = []
    for name in KNOWN_DOMAINS:
        classes, templates = domain_prompts(name)
        texts += [t.format(c) for c in classes for t in templates]
    return WordTokenizer.from_texts(texts, cfg.context_length)


def hashable(config: Any) -> Any:
    """``asdict`` of a config whose MixParts (anywhere in it) drop ``skip_validation`` when it is False, so
    configs written before that field existed (the v1 mix) keep their cache keys."""
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            out = {k: strip(v) for k, v in value.items()}
            if set(out) == {f.name for f in fields(MixPart)} and not out["skip_validation"]:
                del out["skip_validation"]
            return out
        return [strip(v) for v in value] if isinstance(value, (list, tuple)) else value

    return strip(asdict(config))


def config_hash(cfg: PretrainConfig, tokenizer: WordTokenizer | None = None) -> str:
    """12 hex digits identifying the config (its mix resolved to parts), the vocabulary and the recipe version."""
    tok = tokenizer or build_tokenizer(cfg)
    payload = {"cfg": hashable(replace(cfg, mix=cfg.parts)), "vocab": tok.vocab, "format": PRETRAIN_FORMAT}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def pretrained_dir(cfg: PretrainConfig) -> Path:
    return cache_dir() / "pretrained" / config_hash(cfg)


def build_clip(cfg: PretrainConfig, tokenizer: WordTokenizer) -> CLIPModel:
    """A randomly initialised ``CLIPModel`` whose text config pools at the tokenizer's EOS."""
    text = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=cfg.text_width, intermediate_size=cfg.text_mlp,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.context_length, projection_dim=cfg.projection_dim, **tokenizer.special_ids(),
    )
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_width, intermediate_size=cfg.vision_mlp, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        projection_dim=cfg.projection_dim,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim))


@dataclass
class _Mix:
    images: torch.Tensor  # (N, 3, S, S) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64 index into class_names (union over parts)
    class_names: list[str]  # union of the kept class names
    templates: list[tuple[str, ...]]  # per union class: its domain's templates


def _build_mix(cfg: PretrainConfig) -> _Mix:
    """Images and union labels of the mix, from train splits only (seeded, class-balanced)."""
    g = torch.Generator().manual_seed(cfg.seed)
    images, labels, names, templates = [], [], [], []
    for part in cfg.parts:
        task = load_domain(part.domain, cfg.image_size)
        keep = [i for i, c in enumerate(task.class_names) if not part.classes or c in part.classes]
        idx = torch.nonzero(torch.isin(task.train_labels, torch.tensor(keep))).flatten()
        if part.skip_validation:  # every validation set of any size is a subset of the largest (a fifth)
            idx = idx[~torch.isin(idx, validation_indices(part.domain, task.train_labels, max_test=None))]
        idx = idx[balanced_subset(task.train_labels[idx], part.max_images, g)]
        remap = torch.full((task.num_classes,), -1, dtype=torch.long)
        for i in keep:
            if task.class_names[i] not in names:
                names.append(task.class_names[i])
                templates.append(task.templates)
            remap[i] = names.index(task.class_names[i])
        images.append(task.train_images[idx].contiguous())
        labels.append(remap[task.train_labels[idx]])
    return _Mix(torch.cat(images), torch.cat(labels), names, templates)


def zero_shot_row(model: CLIPModel, tokenizer: WordTokenizer, cfg: PretrainConfig) -> dict[str, float]:
    """Zero-shot accuracy (percent) on each mtil-mini test set (the benchmark's capped subsets)."""
    names = cfg.eval_domains or DOMAINS
    tasks = [domain_task(n, cfg.image_size, shots=1) for n in DOMAINS if n in names]
    return {t.name: round(evaluate_accuracy(model, tokenizer, t), 2) for t in tasks}


def _train(cfg: PretrainConfig, tokenizer: WordTokenizer, progress: bool) -> CLIPModel:
    """CLIP pretraining: the contrastive loss with the learnable logit scale, AdamW (no weight decay on
    biases and norms), warm-up then cosine to 0, gradient norm clipped at 1; one step of ``continual.step``."""
    torch.manual_seed(cfg.seed)
    model = build_clip(cfg, tokenizer)
    mix = _build_mix(cfg)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer, schedule = adamw([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], cfg.lr, cfg.weight_decay, cfg.steps,
                                cfg.warmup)
    engine = Engine(Objective(model, lambda m, batch: contrastive_loss(m, *batch, logit_scale=None)), optimizer)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(cfg.seed + 1)
    order, pos = torch.randperm(len(mix.labels), generator=g), 0

    def next_batch() -> tuple[torch.Tensor, ...]:
        nonlocal order, pos
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(mix.labels), generator=g), 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        labels = mix.labels[idx]  # (B,)
        pick = torch.randint(1 << 30, (len(idx),), generator=g)
        texts = [mix.templates[y][p % len(mix.templates[y])].format(mix.class_names[y])
                 for y, p in zip(labels.tolist(), pick.tolist())]
        ids, mask = tokenizer(texts)  # (B, L)
        return mix.images[idx], labels, ids, mask

    model.train()
    bar = tqdm(range(cfg.steps), desc="pretrain CLIP", disable=not progress, dynamic_ncols=True)
    for step in bar:
        out = optimizer_step(engine, next_batch, params, max_grad_norm=1.0)
        schedule.step()
        if step % 10 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{out.total.item():.3f}")
    engine.close()
    model.eval()
    return model


def pretrain(cfg: PretrainConfig = PretrainConfig(), progress: bool = True) -> Path:
    """Pretrain the small CLIP, measure its zero-shot row, save it atomically; -> its directory."""
    tokenizer = build_tokenizer(cfg)
    final = pretrained_dir(cfg)
    start = time.perf_counter()
    model = _train(cfg, tokenizer, progress)
    seconds = time.perf_counter() - start
    row = zero_shot_row(model, tokenizer, cfg)
    if progress:
        print(f"pretrained in {seconds:.1f} s; zero-shot: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))
    with atomic_cache_dir(final) as tmp:  # another process may finish first: its copy is kept
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save(tmp / "tokenizer.json")
        (tmp / "pretrain_config.json").write_text(json.dumps(asdict(replace(cfg, mix=cfg.parts)), indent=1))
        (tmp / "zero_shot.json").write_text(json.dumps({"accuracy": row, "train_seconds": seconds}, indent=1))
    return final


def load_pretrained(cfg: PretrainConfig = PretrainConfig(), progress: bool = True) -> tuple[CLIPModel, WordTokenizer]:
    """The cached pretrained CLIP and its tokenizer; pretrains first when not cached."""
    path = pretrained_dir(cfg)

    def load() -> tuple[CLIPModel, WordTokenizer]:
        return CLIPModel.from_pretrained(path, local_files_only=True).eval(), WordTokenizer.load(path / "tokenizer.json")

    return cached(path, load, lambda: pretrain(cfg, progress))
