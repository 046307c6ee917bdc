"""pretrain: the project's small CLIP, config validation, hashing, caching and train-only data."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import CLIPModel

from continual_lora.data import domains as mm
from continual_lora.models import small_clip as pt

TINY = pt.PretrainConfig(
    image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, vision_mlp=64,
    text_width=32, text_layers=1, text_heads=2, text_mlp=64, projection_dim=16, context_length=16,
    steps=3, batch_size=8, warmup=1, mix=(pt.MixPart("digits", ("zero", "one", "two"), 60),),
    eval_domains=("digits",),
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTINUAL_LORA_CACHE", str(tmp_path))
    return tmp_path


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="image_size"):
        replace(TINY, patch_size=5)
    with pytest.raises(ValueError, match="vision_width"):
        replace(TINY, vision_heads=3)
    with pytest.raises(ValueError, match="steps"):
        replace(TINY, steps=0)
    with pytest.raises(ValueError, match="eval_domains"):
        replace(TINY, eval_domains=("cifar",))
    with pytest.raises(ValueError, match="MixPart.classes"):
        pt.MixPart("animals", ("unicorn",))
    with pytest.raises(ValueError, match="MixPart.domain"):
        pt.MixPart("imagenet")


def test_config_hash_changes_with_config() -> None:
    assert pt.config_hash(TINY) == pt.config_hash(replace(TINY))
    assert pt.config_hash(TINY) != pt.config_hash(replace(TINY, steps=4))
    assert pt.config_hash(TINY) != pt.config_hash(replace(TINY, mix=(pt.MixPart("digits", (), 60),)))
    assert pt.config_hash(pt.PretrainConfig()) != pt.config_hash(TINY)


def test_build_clip_pools_at_the_tokenizer_eos() -> None:
    tok = pt.build_tokenizer(TINY)
    model = pt.build_clip(TINY, tok)
    assert model.config.text_config.eos_token_id == tok.eos_id != 2
    assert model.config.text_config.vocab_size == tok.vocab_size
    assert model.config.vision_config.image_size == 16 and model.config.projection_dim == 16
    for name in mm.KNOWN_DOMAINS:  # every prompt word is in the vocabulary
        classes, templates = mm.domain_prompts(name)
        ids, _ = tok([t.format(c) for c in classes for t in templates])
        assert not bool((ids == tok.unk_id).any())


def test_mix_draws_only_train_images_of_the_chosen_classes() -> None:
    # 32 px: shares the user cache with the mtil-mini benchmark (no fresh MNIST decode)
    mix_parts = (pt.MixPart("digits", ("zero", "one", "two"), 60), pt.MixPart("mnist", ("two",), 10))
    mix = pt._build_mix(replace(TINY, image_size=32, mix=mix_parts))
    assert mix.class_names == ["zero", "one", "two"]  # mnist "two" shares digits' label
    assert mix.images.shape == (70, 3, 32, 32)
    assert torch.bincount(mix.labels).tolist() == [20, 20, 30]
    digits = mm.load_domain("digits", 32)
    test_rows = {bytes((x * 255).round().to(torch.uint8).flatten().tolist()) for x in digits.test_images}
    mix_rows = {bytes((x * 255).round().to(torch.uint8).flatten().tolist()) for x in mix.images[:60]}
    assert not (mix_rows & test_rows)


def test_pretrain_writes_cache_and_second_load_skips_training(cache, monkeypatch) -> None:
    calls: list[pt.PretrainConfig] = []
    real_pretrain = pt.pretrain

    def counting(cfg: pt.PretrainConfig, progress: bool = True):
        calls.append(cfg)
        return real_pretrain(cfg, progress)

    monkeypatch.setattr(pt, "pretrain", counting)
    model, tok = pt.load_pretrained(TINY, progress=False)
    assert len(calls) == 1 and isinstance(model, CLIPModel) and not model.training
    path = cache / "pretrained" / pt.config_hash(TINY)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "pretrain_config.json", "zero_shot.json"):
        assert (path / name).is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    row = json.loads((path / "zero_shot.json").read_text())["accuracy"]
    assert set(row) == {"digits"} and 0.0 <= row["digits"] <= 100.0
    assert json.loads((path / "pretrain_config.json").read_text())["steps"] == 3

    again, tok2 = pt.load_pretrained(TINY, progress=False)
    assert len(calls) == 1  # loaded from the cache, no training
    assert tok2.vocab == tok.vocab
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    trained = pt.build_clip(TINY, tok)  # fresh init differs from the trained weights
    assert not torch.equal(trained.visual_projection.weight, again.visual_projection.weight)

    pt.load_pretrained(replace(TINY, steps=2), progress=False)
    assert len(calls) == 2 and len(list((cache / "pretrained").iterdir())) == 2


def test_pretraining_is_deterministic(cache) -> None:
    tok = pt.build_tokenizer(TINY)
    a = pt._train(TINY, tok, progress=False)
    b = pt._train(TINY, tok, progress=False)
    assert torch.equal(a.text_projection.weight, b.text_projection.weight)


def test_word_tokenizer_as_a_transformers_tokenizer_gives_the_same_ids(tmp_path) -> None:
    """What export writes beside the small CLIP: transformers' AutoTokenizer, loaded with no continual-lora
    code, encodes every benchmark prompt (and unknown words, punctuation, case, overflow) as we do."""
    from transformers import AutoTokenizer

    tokenizer = pt.build_tokenizer(pt.PretrainConfig())
    tokenizer.to_transformers().save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [t.format(c) for name in mm.KNOWN_DOMAINS for c, t in zip(*_prompts(name))]
    texts += ["A PHOTO of a Cat!", "snake_case and   spaces", "zzz unknown-words, 42x", "word " * 40, ""]
    enc = loaded(texts, padding="max_length", truncation=True, max_length=tokenizer.context_length,
                 return_tensors="pt")
    ids, mask = tokenizer(texts)
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)
    assert (ids == tokenizer.unk_id).any() and mask[-2].all()  # unknown words; the overflow is truncated


def _prompts(name: str) -> tuple[list[str], list[str]]:
    """Every (class, template) pair of a domain, as two aligned lists."""
    classes, templates = mm.domain_prompts(name)
    pairs = [(c, t) for c in classes for t in templates]
    return [c for c, _ in pairs], [t for _, t in pairs]
