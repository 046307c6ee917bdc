"""Export to what serving stacks load: every method through the trainer on a tiny CLIP, reloaded from its
checkpoint, written as a plain transformers model (hf) and as stock peft LoRA adapters (peft), loaded
back with transformers / peft and compared with the trained model's own outputs; fused attention;
LiLoRA and SeqLoRA on a tiny LLaVA."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (
    METHOD_ARGS,
    TASKS,
    TRAIN,
    adapt,
    llava_inputs,
    make_tiny_llava,
    randomize,
    run_stream,
    stream_tokenizer,
)
from peft import PeftModel
from torch import nn
from transformers import CLIPModel, LlavaForConditionalGeneration

from continual_lora.adapters import (
    ExportError,
    add_task,
    branches,
    inject_adapters,
    merged,
    save_peft_lora,
    use_task,
)
from continual_lora.app.export import load_method, save_hf_model, save_peft_adapters, select
from continual_lora.continual.checkpoint import method_dir
from continual_lora.methods import METHODS, LiLoRAConfig, build_method
from continual_lora.models.llava_mini import LLAVA_TARGETS

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-5

# What each method's export can hold, and why not where the maths does not allow it (docs/export.md).
#   per_task: one peft adapter per task, each alone on the base model is that task's model
#   final:    one peft adapter, the model that serves every task
#   chain:    one rank-k adapter per task, applied in order (each merged) to the base = the merged model
#   None:     no peft adapter; the ExportError names the reason
PEFT = {
    "lilora": "per_task", "per_task_lora": "per_task",
    "rank1_pool": "chain",
    "seq_lora": "final", "ewc": "final", "lwf_vr": "final", "replay": "final", "wise_ft": "final", "zscl": "final",
    "joint_lora": "final", "o_lora": "final", "sd_lora": "final",
    "zero_shot": None,  # nothing trains: no adapter (hf writes the base model)
    "moe_lora": None,  # the router reads the input: neither fixed weights nor a LoRA product
}
HF = {name: name != "moe_lora" for name in PEFT}  # a plain transformers model: every update that is fixed weights
REFUSAL = {"zero_shot": "trains nothing", "moe_lora": "router"}


def test_every_registered_method_has_an_export_row() -> None:
    assert set(PEFT) == set(METHODS) == set(METHOD_ARGS)


@torch.no_grad()
def clip_out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return torch.cat([out.logits_per_image.flatten(), out.text_embeds.flatten(), out.image_embeds.flatten()])


def stream_inputs() -> dict[str, torch.Tensor]:
    ids, mask = stream_tokenizer()(["a photo of a red.", "an image of a cow.", "a photo of a two."])
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def peft_chain(base: nn.Module, directories) -> nn.Module:
    """Apply stock peft adapters in order, each merged into the model before the next loads."""
    model = copy.deepcopy(base)
    for directory in directories:
        model = PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
    return model.eval()


@pytest.mark.parametrize("name", sorted(PEFT))
def test_every_method_exports_to_transformers_and_peft(clip_stream, tmp_path, name) -> None:
    kind, base = clip_stream
    stream = TASKS[:2]
    _, trainer = run_stream(base, build_method(name, **METHOD_ARGS[name]), kind, stream, TRAIN, tmp=tmp_path / "run")
    inputs = stream_inputs()
    tasks = [t.name for t in stream] if trainer.method.uses_task_id else [None]
    ours = {}
    for task in tasks:  # the trained model as the method evaluates it (task-id methods: each task's adapter)
        with trainer.method.evaluating(trainer.model, task):
            ours[task] = clip_out(trainer.model, inputs)
    plain = clip_out(base, inputs)
    if name != "zero_shot":
        assert all((out - plain).abs().max() > 1e-2 for out in ours.values())  # a dropped update would pass otherwise

    method = build_method(name, **METHOD_ARGS[name])  # what export does: a fresh base + the checkpoint
    model = load_method(copy.deepcopy(base), method, method_dir(tmp_path / "run"))
    if PEFT[name] is None:
        with pytest.raises(ExportError, match=REFUSAL[name]):
            save_peft_adapters(model, method, tmp_path / "peft")
    else:
        for branch in branches(model).values():  # what an adapter stores is what merging adds
            for key in method.peft_adapters(model).values():
                a, b = branch.lora_factors(key)
                torch.testing.assert_close(b @ a, branch.delta_weight(key), atol=1e-6, rtol=1e-5)
        written = save_peft_adapters(model, method, tmp_path / "peft", base_model_name_or_path="tiny-clip")
        config = json.loads((written[0] / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "tiny-clip" and config["lora_alpha"] == config["r"]
        assert set(config["target_modules"]) == set(branches(model))  # the base model's own module names
        if PEFT[name] == "per_task":
            assert [p.name for p in written] == tasks
            for directory, task in zip(written, tasks):
                theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()
                torch.testing.assert_close(clip_out(theirs, inputs), ours[task], atol=ATOL, rtol=0)
        elif PEFT[name] == "chain":
            assert [p.name for p in written] == [t.name for t in stream]
            torch.testing.assert_close(clip_out(peft_chain(base, written), inputs), ours[None], atol=ATOL, rtol=0)
            partial = peft_chain(base, written[:1])  # a prefix of the chain is the model after that task
            assert (clip_out(partial, inputs) - ours[None]).abs().max() > 1e-3
        else:
            assert [p.name for p in written] == ["final"]
            theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(written[0])).eval()
            torch.testing.assert_close(clip_out(theirs, inputs), ours[None], atol=ATOL, rtol=0)

    if not HF[name]:
        with pytest.raises(ExportError, match=REFUSAL[name]):
            save_hf_model(model, method, tmp_path / "hf", None)
        return
    for task in tasks:  # task-id methods: base weights restored after each task (exported one after another)
        directory = save_hf_model(model, method, tmp_path / "hf" / str(task), task)
        theirs = CLIPModel.from_pretrained(directory, local_files_only=True).eval()
        torch.testing.assert_close(clip_out(theirs, inputs), ours[task], atol=ATOL, rtol=0)
        assert type(theirs) is type(base) and set(theirs.state_dict()) == set(base.state_dict())


def test_merged_view_restores_the_base_weights_bit_for_bit(tiny_clip) -> None:
    model = adapt(tiny_clip, tasks=("t1", "t2"))
    model.half()  # low precision: unmerging would not give the weights back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with merged(model, "t1") as plain:
        assert not branches(plain)
        assert not torch.equal(plain.vision_model.encoder.layers[0].self_attn.q_proj.weight,
                               before["vision_model.encoder.layers.0.self_attn.q_proj.base_layer.weight"])
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# --- task selection ----------------------------------------------------------------------------------
def test_task_selection_rules() -> None:
    lilora, seq = build_method("lilora"), build_method("seq_lora")
    trained = ["a", "b"]
    assert select(lilora, trained, "hf", "b", False) == ["b"]
    assert select(lilora, trained, "hf", None, True) == ["a", "b"]
    assert select(lilora, trained, "peft", None, False) == ["a", "b"]  # adapters are small: every task
    assert select(seq, trained, "hf", None, False) == [None]
    with pytest.raises(ExportError, match="needs a task id"):
        select(lilora, trained, "hf", None, False)
    with pytest.raises(ExportError, match="unknown task 'c'"):
        select(lilora, trained, "peft", "c", False)
    with pytest.raises(ExportError, match="needs no task id"):
        select(seq, trained, "peft", "a", False)


# --- OpenAI-style fused attention ------------------------------------------------------------------
class FusedBlock(nn.Module):
    """An OpenAI-CLIP-style block: nn.MultiheadAttention on (L, N, D) plus an MLP linear."""

    def __init__(self, width: int = 8, kdim: int | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 2, kdim=kdim, vdim=kdim)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:  # (L, N, D)
        kv = x if kv is None else kv
        return self.fc(self.attn(x, kv, kv, need_weights=False)[0])


@pytest.mark.parametrize("config", [
    dict(method="lora", targets=("q_proj", "k_proj", "v_proj", "fc")),
    dict(method="lora", targets=("q_proj", "v_proj", "fc")),  # k missing: no block for it
    dict(method="lilora", targets=("q_proj", "v_proj", "fc")),
], ids=["lora-qkv", "lora-q-v", "lilora-q-v"])
def test_fused_attention_exports_to_peft_multihead_attention(tmp_path, config) -> None:
    """The q / k / v slots become one block-diagonal LoRA on peft's fused in_proj: what peft loads."""
    torch.manual_seed(0)
    base = FusedBlock().eval()
    model = copy.deepcopy(base)
    if config["method"] == "lora":
        adapt(model, tasks=("t",), targets=config["targets"], rank=2, alpha=4.0)
    else:
        inject_adapters(model, LiLoRAConfig(targets=config["targets"], rank=2, alpha=4.0, inner_rank=1, dropout=0.0))
        add_task(model, "t")
        with torch.no_grad():
            for b in branches(model).values():
                for p in (b.A, b.B0, b.P["t"], b.Q["t"]):
                    p.normal_(0, 0.3)
    x = torch.randn(5, 3, 8)  # (L, N, D)
    with torch.no_grad(), use_task(model, "t"):
        ours = model(x)
        assert (ours - base(x)).abs().max() > 1e-2
    directory = save_peft_lora(model, tmp_path, "t")
    config_json = json.loads((directory / "adapter_config.json").read_text())
    assert set(config_json["target_modules"]) == {"attn", "fc"}  # the attention module itself, as peft targets it
    assert config_json["rank_pattern"]  # attention (2 or 3 slots) and fc (1) have different ranks
    for theirs in (PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval(),
                   PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).merge_and_unload()):
        with torch.no_grad():
            torch.testing.assert_close(theirs(x), ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("kdim", "targets", "message"), [
    (6, ("q_proj", "v_proj"), "kdim = vdim = embed_dim"),
    (None, ("q_proj", "out_proj"), "out_proj LoRA.*twice.*peft#3774"),
])
def test_attention_peft_cannot_load_is_refused_with_the_alternative(tmp_path, kdim, targets, message) -> None:
    model = FusedBlock(kdim=kdim)
    adapt(model, tasks=("t",), targets=targets, rank=2)
    with pytest.raises(ExportError, match=f"{message}.*merged model"):
        save_peft_lora(model, tmp_path, "t")


