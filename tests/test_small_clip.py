"""pretrain: the project's small CLIP, config validation, hashing, caching and train-only data."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import CLIPModel

from continual_lora.benchmarks.mtil_mini import build_mtil_mini
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


def test_named_mixes_and_null_resolve_to_parts() -> None:
    assert pt.PretrainConfig().parts == pt.MIXES["v1"] == pt.DEFAULT_MIX
    assert pt.PretrainConfig(mix="v2").parts == pt.MIXES["v2"]
    assert pt.config_hash(pt.PretrainConfig()) == pt.config_hash(pt.PretrainConfig(mix="v1"))
    assert pt.config_hash(pt.PretrainConfig(mix="v1")) == pt.config_hash(pt.PretrainConfig(mix=pt.MIXES["v1"]))
    assert pt.config_hash(pt.PretrainConfig(mix="v2")) != pt.config_hash(pt.PretrainConfig(mix="v1"))
    if "fashion" in mm.DOMAINS:  # the v2 model behind docs/results.md
        assert pt.config_hash(pt.PretrainConfig(mix="v2")) == "655292041fe2"
    # the v1 cache key of the model behind the v1 tables, from before the skip_validation field and the v2 domains
    assert pt.config_hash(pt.PretrainConfig(mix="v1")) == "e5947cc0f741"
    assert pt.config_hash(pt.PretrainConfig(mix=(replace(pt.MIXES["v1"][0], skip_validation=True),))) != \
        pt.config_hash(pt.PretrainConfig(mix=pt.MIXES["v1"][:1]))
    assert pt.PretrainConfig().with_mix("v2").mix == "v2"
    assert pt.PretrainConfig(mix="v1").with_mix("v2").mix == "v1"  # a mix the config sets is kept
    with pytest.raises(ValueError, match="unknown mix 'v9'"):
        pt.PretrainConfig(mix="v9")
    with pytest.raises(ValueError, match="at least one MixPart"):
        pt.PretrainConfig(mix=())


def test_results_written_before_v2_read_back_as_the_v1_model() -> None:
    """results.json of older runs record the v1 mix as parts without ``skip_validation``: export rebuilds
    the same base model from them (the same cache key)."""
    from continual_lora.app.runner import RunConfig
    from continual_lora.config import from_dict

    old_parts = [{"domain": p.domain, "classes": list(p.classes), "max_images": p.max_images} for p in pt.MIXES["v1"]]
    config = from_dict(RunConfig, {"benchmark": {"name": "mtil-mini", "version": 1}, "pretrain": {"mix": old_parts}})
    assert pt.config_hash(config.pretrain) == pt.config_hash(pt.PretrainConfig(mix="v1")) == "e5947cc0f741"


def test_a_named_mix_leaves_out_domains_this_machine_lacks(monkeypatch) -> None:
    monkeypatch.setattr(pt, "DOMAINS", tuple(d for d in mm.DOMAINS if d != "fashion"))
    with pytest.warns(UserWarning, match=r"'v2' without \['fashion'\]"):
        parts = pt.PretrainConfig(mix="v2").parts
    assert [p.domain for p in parts] == ["mnist", "animals", "colors", "shapes_crop"]
    with pytest.warns(UserWarning):
        assert pt.config_hash(pt.PretrainConfig(mix="v2")) != "655292041fe2"  # another model, another key
    explicit = pt.PretrainConfig(mix=pt.MIXES["v2"])
    assert explicit.parts == pt.MIXES["v2"]  # parts given explicitly are kept (and fail when built)


def test_run_config_takes_the_benchmarks_mix_unless_it_sets_one() -> None:
    from continual_lora.app.runner import RunConfig
    from continual_lora.config import from_dict

    def mix(data: dict) -> object:
        return from_dict(RunConfig, data).pretrain.mix

    assert mix({}) == "v2"  # the default benchmark: mtil-mini v2
    assert mix({"benchmark": {"name": "mtil-mini", "version": 1}}) == "v1"
    assert mix({"benchmark": {"name": "cvit-mini"}}) == "v1"
    assert mix({"benchmark": {"name": "mtil-mini"}, "pretrain": {"mix": "v1"}}) == "v1"
    parts = mix({"pretrain": {"mix": [{"domain": "digits", "classes": ["one"], "max_images": 5}]}})
    assert parts == (pt.MixPart("digits", ("one",), 5),)
    # builders called from Python with bare RunSettings resolve it the same way
    from continual_lora.benchmarks import RunSettings
    from continual_lora.benchmarks.base import small_clip_config
    from continual_lora.benchmarks.cvit_mini import CvitMiniConfig
    from continual_lora.benchmarks.mtil_mini import MtilMiniConfig

    assert small_clip_config(MtilMiniConfig(), RunSettings()).mix == "v2"
    assert small_clip_config(MtilMiniConfig(version=1), RunSettings()).mix == "v1"
    assert small_clip_config(CvitMiniConfig(), RunSettings()).mix == "v1"


def test_v2_mix_leaves_out_every_validation_image() -> None:
    """Validation scores images the base model never trained on; the v1 mix (skip_validation False) did not."""
    part = pt.MixPart("digits", ("zero", "one"), 10_000, skip_validation=True)
    full = mm.load_domain("digits", 32)
    held = set(mm.validation_indices("digits", full.train_labels, max_test=None).tolist())
    assert len(held) == len(full.train_labels) // 5
    rows = lambda x: {bytes((v * 255).round().to(torch.uint8).flatten().tolist()) for v in x}  # noqa: E731
    held_rows = rows(full.train_images[sorted(held)])
    with_skip = pt._build_mix(replace(TINY, image_size=32, mix=(part,)))
    without = pt._build_mix(replace(TINY, image_size=32, mix=(replace(part, skip_validation=False),)))
    two_classes = int(torch.isin(full.train_labels, torch.tensor([0, 1])).sum())
    assert len(without.labels) == two_classes and not rows(with_skip.images) & held_rows
    assert len(with_skip.labels) == two_classes - int(torch.isin(full.train_labels[sorted(held)], torch.tensor([0, 1])).sum())
    assert all(not p.skip_validation for p in pt.MIXES["v1"]) and all(p.skip_validation for p in pt.MIXES["v2"])
    # any benchmark validation set is inside the held-out fifth
    (task,) = build_mtil_mini(shots=1, domains=["digits"], validation=True, max_test_per_task=60)
    assert rows(task.test_images) <= held_rows


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
