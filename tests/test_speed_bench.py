"""The speed benchmark runs end to end on the tiny size (no timing assertions: CI machines vary)."""

from __future__ import annotations

import json
import math

import pytest

from continual_lora.app.speed import format_speed_report, run_speed_bench


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # transformers, via peft
def test_tiny_lora_speed_bench_runs():
    result = run_speed_bench("lora", size="tiny", batch_size=2, steps=2, warmup=1, progress=False)
    for key in ("train_step_ratio", "merged_inference_ratio"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    for key in ("train_step_s", "inference_s", "device", "torch", "threads", "size", "steps", "batch_size",
                "rank", "targets", "trainable_params", "peak_memory_bytes"):
        assert key in result, key
    assert set(result["train_step_s"]) == {"ours", "peft"} and set(result["inference_s"]) == {"merged", "base"}
    assert all(len(t) == 2 for t in result["train_step_samples_s"].values())
    assert result["trainable_params"]["ours"] == result["trainable_params"]["peft"] > 0  # same adapters
    assert json.loads(json.dumps(result)) == result  # the CLI prints it as its last line
    table = format_speed_report(result)
    assert "train_step_ratio" in table and "merged_inference_ratio" in table


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="not registered"):
        run_speed_bench("no_such_method", size="tiny", progress=False)


@pytest.mark.parametrize("method", ["lilora", "rank1_pool"])
def test_mlp_block_bench_in_bf16_runs(method):
    """The LLaVA-7B MLP block case at toy size, under bf16 autocast (the GPU check runs llava7b-mlp)."""
    result = run_speed_bench(method, size="tiny-mlp", batch_size=2, steps=1, warmup=0, progress=False,
                             precision="bf16", rank=8)
    assert result["precision"] == "bf16" and result["targets"] == ["gate_proj", "up_proj", "down_proj"]
    assert math.isfinite(result["train_step_ratio"]) and result["trainable_params"]["lora"] == 8 * (3 * 32 + 3 * 88)
    with pytest.raises(ValueError, match="precision"):
        run_speed_bench(method, size="tiny-mlp", precision="fp16", progress=False)
