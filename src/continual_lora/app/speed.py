"""Speed benchmark: adapter training-step and merged-inference cost on a random-init CLIP.

Two ratios, each measured within one run, with both sides interleaved step by step (after the
warm-up the order alternates every round) and summarised by their medians::

    method "lora":          train_step_ratio       = our LoRA step / peft LoRA step
                            merged_inference_ratio = our model after merge(model, task) / base model
    method "lilora", ...:   train_step_ratio       = method step / our plain LoRA step
                            merged_inference_ratio = method.prepare_inference(model, task) / base model

A training step is CLIP's contrastive loss (``model(..., return_loss=True).loss``, plus the
method's loss terms), backward and an AdamW step over the trainable adapter parameters. Both
sides of a ratio adapt the same weights (``TARGETS`` in both towers) with the same rank, alpha
and dropout: rank 8 for "lora", the method's release rank otherwise. Inference is one forward
pass in eval mode under ``torch.no_grad()``.

Sizes: "vitb16" is CLIP ViT-B/16 (vision 12 x 768, text 12 x 512, 224 px, 77 tokens, random
weights: timing does not depend on them); "tiny" runs in seconds and is what the tests use.
"""

from __future__ import annotations

import copy
import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel

from ..adapters import LoRAConfig, add_task, inject_adapters, merge
from ..methods import METHODS, build_method
from ..models.clip import CLIP_PRESETS

TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # both towers
TASK = "task0"
LORA_RANK, LORA_ALPHA = 8, 16.0  # the plain-LoRA / peft comparison

# (text tower, vision tower, projection dim, tokens per caption)
SIZES: dict[str, dict[str, Any]] = {
    "vitb16": {**CLIP_PRESETS["vit-b-16"], "tokens": 77},  # OpenAI CLIP ViT-B/16
    "tiny": {
        "text": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=16, vocab_size=1000),
        "vision": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       image_size=32, patch_size=8),
        "projection_dim": 32,
        "tokens": 16,
    },
}


def clip_config(size: str) -> CLIPConfig:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {sorted(SIZES)}")
    spec = SIZES[size]
    vocab = spec["text"]["vocab_size"]
    text = dict(spec["text"], bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0)  # OpenAI's layout
    return CLIPConfig(text_config=text, vision_config=spec["vision"], projection_dim=spec["projection_dim"])


def random_batch(config: CLIPConfig, tokens: int, batch_size: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text, vision = config.text_config, config.vision_config
    ids = torch.randint(1, text.vocab_size - 2, (batch_size, tokens), generator=g)
    ids[:, 0], ids[:, -1] = text.bos_token_id, text.eos_token_id
    pixels = torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=g)
    return {"input_ids": ids.to(device), "pixel_values": pixels.to(device)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], None]], steps: int, warmup: int, device: str,
                progress: Callable[[str], None] | None = None) -> tuple[dict[str, list[float]], dict[str, int | None]]:
    """Run every fn ``warmup`` times, then ``steps`` timed rounds, rotating the order each round.

    Returns the seconds of each timed call and, on CUDA, the peak allocated bytes during each
    fn's calls (everything resident counts: all models of the run, not only that fn's).
    """
    names = list(fns)
    cuda = device.startswith("cuda")
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, int | None] = {n: (0 if cuda else None) for n in names}
    for i in range(warmup + steps):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            elapsed = time.perf_counter() - start
            if cuda:
                peaks[name] = max(peaks[name] or 0, torch.cuda.max_memory_allocated())
            if i >= warmup:
                times[name].append(elapsed)
            if progress:
                kind = "warm-up" if i < warmup else f"step {i - warmup + 1}/{steps}"
                progress(f"  {name:<10} {kind:<12} {elapsed:8.3f} s")
    return times, peaks


def _train_step(model: nn.Module, batch: dict[str, torch.Tensor], params: list[nn.Parameter],
                loss_terms: Callable[[], dict[str, torch.Tensor]] = dict,
                after_step: Callable[[], None] = lambda: None) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch, return_loss=True).loss
        loss = loss + sum(loss_terms().values())
        loss.backward()
        optimizer.step()
        after_step()

    return step


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(**batch)

    return run


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _our_lora(base: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
    model = copy.deepcopy(base)
    inject_adapters(model, LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=TARGETS))
    add_task(model, TASK)
    return model


