"""``continual-lora export`` on a real run (tests/conftest.py ``tiny_run``): train -> export -> load the
result with transformers / peft alone, in a Python that never imports continual-lora; the command's
one-line errors. The conversion maths per method: tests/test_export.py."""

from __future__ import annotations

import json

import pytest
import torch
from test_export import ATOL, clip_out

from continual_lora.continual.checkpoint import method_dir

pytestmark = pytest.mark.usefixtures("one_thread")

LOADER = r'''
import json, sys
import torch
from safetensors.torch import load_file, save_file
from peft import PeftModel
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

spec = json.load(open(sys.argv[1]))
images = load_file(spec["images"])["images"].numpy()  # (N, S, S, 3) uint8
out = {}
for name, entry in spec["models"].items():
    manifest = json.load(open(entry["export"] + "/export.json"))
    if manifest["format"] == "hf":
        model = CLIPModel.from_pretrained(entry["export"]).eval()
        processing = entry["export"]
    else:
        model = CLIPModel.from_pretrained(manifest["base_model_name_or_path"])
        processing = manifest["base_model_name_or_path"]
        for adapter in entry["adapters"]:  # a chain: each merged before the next; else one adapter
            model = PeftModel.from_pretrained(model, entry["export"] + "/" + adapter)
            model = model.merge_and_unload() if len(entry["adapters"]) > 1 else model
        model.eval()
    tokenizer = AutoTokenizer.from_pretrained(processing)
    text = tokenizer(spec["texts"], padding="max_length", truncation=True, return_tensors="pt",
                     max_length=model.config.text_config.max_position_embeddings)
    pixels = AutoImageProcessor.from_pretrained(processing)(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        o = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
    out[name] = torch.cat([o.logits_per_image.flatten(), o.text_embeds.flatten(), o.image_embeds.flatten()])
assert not [m for m in sys.modules if m.startswith("continual_lora")]
save_file(out, spec["out"])
'''


