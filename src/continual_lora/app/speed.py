"""Speed benchmark: adapter training-step and merged-inference cost, and the step's operator count.

Two ratios, each measured within one run, with both sides interleaved step by step (after the
warm-up the order alternates every round) and summarised by their medians::

    method "lora":          train_step_ratio       = our LoRA step / peft LoRA step
                            merged_inference_ratio = our model after merge(model, task) / base model
    method "lilora", ...:   train_step_ratio       = method step / our plain LoRA step
                            merged_inference_ratio = method.prepare_inference(model, task) / base model

A training step is the workload's loss (plus the method's loss terms), backward and an AdamW step
over the trainable adapter parameters. Both sides of a ratio adapt the same weights with the same
rank, alpha and dropout: rank 8 for "lora", the method's release rank otherwise. Inference is one
forward pass in eval mode under ``torch.no_grad()``. ``precision="bf16"`` runs both sides' forward
passes under bf16 autocast (what ``train.precision=bf16`` does); ``compile`` wraps both sides'
training models in ``torch.compile(mode=compile)``.

Sizes (random weights: timing does not depend on them):

* ``"vitb16"``: CLIP ViT-B/16 (vision 12 x 768, text 12 x 512, 224 px, 77 tokens), contrastive loss,
  adapters on q/k/v/out_proj/fc1/fc2 of both towers (144 weights); ``"tiny"`` runs in seconds.
* ``"llava7b-mlp"``: one LLaMA-7B MLP block as LLaVA-1.5-7B has 32 of (SwiGLU, 4096 -> 11008 ->
  4096, gate/up/down adapted, LiLoRA's release targets), ``batch_size`` sequences of 640 tokens,
  loss ``mean(out^2)``; the base weights are held in bf16 under ``precision="bf16"``, as LLaVA is
  loaded. ``"tiny-mlp"`` is the same at 32 -> 88 -> 32, 16 tokens.

``opcount.count_ops`` counts the kernel-launching operators of one forward + backward step of the
same two sides instead: a deterministic proxy for the per-step host overhead that a GPU step at
these sizes is bound by.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel

from ..adapters import LoRAConfig, add_task, inject_adapters, merge
from ..methods import METHODS, build_method
from ..models.clip import CLIP_PRESETS

TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # both towers of a CLIP
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TASK = "task0"
LORA_RANK, LORA_ALPHA = 8, 16.0  # the plain-LoRA / peft comparison
PRECISIONS = ("fp32", "bf16")

# CLIP sizes: (text tower, vision tower, projection dim, tokens per caption)
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
# MLP-block sizes: hidden -> intermediate -> hidden, tokens per sequence
MLP_SIZES: dict[str, dict[str, int]] = {
    "llava7b-mlp": {"hidden": 4096, "intermediate": 11008, "tokens": 640},  # LLaMA-7B / LLaVA-1.5-7B
    "tiny-mlp": {"hidden": 32, "intermediate": 88, "tokens": 16},
}
ALL_SIZES = (*SIZES, *MLP_SIZES)


def clip_config(size: str) -> CLIPConfig:
    if size not in SIZES:
        raise ValueError(f"unknown CLIP size {size!r}; known: {sorted(SIZES)}")
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


class LlamaMLP(nn.Module):
    """The SwiGLU MLP of a LLaMA block: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, hidden)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Workload:
    """A base model, what to adapt, and how one step's loss / one inference pass runs on a model."""

    base: nn.Module
    targets: tuple[str, ...]
    loss: Callable[[nn.Module], torch.Tensor]
    infer: Callable[[nn.Module], Any]
    spec: dict[str, Any]
    batch: Any  # what a method's loss_terms receive


def build_workload(size: str, batch_size: int, device: str, precision: str = "fp32") -> Workload:
    torch.manual_seed(0)
    if size in MLP_SIZES:
        spec = MLP_SIZES[size]
        base = LlamaMLP(spec["hidden"], spec["intermediate"]).to(device).eval()
        if precision == "bf16":
            base = base.to(torch.bfloat16)  # LLaVA loads its language model in bf16
        x = torch.randn(batch_size, spec["tokens"], spec["hidden"], generator=torch.Generator().manual_seed(0))
        x = x.to(device=device, dtype=base.down_proj.weight.dtype)
        return Workload(base, MLP_TARGETS, lambda m: m(x).float().pow(2).mean(), lambda m: m(x), dict(spec), x)
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {list(ALL_SIZES)}")
    config = clip_config(size)
    spec = SIZES[size]
    batch = random_batch(config, spec["tokens"], batch_size, device)
    base = CLIPModel(config).to(device).eval()
    return Workload(base, TARGETS, lambda m: m(**batch, return_loss=True).loss, lambda m: m(**batch),
                    {"text": spec["text"], "vision": spec["vision"], "tokens": spec["tokens"]}, batch)


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


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


def _train_step(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], params: list[nn.Parameter],
                amp: Callable[[], contextlib.AbstractContextManager],
                loss_terms: Callable[[], dict[str, torch.Tensor]] = dict,
                after_step: Callable[[], None] = lambda: None) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with amp():
            loss = loss_fn(model)
            loss = loss + sum(loss_terms().values())
        loss.backward()
        optimizer.step()
        after_step()

    return step


def _forward(model: nn.Module, infer: Callable[[nn.Module], Any],
             amp: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad(), amp():
            infer(model)

    return run


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _our_lora(base: nn.Module, rank: int, alpha: float, dropout: float, targets: tuple[str, ...] = TARGETS) -> nn.Module:
    model = copy.deepcopy(base)
    inject_adapters(model, LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets))
    add_task(model, TASK)
    return model


