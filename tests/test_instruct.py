"""The instruction-tuning path on a tiny random LLaVA: data loader, label masking, the kind, the trainer."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import LLAVA_IMAGE_TOKEN, LLAVA_IMAGE_TOKENS, make_tiny_llava, run_stream
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from continual_lora import metrics
from continual_lora.adapters import inject_adapters, parameter_counts
from continual_lora.benchmarks import cvit
from continual_lora.models.llava_mini import LLAVA_TARGETS
from continual_lora.config import ConfigError
from continual_lora.continual import TrainConfig
from continual_lora.kinds.instruct_data import InstructSample, InstructTask, read_llava_json, write_llava_json
from continual_lora.kinds.instruct import IGNORE_INDEX, InstructionTuning, image_token_count
from continual_lora.methods import LiLoRAConfig, build_method

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]  # ids 0, 1, 2 = the tiny Llama's pad, bos, eos
COLORS = ("red", "green", "blue")


def tiny_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level ChatML tokenizer over ``texts`` (fits the tiny LLaVA's 128-token vocabulary)."""
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    assert len(vocab) < LLAVA_IMAGE_TOKEN
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", unk_token="<unk>")
    tok.chat_template = CHATML
    return tok


def color_images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 16, 16): image k is solid colour k % 3 (red, green, blue) plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for k in range(n):
        img = torch.zeros(3, 16, 16)
        img[k % 3] = 1.0
        images.append((img + 0.05 * torch.rand(3, 16, 16, generator=g)).clamp(0, 1))
    return torch.stack(images)


def color_task(name: str, fmt: str, seed: int) -> InstructTask:
    """Solid-colour 16 px images; short answers ("red") or a 3-way multiple choice ("B")."""
    samples = []
    for k in range(18):
        y = k % 3
        if fmt == "short":
            turn = ("<image>\nWhat color is it ? Answer with one word .", COLORS[y])
        else:
            turn = ("<image>\nWhich color ? A . red B . green C . blue Answer with the letter .", "ABC"[y])
        samples.append(InstructSample(f"{name}-{k}", (turn,), image=k))
    return InstructTask(name, samples[:12], samples[12:], scorer="exact" if fmt == "short" else "option",
                        answer_format=fmt, images=color_images(18, seed))