def test_cli_export_then_load_with_transformers_and_peft_alone(tiny_run, tmp_path) -> None:
    """``continual-lora export`` of LiLoRA (a task id) and the Rank-1 pool (a chain), in both formats; a
    separate Python that never imports continual-lora loads each with its own tokenizer and image
    processor and reproduces our model's outputs."""
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    from continual_lora.app.export import load_method, read_run, source_model
    from continual_lora.cli import main
    from continual_lora.kinds.clip_ops import normalize_images

    exports = tmp_path / "exports"
    commands = {
        "lilora-hf": ["lilora", "hf", "--task", "digits"],
        "lilora-peft": ["lilora", "peft"],
        "rank1_pool-hf": ["rank1_pool", "hf"],
        "rank1_pool-peft": ["rank1_pool", "peft"],
    }
    for out, (label, fmt, *extra) in commands.items():
        assert main(["export", str(tiny_run / label), "--format", fmt, "--out", str(exports / out), *extra]) == 0
    lilora_peft = json.loads((exports / "lilora-peft" / "export.json").read_text())
    assert lilora_peft["adapters"] == ["animals", "digits"]
    assert lilora_peft["base_model_name_or_path"] == str((exports / "lilora-peft" / "base").resolve())
    for adapter in ("animals", "digits"):
        config = json.loads((exports / "lilora-peft" / adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == lilora_peft["base_model_name_or_path"]

    texts = ["a photo of the digit seven.", "a photo of a cat.", "an unknown wordzz, here"]
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    models = {  # name -> the export directory and, for peft, its adapters to apply (in order)
        "lilora-hf": {"export": "lilora-hf"},
        "lilora-peft-animals": {"export": "lilora-peft", "adapters": ["animals"]},
        "lilora-peft-digits": {"export": "lilora-peft", "adapters": ["digits"]},
        "rank1_pool-hf": {"export": "rank1_pool-hf"},
        "rank1_pool-peft": {"export": "rank1_pool-peft", "adapters": ["animals", "digits"]},
    }
    for entry in models.values():
        entry["export"] = str(exports / entry["export"])
    save_file({"images": images}, str(tmp_path / "images.safetensors"))
    spec = {"images": str(tmp_path / "images.safetensors"), "texts": texts, "models": models,
            "out": str(tmp_path / "theirs.safetensors")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "loader.py").write_text(LOADER)
    proc = subprocess.run([sys.executable, str(tmp_path / "loader.py"), str(tmp_path / "spec.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(spec["out"])

    pixels = normalize_images(images.permute(0, 3, 1, 2).float() / 255.0)  # the benchmark's pixels
    for label, wanted in (("lilora", {"lilora-hf": "digits", "lilora-peft-animals": "animals",
                                      "lilora-peft-digits": "digits"}),
                          ("rank1_pool", {"rank1_pool-hf": None, "rank1_pool-peft": None})):
        run = read_run(tiny_run / label)
        source = source_model(run)
        base_out = clip_out(source.model, _word_inputs(source, texts, pixels))
        model = load_method(source.model, run.method, method_dir(run.run_dir))
        for name, task in wanted.items():
            with run.method.evaluating(model, task):
                ours = clip_out(model, _word_inputs(source, texts, pixels))
            assert (ours - base_out).abs().max() > 1e-3
            torch.testing.assert_close(theirs[name], ours, atol=ATOL, rtol=0)


def _word_inputs(source, texts, pixels) -> dict[str, torch.Tensor]:
    from continual_lora.models.small_clip import PretrainConfig, build_tokenizer

    tokenizer = build_tokenizer(PretrainConfig(context_length=source.model.config.text_config.max_position_embeddings))
    ids, mask = tokenizer(texts)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def test_cli_export_errors_are_one_line_with_exit_2(tiny_run, tmp_path, capsys) -> None:
    import shutil

    from continual_lora.cli import main

    unfinished = tmp_path / "unfinished"  # what a run stopped after its first task leaves behind
    shutil.copytree(tiny_run / "lilora", unfinished)
    results = json.loads((unfinished / "results.json").read_text())
    (unfinished / "results.json").write_text(json.dumps({**results, "finished": False, "matrix": results["matrix"][:1]}))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        ([str(unfinished), "--format", "hf", "--task", "digits"], "unfinished run (1 of 2 tasks trained)"),
        ([str(tiny_run / "lilora"), "--format", "hf", "--task", "nope"], "unknown task 'nope'"),
        ([str(tiny_run / "lilora"), "--format", "hf"], "needs a task id"),
        ([str(tiny_run / "rank1_pool"), "--format", "peft", "--task", "digits"], "needs no task id"),
        ([str(tiny_run), "--format", "peft"], "not a run directory"),
    ]
    for args, message in cases:
        assert main(["export", *args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
        assert not (tmp_path / "out").exists()
    assert main(["export", str(tiny_run / "rank1_pool"), "--format", "hf", "--out", str(tmp_path / "full")]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(tiny_run / "rank1_pool"), "--format", "hf", "--out", str(tmp_path / "full"),
                 "--overwrite"]) == 0
    assert (tmp_path / "full" / "model.safetensors").exists() and not (tmp_path / "full" / "x").exists()


def test_runs_written_before_mtil_mini_v2_read_back_as_v1(tiny_run, tmp_path) -> None:
    """results.json without ``benchmark.version`` (written before v2) is a v1 run, whose domains v2 lacks."""
    import json
    import shutil

    from continual_lora.app.export import read_run

    old = tmp_path / "old" / "lilora"
    shutil.copytree(tiny_run / "lilora", old)
    results = json.loads((old / "results.json").read_text())
    results["config"]["benchmark"].pop("version")
    results["config"]["benchmark"]["domains"] = ["digits", "textile"]
    (old / "results.json").write_text(json.dumps(results))
    run = read_run(old)
    assert run.config.benchmark.version == 1 and run.config.benchmark.domains == ["digits", "textile"]
    assert read_run(tiny_run / "lilora").config.benchmark.version == 2  # a recorded version is kept