@dataclass
class _Sides:
    """The two models a ratio compares (``names``: subject, reference) and the method of the subject."""

    names: tuple[str, str]
    subject: nn.Module
    reference: nn.Module
    algo: Any  # the Method, or None for "lora"
    batch: Any
    rank: int
    alpha: float
    dropout: float

    def loss_terms(self) -> Callable[[], dict[str, torch.Tensor]]:
        return dict if self.algo is None else (lambda: self.algo.loss_terms(self.subject, self.batch))

    def after_step(self) -> Callable[[], None]:
        return (lambda: None) if self.algo is None else (lambda: self.algo.after_step(self.subject))

    def subject_params(self) -> list[nn.Parameter]:
        return _trainable(self.subject) if self.algo is None else self.algo.trainable_parameters(self.subject)


def _check(method: str, precision: str) -> None:
    if method != "lora" and method not in METHODS:
        raise ValueError(
            f"method {method!r} is not registered in continual_lora.methods.METHODS "
            f"(registered: {sorted(METHODS)}); the speed bench knows 'lora' and registered methods"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _sides(method: str, work: Workload, rank: int | None, peft_reference: bool = True) -> _Sides:
    """The method (or our LoRA) on a copy of the base, and its reference (peft's LoRA, or our LoRA)."""
    base, targets = work.base, work.targets
    if method == "lora":
        r, dropout = rank or LORA_RANK, 0.0
        alpha = LORA_ALPHA * r / LORA_RANK  # scale alpha / r stays 2 for any rank
        subject = _our_lora(base, r, alpha, dropout, targets).train()
        if peft_reference:
            from peft import LoraConfig, get_peft_model

            reference = get_peft_model(copy.deepcopy(base), LoraConfig(
                r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))).train()
            return _Sides(("ours", "peft"), subject, reference, None, work.batch, r, alpha, dropout)
        return _Sides(("ours", "lora"), subject, _our_lora(base, r, alpha, dropout, targets).train(), None,
                      work.batch, r, alpha, dropout)
    overrides: dict[str, Any] = {"targets": list(targets)}
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
    reference = _our_lora(base, r, alpha, dropout, targets).train()
    return _Sides((method, "lora"), subject, reference, algo, work.batch, r, alpha, dropout)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or platform.machine()


def run_speed_bench(
    method: str = "lora",
    size: str = "vitb16",
    batch_size: int = 8,
    steps: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    progress: bool = True,
    rank: int | None = None,  # None: 8 for "lora", the method's release rank otherwise
    precision: str = "fp32",  # "fp32" or "bf16" (autocast on both sides)
    compile: str | None = None,  # a torch.compile mode for both sides' training models, or None (eager)
) -> dict[str, Any]:
    """Measure ``train_step_ratio`` and ``merged_inference_ratio`` (see the module docstring)."""
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0, batch_size >= 1 (got {steps}, {warmup}, {batch_size})")
    _check(method, precision)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    say(f"building {size} on {device} ...")
    work = build_workload(size, batch_size, device, precision)
    sides = _sides(method, work, rank)
    names = sides.names

    def amp() -> contextlib.AbstractContextManager:
        return autocast(device, precision)

    def trained(model: nn.Module) -> nn.Module:
        return torch.compile(model, mode=compile) if compile else model

    trainable = {names[0]: sum(p.numel() for p in _trainable(sides.subject)),
                 names[1]: sum(p.numel() for p in _trainable(sides.reference))}
    say(f"training steps: {names[0]} vs {names[1]} (rank {sides.rank}, alpha {sides.alpha:g}, dropout "
        f"{sides.dropout:g}), batch {batch_size}, {precision}{f', compile {compile}' if compile else ''}, "
        f"{warmup} warm-up + {steps} timed each")
    subject_step = _train_step(trained(sides.subject), work.loss, sides.subject_params(), amp, sides.loss_terms(),
                               sides.after_step())
    reference_step = _train_step(trained(sides.reference), work.loss, _trainable(sides.reference), amp)
    train_times, train_peaks = interleaved({names[0]: subject_step, names[1]: reference_step}, steps, warmup,
                                           device, say)
    del reference_step, sides.reference
    gc.collect()

    subject = sides.subject.eval()
    if method == "lora":
        merge(subject, TASK)
        served = subject
    else:
        sides.algo.end_task(subject, TASK, 0)  # finish the task first (rank1_pool commits its experts here)
        served = sides.algo.prepare_inference(subject, TASK)
    served.eval()
    say("inference: merged vs base")
    infer_times, infer_peaks = interleaved({"merged": _forward(served, work.infer, amp),
                                            "base": _forward(work.base, work.infer, amp)}, steps, warmup, device, say)

    train_med = {n: statistics.median(t) for n, t in train_times.items()}
    infer_med = {n: statistics.median(t) for n, t in infer_times.items()}
    return {
        "method": method,
        "reference": "peft_lora" if method == "lora" else "lora",
        "size": size,
        "model": {**work.spec, "base_params": sum(p.numel() for p in work.base.parameters())},
        "targets": list(work.targets),
        "rank": sides.rank,
        "alpha": sides.alpha,
        "dropout": sides.dropout,
        "trainable_params": trainable,
        "batch_size": batch_size,
        "precision": precision,
        "compile": compile,
        "steps": steps,
        "warmup": warmup,
        "device": device,
        "device_name": _device_name(device),
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
        f"{result['threads']} threads, batch {result['batch_size']}, {result['precision']}"
        f"{', compile ' + result['compile'] if result['compile'] else ''}, "
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