def test_peft_adds_multihead_attention_out_proj_twice() -> None:
    """Why out_proj is refused: peft's own LoRA on nn.MultiheadAttention adds the out_proj update twice
    when it merges (and so in every forward). When this fails, peft has fixed it: lift the refusal."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = FusedBlock().eval()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=2, target_modules=["attn"],
                                                                init_lora_weights=False))
    out_proj = peft_model.base_model.model.attn.base_layer.out_proj
    delta = out_proj.get_delta_weight("default").detach()
    plain = peft_model.merge_and_unload()
    torch.testing.assert_close(plain.attn.out_proj.weight - base.attn.out_proj.weight, 2 * delta)


# --- a tiny LLaVA ---------------------------------------------------------------------------------------
def _train_by_hand(name: str, model: nn.Module):
    """LiLoRA (two tasks) or SeqLoRA (one update through two tasks) with random, nonzero factors."""
    method = build_method(name, rank=4, alpha=8.0, targets=LLAVA_TARGETS,
                          **({"inner_rank": 2, "dropout": 0.0} if name == "lilora" else {}))
    method.attach(model)
    for index, task in enumerate(("t0", "t1")):
        method.begin_task(model, task, index)
        with torch.no_grad():
            if name == "lilora":
                for b in branches(model).values():
                    for p in (b.A, b.B0, b.P[task], b.Q[task]):
                        p.normal_(0, 0.3)
            else:
                randomize(model, seed=index)
        method.end_task(model, task, index)
    return method


@torch.no_grad()
def llava_logits(model: nn.Module) -> torch.Tensor:
    return model(**llava_inputs()).logits


@pytest.mark.parametrize("name", ["lilora", "seq_lora"])
def test_llava_exports_to_transformers_and_peft(tmp_path, name) -> None:
    base = make_tiny_llava()
    trained = copy.deepcopy(base)
    method = _train_by_hand(name, trained)
    adapted = set(branches(trained))
    assert any("multi_modal_projector" in n for n in adapted) and any("mlp.down_proj" in n for n in adapted)
    method.save(trained, str(tmp_path / "ckpt"))
    tasks = ["t0", "t1"] if name == "lilora" else [None]
    ours = {}
    for task in tasks:
        with method.evaluating(trained, task):
            ours[task] = llava_logits(trained)
    assert all((v - llava_logits(base)).abs().max() > 1e-3 for v in ours.values())

    fresh = build_method(name, **method.config.__dict__)
    model = load_method(copy.deepcopy(base), fresh, tmp_path / "ckpt")
    written = save_peft_adapters(model, fresh, tmp_path / "peft", base_model_name_or_path="tiny-llava")
    assert [p.name for p in written] == (tasks if name == "lilora" else ["final"])
    for directory, task in zip(written, tasks):
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()
        torch.testing.assert_close(llava_logits(theirs), ours[task], atol=ATOL, rtol=0)
    for task in tasks:
        directory = save_hf_model(model, fresh, tmp_path / "hf" / str(task), task)
        theirs = LlavaForConditionalGeneration.from_pretrained(directory, local_files_only=True).eval()
        torch.testing.assert_close(llava_logits(theirs), ours[task], atol=ATOL, rtol=0)


def test_a_llava_checkpoint_source_is_its_directory_with_its_processor_files(tmp_path) -> None:
    """LLaVA-1.5 runs (benchmark cvit): export points peft at the checkpoint's folder, merges into its
    bf16 weights as the run loaded them, and copies its tokenizer / processor files."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from continual_lora.models.llava import llava_source_model

    checkpoint = tmp_path / "llava"
    make_tiny_llava().save_pretrained(checkpoint)
    tokenizer = stream_tokenizer().to_transformers()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    size = {"height": 16, "width": 16}
    LlavaProcessor(image_processor=CLIPImageProcessor(size=size, crop_size=size), tokenizer=tokenizer, patch_size=8,
                   vision_feature_select_strategy="default").save_pretrained(checkpoint)
    source = llava_source_model(str(checkpoint))
    assert source.source == str(checkpoint.resolve()) and next(source.model.parameters()).dtype == torch.bfloat16
    method = _train_by_hand("seq_lora", source.model)
    out = save_hf_model(source.model, method, tmp_path / "hf", None, source.write_preprocessing)
    assert {"tokenizer.json", "processor_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    merged_model = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True)
    assert next(merged_model.parameters()).dtype == torch.bfloat16
