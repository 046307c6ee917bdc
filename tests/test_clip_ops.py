"""kinds.clip_ops and the word tokenizer: word tokenizer, EOS pooling, text classifier, soft-target contrastive loss, evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip

from continual_lora.kinds import clip_ops as ct
from continual_lora.models.word_tokenizer import WordTokenizer

TEXTS = ["a photo of a cat.", 'a photo of the number: "seven".', "a t-shirt, on a plain background!"]
TOWER = dict(num_attention_heads=2, projection_dim=16)  # make_tiny_clip: 2 heads; the towers' own projection 16


@pytest.fixture
def tok() -> WordTokenizer:
    return WordTokenizer.from_texts(TEXTS + ["a drawing of a dog.", "a photo of a bird."], context_length=12)


def test_tokenizer_round_trip_and_layout(tok, tmp_path) -> None:
    ids, mask = tok(TEXTS)
    assert ids.shape == mask.shape == (3, 12) and ids.dtype == torch.int64
    for row, text in enumerate(TEXTS):
        words = WordTokenizer.split(text)
        n = len(words) + 2
        assert tok.decode(ids[row].tolist()) == " ".join(words)
        assert ids[row, 0] == tok.sot_id and ids[row, n - 1] == tok.eos_id
        assert bool((ids[row, n:] == tok.pad_id).all()) and mask[row].tolist() == [1] * n + [0] * (12 - n)
    assert WordTokenizer.split("A T-shirt!") == ["a", "t", "-", "shirt", "!"]
    path = tmp_path / "tok.json"
    tok.save(path)
    again = WordTokenizer.load(path)
    assert again.vocab == tok.vocab and again.context_length == 12
    assert torch.equal(again(TEXTS)[0], ids)


def test_tokenizer_unknown_words_and_truncation(tok) -> None:
    ids, _ = tok(["a zebra"])
    assert ids[0, :4].tolist() == [tok.sot_id, tok.index["a"], tok.unk_id, tok.eos_id]
    long_ids, long_mask = tok([" ".join(["cat"] * 30)])
    assert long_ids[0, -1] == tok.eos_id and int(long_mask.sum()) == 12
    assert tok.eos_id != 2  # 2 would switch transformers' CLIP to legacy argmax pooling


def test_pooling_reads_the_eos_position(tok) -> None:
    model = make_tiny_clip(tokenizer=tok, **TOWER)
    ids, mask = tok(TEXTS)
    eos_pos = (ids == tok.eos_id).int().argmax(dim=-1)  # (B,)
    with torch.no_grad():
        out = model.text_model(input_ids=ids, attention_mask=mask)
        rows = torch.arange(len(TEXTS))
        assert torch.allclose(out.pooler_output, out.last_hidden_state[rows, eos_pos], atol=1e-6)
        assert not torch.allclose(out.pooler_output, out.last_hidden_state[rows, ids.argmax(dim=-1)])
        feats = ct.encode_texts(model, ids, mask)
        assert torch.allclose(feats, model.text_projection(out.last_hidden_state[rows, eos_pos]), atol=1e-6)
        legacy_ids = tok.special_ids() | {"eos_token_id": 2}  # same weights, legacy config value
        legacy = make_tiny_clip(tokenizer=tok, special_ids=legacy_ids, **TOWER)
        legacy_out = legacy.text_model(input_ids=ids, attention_mask=mask).pooler_output
        assert not torch.allclose(legacy_out, out.pooler_output)


def test_text_classifier_rows_are_unit_and_template_means(tok) -> None:
    model = make_tiny_clip(tokenizer=tok, **TOWER)
    model.train()
    classes, templates = ["cat", "dog", "bird"], ["a photo of a {}.", "a drawing of a {}."]
    clf = ct.text_classifier(model, tok, classes, templates)
    assert clf.shape == (3, 16) and not clf.requires_grad and model.training
    assert torch.allclose(clf.norm(dim=-1), torch.ones(3), atol=1e-5)
    model.eval()
    with torch.no_grad():
        ids, mask = tok([t.format("dog") for t in templates])
        emb = F.normalize(ct.encode_texts(model, ids, mask), dim=-1).mean(0)
    assert torch.allclose(clf[1], F.normalize(emb, dim=0), atol=1e-5)
    assert ct.text_classifier(model, tok, classes, templates, with_grad=True).requires_grad


def test_soft_targets_hand_example() -> None:
    t = ct.soft_targets(torch.tensor([0, 1, 0, 0]))
    third = 1.0 / 3.0
    row = [third, 0.0, third, third]
    expected = torch.tensor([row, [0.0, 1.0, 0.0, 0.0], row, row])
    assert torch.allclose(t, expected)


def test_contrastive_loss_matches_manual_and_decreases(tok) -> None:
    model = make_tiny_clip(tokenizer=tok, **TOWER).train()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 16, 16, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    names = ["cat", "dog", "bird"]
    ids, mask = tok(ct.captions_for(labels, names, ["a photo of a {}."], g))
    loss = ct.contrastive_loss(model, images, labels, ids, mask, logit_scale=10.0)
    with torch.no_grad():
        img = F.normalize(ct.encode_images(model, images), dim=-1)
        txt = F.normalize(ct.encode_texts(model, ids, mask), dim=-1)
        logits = 10.0 * img @ txt.t()
        same = (labels[:, None] == labels[None, :]).float() / 2.0
        i2t = (same * logits.log_softmax(1)).sum(1).mean()
        t2i = (same * logits.t().log_softmax(1)).sum(1).mean()
        manual = -0.5 * (i2t + t2i)
    assert torch.allclose(loss, manual, atol=1e-5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = ct.contrastive_loss(model, images, labels, ids, mask, logit_scale=None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_classify_and_evaluate_accuracy(tok) -> None:
    model = make_tiny_clip(tokenizer=tok, **TOWER)
    model.train()
    images, labels = torch.rand(10, 3, 16, 16), torch.tensor([0, 1] * 5)
    classes, templates = ["cat", "dog"], ["a photo of a {}."]
    acc = ct.evaluate_accuracy(model, tok, (images, labels), classes, templates, batch_size=3)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        logits = ct.classify(model, images, ct.text_classifier(model, tok, classes, templates))
    assert logits.shape == (10, 2)
    assert acc == pytest.approx(100.0 * float((logits.argmax(-1) == labels).float().mean()))
    # a classifier made of the images' own features scores 100 %
    with torch.no_grad():
        own = F.normalize(ct.encode_images(model, images[:2]), dim=-1)
    assert ct.evaluate_accuracy(model, tok, (images[:2], torch.tensor([0, 1])), classifier=own) == 100.0
    assert not model.training


def test_normalize_images_maps_unit_interval_to_pm1() -> None:
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    assert ct.normalize_images(x).flatten().tolist() == [-1.0, 0.0, 1.0]


def test_captions_for_are_seeded_and_name_the_class() -> None:
    labels = torch.tensor([2, 0, 1, 2])
    names, templates = ["cat", "dog", "bird"], ["a photo of a {}.", "a drawing of a {}."]
    a = ct.captions_for(labels, names, templates, torch.Generator().manual_seed(5))
    b = ct.captions_for(labels, names, templates, torch.Generator().manual_seed(5))
    assert a == b and len(a) == 4
    assert all(c in {t.format(names[y]) for t in templates} for c, y in zip(a, labels.tolist()))