def run_speed_bench(
    method: str = "lora",
    size: str = "vitb16",
    batch_size: int = 8,
    steps: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    progress: bool = True,
    rank: int | None = None,  # None: 8 for "lora", the method's release rank otherwise
) -> dict[str, Any]:
    """Measure ``train_step_ratio`` and ``merged_inference_ratio`` (see the module docstring)."""
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0, batch_size >= 1 (got {steps}, {warmup}, {batch_size})")
    if method != "lora" and method not in METHODS:
        raise ValueError(
            f"method {method!r} is not registered in continual_lora.methods.METHODS "
            f"(registered: {sorted(METHODS)}); the speed bench knows 'lora' and registered methods"
        )
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    config = clip_config(size)
    batch = random_batch(config, SIZES[size]["tokens"], batch_size, device)
    torch.manual_seed(0)
    say(f"building {size} CLIP on {device} ...")
    base = CLIPModel(config).to(device).eval()

    if method == "lora":
        from peft import LoraConfig, get_peft_model

        r, dropout = rank or LORA_RANK, 0.0
        alpha = LORA_ALPHA * r / LORA_RANK  # scale alpha / r stays 2 for any rank
        subject = _our_lora(base, r, alpha, dropout).train()
        reference = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(TARGETS))).train()
        names = ("ours", "peft")
        subject_step = _train_step(subject, batch, _trainable(subject))
    else:
        overrides: dict[str, Any] = {"targets": list(TARGETS)}
        if rank is not None:
            overrides["rank"] = rank
        algo = build_method(method, **overrides)
        r = getattr(algo.config, "rank", LORA_RANK)
        alpha = float(getattr(algo.config, "alpha", 2 * r))
        dropout = float(getattr(algo.config, "dropout", 0.0))
        subject = copy.deepcopy(base)
        algo.attach(subject)
        algo.begin_task(subject, TASK, 0)
        subject.train()
        reference = _our_lora(base, r, alpha, dropout).train()
        names = (method, "lora")
        subject_step = _train_step(subject, batch, algo.trainable_parameters(subject),
                                   loss_terms=lambda: algo.loss_terms(subject, batch),
                                   after_step=lambda: algo.after_step(subject))
    trainable = {names[0]: sum(p.numel() for p in _trainable(subject)),
                 names[1]: sum(p.numel() for p in _trainable(reference))}
    say(f"training steps: {names[0]} vs {names[1]} (rank {r}, alpha {alpha:g}, dropout {dropout:g}), "
        f"batch {batch_size}, {warmup} warm-up + {steps} timed each")
    train_times, train_peaks = interleaved(
        {names[0]: subject_step, names[1]: _train_step(reference, batch, _trainable(reference))},
        steps, warmup, device, say)
    del reference
    gc.collect()

    subject.eval()
    if method == "lora":
        merge(subject, TASK)
        served = subject
    else:
        algo.end_task(subject, TASK, 0)  # finish the task first (rank1_pool commits its experts here)
        served = algo.prepare_inference(subject, TASK)
    served.eval()
    say("inference: merged vs base")
    infer_times, infer_peaks = interleaved(
        {"merged": _forward(served, batch), "base": _forward(base, batch)}, steps, warmup, device, say)

    train_med = {n: statistics.median(t) for n, t in train_times.items()}
    infer_med = {n: statistics.median(t) for n, t in infer_times.items()}
    spec = SIZES[size]
    return {
        "method": method,
        "reference": "peft_lora" if method == "lora" else "lora",
        "size": size,
        "model": {"text": spec["text"], "vision": spec["vision"], "tokens": spec["tokens"],
                  "base_params": sum(p.numel() for p in base.parameters())},
        "targets": list(TARGETS),
        "rank": r,
        "alpha": alpha,
        "dropout": dropout,
        "trainable_params": trainable,
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "train_step_s": train_med,  # median seconds per step, by side
        "train_step_samples_s": train_times,
        "inference_s": infer_med,
        "inference_samples_s": infer_times,
        "train_step_ratio": train_med[names[0]] / train_med[names[1]],
        "merged_inference_ratio": infer_med["merged"] / infer_med["base"],
        "peak_memory_bytes": ({**train_peaks, **{f"inference_{k}": v for k, v in infer_peaks.items()}}
                              if device.startswith("cuda") else None),
    }


def format_speed_report(result: dict[str, Any]) -> str:
    """A readable table of :func:`run_speed_bench`'s result."""
    (subject, ref) = list(result["train_step_s"])
    lines = [
        f"speed bench: {result['method']} vs {result['reference']} on a {result['size']} CLIP "
        f"(rank {result['rank']}, alpha {result['alpha']:g}, {len(result['targets'])} weight kinds per layer)",
        f"device {result['device']} ({result['device_name']}), torch {result['torch']}, "
        f"{result['threads']} threads, batch {result['batch_size']}, "
        f"{result['warmup']} warm-up + {result['steps']} timed steps (interleaved, median)",
        "",
        f"{'measurement':<28}{'median s':>12}{'trainable':>14}",
        f"{'-' * 28}{'-' * 12:>12}{'-' * 14:>14}",
    ]
    for name in (subject, ref):
        lines.append(f"{'train step  ' + name:<28}{result['train_step_s'][name]:>12.4f}"
                     f"{result['trainable_params'][name]:>14,}")
    for name in ("merged", "base"):
        lines.append(f"{'inference   ' + name:<28}{result['inference_s'][name]:>12.4f}")
    lines += [
        "",
        f"{'train_step_ratio':<28}{result['train_step_ratio']:>12.3f}  ({subject} / {ref})",
        f"{'merged_inference_ratio':<28}{result['merged_inference_ratio']:>12.3f}  (merged / base)",
    ]
    peaks = result.get("peak_memory_bytes")
    if peaks:
        lines.append("peak memory: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in peaks.items()))
    return "\n".join(lines)