TASKS = [color_task("colors", "short", 1), color_task("choice", "letter", 2)]
TEXTS = [t for task in TASKS for s in task.train + task.test for turn in s.turns for t in turn] + ["system user assistant"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer(TEXTS)


def make_kind(tokenizer, model, **kw) -> InstructionTuning:
    return InstructionTuning.for_model(model, tokenizer, eval_batch_size=4, **kw)


# --- data ------------------------------------------------------------------------------------
def write_png(path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)


def test_llava_json_loader(tmp_path) -> None:
    (tmp_path / "img").mkdir()
    write_png(tmp_path / "img" / "a.png", 0)
    write_png(tmp_path / "img" / "b.png", 1)
    records = [
        {"id": "q1", "image": "img/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "noise"},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]},
        {"id": 7, "image": "img/b.png", "answers": ["two"] * 3 + ["2"] * 7,
         "conversations": [{"from": "human", "value": "How many?"}]},  # test record: no gpt turn
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    samples = read_llava_json(tmp_path / "train.json", "toy", image_root=tmp_path)
    assert [s.id for s in samples] == ["q1", "7"]
    assert samples[0].turns == (("<image>\nWhat is it?", "noise"), ("Sure?", "yes"))
    assert samples[0].targets == ("yes",)
    assert samples[1].turns == (("<image>\nHow many?", ""),)  # the marker is added in front, as LLaVA does
    assert len(samples[1].targets) == 10
    task = InstructTask("toy", samples, samples, image_root=tmp_path)
    x = task.image(samples[0], 16)
    assert x.shape == (3, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1
    write_llava_json(tmp_path / "copy.json", samples)  # round trip (the marker is kept in place)
    assert read_llava_json(tmp_path / "copy.json", "toy", image_root=tmp_path) == samples
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records))
    assert read_llava_json(jsonl, "toy", image_root=tmp_path)[0].turns == samples[0].turns


def test_missing_image_names_file_and_task(tmp_path) -> None:
    records = [{"id": "1", "image": "COCO/missing.jpg",
                "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}]
    (tmp_path / "train.json").write_text(json.dumps(records))
    with pytest.raises(FileNotFoundError, match=r"task 'TextVQA': image file .*COCO/missing\.jpg does not exist"):
        read_llava_json(tmp_path / "train.json", "TextVQA", image_root=tmp_path)
    bad = [{"id": "1", "conversations": [{"from": "gpt", "value": "A"}]}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="turn 0 must be"):
        read_llava_json(tmp_path / "bad.json", "x")


# --- encoding ----------------------------------------------------------------------------------
def test_labels_cover_only_the_assistant_tokens(tokenizer) -> None:
    model = make_tiny_llava()
    kind = make_kind(tokenizer, model, system_prompt="system")
    sample = InstructSample("m", (("<image>\nWhat color is it ?", "red"), ("Answer with one word .", "blue")), image=0)
    ids, labels = kind.encode(sample)
    assert len(ids) == len(labels)
    assert ids.count(LLAVA_IMAGE_TOKEN) == LLAVA_IMAGE_TOKENS == image_token_count(model.config)
    kept = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert kept == [l for l in labels if l != IGNORE_INDEX]  # labels equal the inputs where kept
    assert tokenizer.decode(kept) == "red <|im_end|> blue <|im_end|>"  # both replies + end of turn, nothing else
    prompt, _ = kind.encode(sample, with_answer=False)
    assert tokenizer.decode(prompt[-2:]) == "<|im_start|> assistant"  # the last turn's generation prompt
    assert ids[: len(prompt)] == prompt  # the evaluation prompt is exactly the training prefix


def test_llava15_vicuna_template_renders_prefix_by_prefix(tokenizer) -> None:
    from continual_lora.models.llava import VICUNA_V1_TEMPLATE

    kind = make_kind(tokenizer, make_tiny_llava(), chat_template=VICUNA_V1_TEMPLATE)
    ids, labels = kind.encode(InstructSample("v", (("<image>\nWhat color is it ?", "red"),), image=0))
    kept = [l for l in labels if l != IGNORE_INDEX]
    assert tokenizer.decode(kept[:1]) == "red"  # the reply (then "</s>", unknown to this toy vocabulary)
    assert ids.count(LLAVA_IMAGE_TOKEN) == LLAVA_IMAGE_TOKENS


def test_batch_shapes_and_loss(tokenizer) -> None:
    model = make_tiny_llava()
    kind = make_kind(tokenizer, model)
    batch = kind.train_batch(TASKS[0], torch.tensor([0, 1, 2]), torch.Generator())
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    loss = kind.loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # one process: the token mean the model computes itself (the kind gathers sums for data parallel)
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-6, atol=1e-6)
    ragged = kind.train_batch(TASKS[1], torch.tensor([0, 5]), torch.Generator())
    torch.testing.assert_close(kind.loss(model, ragged), model(**ragged).loss, rtol=1e-6, atol=1e-6)
    assert 0.0 <= kind.evaluate(model, TASKS[0]) <= 100.0 and kind.log[-1]["task"] == "colors"


def test_plain_stage1_batch_labels_only_the_caption(tokenizer) -> None:
    model = make_tiny_llava()
    kind = make_kind(tokenizer, model)
    task = InstructTask("cap", [InstructSample("c", (("<image>", "red"),), image=0)], [], images=TASKS[0].images)
    batch = kind.plain_batch(task, torch.tensor([0]))
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids[:LLAVA_IMAGE_TOKENS] == [LLAVA_IMAGE_TOKEN] * LLAVA_IMAGE_TOKENS  # no chat template
    assert tokenizer.decode([l for l in labels if l != IGNORE_INDEX]) == "red <|im_end|>"
    assert torch.isfinite(kind.loss(model, batch))


# --- LiLoRA's release targets --------------------------------------------------------------
def test_llava_targets_are_llm_mlp_and_projector_only() -> None:
    model = make_tiny_llava()
    adapted = inject_adapters(model, LiLoRAConfig(rank=4, inner_rank=2, targets=LLAVA_TARGETS))
    expected = {f"model.language_model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    expected |= {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"}
    assert set(adapted) == expected


# --- the trainer -------------------------------------------------------------------------------
@pytest.mark.parametrize("future", [True, False])
def test_lilora_through_the_trainer(tokenizer, future) -> None:
    model = make_tiny_llava()
    kind = make_kind(tokenizer, model, evaluate_future=future, max_new_tokens=3)
    method = build_method("lilora", rank=4, alpha=8.0, inner_rank=2, dropout=0.0, targets=LLAVA_TARGETS)
    cfg = TrainConfig(iterations=3, batch_size=4, lr=1e-2, progress=False)
    state, trainer = run_stream(model, method, kind, TASKS, cfg)
    assert state.finished and len(state.matrix) == 2 and all(len(r) == 2 for r in state.matrix)
    assert len(state.zero_shot) == 2 and min(state.trainable_params) > 0
    scores = metrics.cvit_metrics(state.matrix)
    assert set(scores) == {"ap", "map", "bwt"}
    evaluated = [e["task"] for e in kind.log]
    if future:
        assert evaluated == ["colors", "choice"] * 3
    else:  # CVIT: after task k only tasks 0..k; the skipped entry repeats the zero-shot score
        assert evaluated == ["colors", "choice", "colors", "colors", "choice"]
        assert state.matrix[0][1] == state.zero_shot[1]
    results = kind.extra_results({"metrics": scores, "finished": True})
    assert set(results["mif"]["final"]) == {"colors", "choice"} and 0 <= results["metrics"]["mif"] <= 100
    # LiLoRA's accounting: r (in + out) shared, s (out + r) + 1 per task, per adapted layer
    layers = [(32, 64), (32, 64), (64, 32), (32, 32), (32, 32)]  # (in, out): gate/up, down x 2 layers; projector
    layers = layers[:3] * 2 + layers[3:]
    counts = parameter_counts(trainer.model)
    assert counts["shared"] == sum(4 * (i + o) for i, o in layers)
    assert counts["per_task"] == {t: sum(2 * (o + 4) + 1 for _, o in layers) for t in ("colors", "choice")}


def test_resumed_run_keeps_the_evaluation_log_and_mif(tokenizer, tmp_path) -> None:
    """Stopped after task 1 and resumed by a fresh model, method and kind: the MIF record (zero-shot
    and final) and the evaluation log equal those of the uninterrupted run."""
    model = make_tiny_llava()
    cfg = TrainConfig(iterations=2, batch_size=4, lr=1e-2, progress=False)

    def run(directory, stop_after=None, resume=False):
        kind = make_kind(tokenizer, model, evaluate_future=False, max_new_tokens=3)
        method = build_method("lilora", rank=4, alpha=8.0, inner_rank=2, dropout=0.0, targets=LLAVA_TARGETS)
        state, _ = run_stream(model, method, kind, TASKS, cfg, tmp=directory, resume=resume, stop_after=stop_after)
        return kind.extra_results({"metrics": metrics.cvit_metrics(state.matrix)}), state

    full, full_state = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", stop_after=1)
    resumed, resumed_state = run(tmp_path / "cut", resume=True)
    assert resumed_state.matrix == full_state.matrix
    assert [e["task"] for e in resumed["eval_log"]] == ["colors", "choice", "colors", "colors", "choice"]
    assert resumed["eval_log"] == full["eval_log"] and resumed["mif"] == full["mif"]
    assert resumed["metrics"]["mif"] == full["metrics"]["mif"]


def test_real_scale_cvit_fails_before_training_with_download_hint(tmp_path) -> None:
    from continual_lora.app.runner import RunConfig, run_settings
    from continual_lora.config import from_dict

    config = from_dict(RunConfig, {"benchmark": {"name": "cvit", "model_path": "/path/to/llava-1.5-7b-hf"}})
    with pytest.raises(ConfigError, match="huggingface-cli download llava-hf/llava-1.5-7b-hf"):
        cvit.build(config.benchmark, run_settings(config))
    config = from_dict(RunConfig, {"benchmark": {"name": "cvit", "model_path": str(tmp_path / "nothing")}})
    with pytest.raises(ConfigError, match="no LLaVA checkpoint"):
        cvit.build(config.benchmark, run_settings(config))


# --- cvit-mini's bundled tasks ---------------------------------------------------------------
def test_cvit_mini_tasks_from_bundled_data() -> None:
    from continual_lora.benchmarks.cvit_mini import CVIT_MINI_TASKS, TEXTILE_CAPTIONS, build_cvit_mini

    tasks = build_cvit_mini(max_train_per_task=12, max_test_per_task=6, seed=0)
    assert [t.name for t in tasks] == list(CVIT_MINI_TASKS)
    assert [(t.scorer, t.answer_format) for t in tasks] == [
        ("exact", "short"), ("exact", "short"), ("cider", "sentence"), ("answer_match", "short")]
    for task in tasks:
        assert len(task.train) == 12 and len(task.test) == 6
        assert task.images is not None and task.images.shape[1:] == (3, 32, 32)
        for s in task.train + task.test:
            assert s.turns[0][0].startswith("<image>\n") and task.image(s, 32).shape == (3, 32, 32)
    assert {s.answer for s in tasks[0].train} <= set("0123456789")
    assert all(s.targets in TEXTILE_CAPTIONS and s.answer in s.targets for s in tasks[2].test)
    again = build_cvit_mini(max_train_per_task=12, max_test_per_task=6, seed=1)
    assert [s.id for s in again[1].test] == [s.id for s in tasks[1].test]  # test subsets do not move with the seed


def test_shipped_cvit_config_stops_before_training(tmp_path, capsys) -> None:
    from pathlib import Path

    from continual_lora.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "cvit" / "lilora.yaml"
    assert main(["run", str(config), f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "benchmark.model_path" in err and "huggingface-cli download llava-hf/llava-1.5-7b-hf" in err
    assert not list(tmp_path.rglob("checkpoint"))
