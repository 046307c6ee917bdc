"""The ``model:`` section: a transformers CLIP from local files, a random-init preset, and the
error a missing model gives before anything is trained."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from continual_lora.models.clip import (
    HFTextTokenizer,
    MissingModelError,
    ModelConfig,
    check_model,
    clip_source_model,
    load_clip,
    random_clip_config,
)
from continual_lora.models.small_clip import PretrainConfig
from continual_lora.cli import main
from continual_lora.kinds.clip_ops import encode_images, normalize_images
from continual_lora.config import ConfigError

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: the 256 symbols a byte-level BPE vocabulary starts from."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny CLIP saved as transformers saves one: weights, config, CLIP tokenizer, processor config."""
    root = tmp_path_factory.mktemp("hf_clip")
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(root)
    tower = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config = CLIPConfig(text_config=dict(tower, vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=512,
                                         eos_token_id=513, pad_token_id=513),
                        vision_config=dict(tower, image_size=16, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(root)
    (root / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    return root


def test_hf_source_loads_local_files_and_folds_the_pixel_normalisation(hf_dir) -> None:
    config = ModelConfig(source="hf", path=str(hf_dir))
    check_model(config, image_size=16)
    with pytest.raises(ConfigError, match="benchmark.image_size=16"):
        check_model(config, image_size=32)
    model, tokenizer = load_clip(config, PretrainConfig())
    assert isinstance(tokenizer, HFTextTokenizer)
    ids, mask = tokenizer(["a photo of a cat.", "hi"])
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == mask.dtype == torch.int64
    assert ids[0, 0] == 512 and mask[1].sum() == 4  # <sot> h i <eot>
    # the folded model on the benchmark's (x - 0.5) / 0.5 == the original on (x - mean) / std
    original = CLIPModel.from_pretrained(hf_dir, local_files_only=True).eval()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = original.get_image_features(
        pixel_values=(images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    with torch.no_grad():
        torch.testing.assert_close(encode_images(model, images), expected.detach(), rtol=1e-4, atol=1e-5)
    x = torch.tensor([0.0, 0.5, 1.0])  # the benchmark's convention: (x - 0.5) / 0.5
    assert torch.equal(normalize_images(x), torch.tensor([-1.0, 0.0, 1.0]))


def test_hf_source_model_is_the_checkpoint_as_shipped(hf_dir, tmp_path) -> None:
    """What export merges into: the checkpoint's own weights (no folded normalisation), where it loads
    from, and its tokenizer / processor files."""
    source = clip_source_model(ModelConfig(source="hf", path=str(hf_dir)), PretrainConfig())
    original = CLIPModel.from_pretrained(hf_dir, local_files_only=True).state_dict()
    state = source.model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)
    assert source.source == str(hf_dir.resolve())
    source.write_preprocessing(tmp_path)
    copied = {p.name for p in tmp_path.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= copied
    assert not copied & {"model.safetensors", "config.json"}


def test_zscl_random_sentences_work_with_a_transformers_tokenizer(hf_dir) -> None:
    """ZSCL's default reference texts are random tokens outside the stream's class names; with a
    transformers CLIP tokenizer the pool is its alphabetic tokens, read as text ("x</w>" -> "x")."""
    from types import SimpleNamespace

    from continual_lora.kinds.clip import ClipClassification

    _, tokenizer = load_clip(ModelConfig(source="hf", path=str(hf_dir)), PretrainConfig())
    pool = tokenizer.word_pool(["cat", "dog"])
    assert all(w.isalpha() for w in pool) and len(pool) == len(set(pool))
    assert {"b", "z", "B", "Z"} <= set(pool)  # "b" and "b</w>" both read "b": one entry
    assert not set(pool) & (set("catdog") | {"<|startoftext|>", "<|endoftext|>", "!", "1"})
    task = SimpleNamespace(name="pets", class_names=["cat", "dog"], templates=["a photo of a {}."])
    kind = ClipClassification(tokenizer, [task])
    sentences = kind.random_sentences(5, 3, torch.Generator().manual_seed(0))
    assert len(sentences) == 5 and all(len(s.split()) == 3 for s in sentences)
    assert not {w for s in sentences for w in s.split()} & set("catdog")
    assert sentences == kind.random_sentences(5, 3, torch.Generator().manual_seed(0))  # seeded
    ids, _ = tokenizer(sentences)
    assert ids.shape == (5, 16)


def test_random_preset_is_clip_vit_b_16_sized() -> None:
    config, tokenizer = random_clip_config("vit-b-16")
    with torch.device("meta"):
        model = CLIPModel(config)
    assert sum(p.numel() for p in model.parameters()) == 149_620_737  # OpenAI CLIP ViT-B/16
    assert tokenizer.context_length == 77 and config.text_config.eos_token_id == tokenizer.eos_id
    model, tok = load_clip(ModelConfig(source="random", clip_config="tiny"), PretrainConfig(), seed=3)
    again, _ = load_clip(ModelConfig(source="random", clip_config="tiny"), PretrainConfig(), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ConfigError, match="image_size=32"):
        check_model(ModelConfig(source="random", clip_config="tiny"), image_size=224)


def test_missing_model_fails_before_training_and_says_what_to_download(tmp_path, capsys) -> None:
    where = tmp_path / "models" / "clip-vit-base-patch16"
    with pytest.raises(MissingModelError, match=f"huggingface-cli download openai/clip-vit-base-patch16 --local-dir {where}"):
        check_model(ModelConfig(source="hf", path=str(where)), image_size=224)
    with pytest.raises(MissingModelError, match="huggingface-cli download someone/not-cached-clip`"):
        check_model(ModelConfig(source="hf", path="someone/not-cached-clip"), image_size=224)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: t\nbenchmark: {image_size: 224}\nmethods:\n  - name: seq_lora\n")
    code = main(["run", str(cfg), "model.source=hf", f"model.path={where}", f"output_dir={tmp_path}/runs"])
    assert code == 2
    assert "huggingface-cli download" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was written, nothing trained


def test_model_section_validation() -> None:
    with pytest.raises(ValueError, match="model.path is required"):
        ModelConfig(source="hf")
    with pytest.raises(ValueError, match="model.source"):
        ModelConfig(source="open_clip")
    with pytest.raises(ValueError, match="model.clip_config"):
        ModelConfig(source="random", clip_config="vit-h-14")
