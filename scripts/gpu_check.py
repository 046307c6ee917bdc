"""The GPU check of issue 15, prepared to run in one call on a CUDA machine (about 5 minutes on an H200).

    PYTHONPATH=src:tests python3 scripts/gpu_check.py --out "$OUT"            # from the repository root
    PYTHONPATH=src:tests python3 scripts/gpu_check.py --out "$OUT" --compile  # + torch.compile(reduce-overhead) rows

1. Exactness of what only runs on CUDA: the Triton routing kernel against the ATen path (random,
   tied and NaN probabilities; must be equal), the pool's and LiLoRA's branches on CUDA against the
   code before issue 15 (tests/reference_impls.py; fp32 with TF32 off).
2. CUDA kernels of one forward + backward of the ViT-B/16 CLIP, counted by torch.profiler, next to
   ``--count-ops``' dispatcher count: does the CPU proxy predict the GPU launches?
3. The speed bench (``continual-lora bench``, interleaved ratios, medians): lora / lilora / rank1_pool
   on the ViT-B/16 CLIP, batch 32, 20 steps, fp32 and bf16; LiLoRA and the pool on one LLaVA-7B MLP
   block (bf16, 8 x 640 tokens). With ``--compile``: the same ViT-B/16 rows with both sides compiled.

Writes ``gpu_check.json`` (everything) and ``gpu_check.md`` (the tables for docs/results.md) to --out
and prints the tables. Nothing here asserts a speed: the ratios are reported as measured.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch


DEVICE = "cuda"
SIZES = {"clip": "vitb16", "mlp": "llava7b-mlp"}


def section(title: str) -> None:
    print(f"\n=== {title} ({time.strftime('%H:%M:%S')})", flush=True)


def exactness() -> dict[str, Any]:
    import reference_impls as ref

    from continual_lora.adapters import add_task, branches
    from continual_lora.methods import LiLoRA, LiLoRAConfig, Rank1PoolConfig
    from continual_lora.methods import rank1_kernels as k

    torch.backends.cuda.matmul.allow_tf32 = False
    out: dict[str, Any] = {"triton_available": k.triton_available()}
    g = torch.Generator().manual_seed(0)
    bad = []
    for trial in range(300):  # routing: Triton against ATen, on the GPU
        r = [2, 4, 6, 8, 12, 16, 24, 33, 64][trial % 9]
        top_r, n = 1 + trial % r, [1, 2, 7, 32, 64, 200][trial % 6]
        p = torch.randn(n, r, generator=g).softmax(-1) if trial % 3 == 0 else torch.randint(0, 3, (n, r), generator=g).float()
        if trial % 3 == 2:
            p[torch.rand(n, r, generator=g) < 0.2] = float("nan")
        p = p.to(DEVICE).to(torch.bfloat16 if trial % 4 == 1 else torch.float32)
        counts = torch.randint(0, 5, (r,), generator=g).to(DEVICE)
        c_aten, c_op = counts.clone(), counts.clone()
        m_aten, v_aten = k.route_aten(p, c_aten, top_r, 0.25, True, torch.float32)
        m_op, v_op = k.rank1_route(p, c_op, top_r, 0.25, True, torch.float32)  # Triton when available
        v_half = k.rank1_votes(p, top_r)
        c_half = counts.clone()
        m_half = k.rank1_mask(v_half, c_half, top_r, 0.25, True, torch.float32)
        if not (torch.equal(m_aten, m_op) and torch.equal(v_aten, v_op) and torch.equal(c_aten, c_op)
                and torch.equal(v_half, v_aten) and torch.equal(m_half, m_aten) and torch.equal(c_half, c_aten)):
            bad.append(trial)
    out["routing_mismatches"] = bad

    diffs: dict[str, float] = {}
    for mode in ("vote", "learned"):  # the pool's branch against the old branch
        torch.manual_seed(1)
        new = Rank1PoolConfig(rank=12, top_r=8, dropout=0.0, router_mode=mode).build_branch(768, 768).to(DEVICE).train()
        with torch.no_grad():
            new.lora_B.normal_(std=0.02)
        old = copy.deepcopy(new)
        new.seq_dim = old.seq_dim = 0  # (197, 32, 768) sequence-first, as in the issue
        x = torch.randn(197, 32, 768, device=DEVICE)
        xn, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        yn, yo = new(xn), ref.rank1_forward(old, xo, old.counts.clone())
        w = torch.randn_like(yn)
        (yn * w).sum().backward()
        (yo * w).sum().backward()
        for what, a, b in (("output", yn, yo), ("grad_A", new.lora_A.grad, old.lora_A.grad),
                           ("grad_B", new.lora_B.grad, old.lora_B.grad), ("grad_x", xn.grad, xo.grad)):
            diffs[f"rank1_{mode}_{what}"] = (a - b).abs().max().item()
            diffs[f"rank1_{mode}_{what}_relative"] = diffs[f"rank1_{mode}_{what}"] / b.abs().max().item()
    from continual_lora.app.speed import clip_config
    from transformers import CLIPModel

    torch.manual_seed(2)
    model = CLIPModel(clip_config("tiny")).to(DEVICE)  # LiLoRA: batched B_t against the per-weight formula
    LiLoRA(LiLoRAConfig(rank=16, inner_rank=8)).attach(model)
    add_task(model, "t0")
    with torch.no_grad():
        for b in branches(model).values():
            b.B0.normal_(), b.P["t0"].normal_()
    worst = 0.0
    for b in branches(model).values():
        worst = max(worst, (b.ups.get(b) - ref.lilora_up(b)).abs().max().item())
    diffs["lilora_up_batched_vs_per_weight"] = worst
    out["max_abs_diff"] = diffs
    return out


def kernels_per_step() -> dict[str, Any]:
    """CUDA kernels launched by one forward + backward (profiler) and the dispatcher count (--count-ops)."""
    from torch.profiler import ProfilerActivity, profile

    from continual_lora.app.opcount import count_ops
    from continual_lora.app.speed import _sides, build_workload

    rows: dict[str, Any] = {}
    for method in ("rank1_pool", "lilora"):
        work = build_workload(SIZES["clip"], 32, DEVICE)
        sides = _sides(method, work, None, peft_reference=False)
        launches = {}
        for name, model, terms in ((sides.names[0], sides.subject, sides.loss_terms()), (sides.names[1], sides.reference, dict)):
            for _ in range(2):  # warm-up (Triton compiles its kernel on the first call)
                (work.loss(model) + sum(terms().values())).backward()
            cuda = DEVICE == "cuda"
            with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                (work.loss(model) + sum(terms().values())).backward()
                if cuda:
                    torch.cuda.synchronize()
            kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
            launches[name] = sum(1 for e in prof.events() if e.device_type == kind)
        del sides, work
        gc.collect()
        counted = count_ops(method, SIZES["clip"], batch_size=2, device=DEVICE)
        rows[method] = {"cuda_kernels": launches, "cuda_kernel_ratio": launches[method] / launches["lora"],
                        "count_ops": counted["kernel_ops"], "count_ops_ratio": counted["kernel_ops_ratio"]}
        print(method, json.dumps(rows[method]), flush=True)
    return rows


def bench(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from continual_lora.app.speed import run_speed_bench

    results = []
    for spec in runs:
        try:
            t = time.time()
            result = run_speed_bench(device=DEVICE, progress=False, **spec)
            result.pop("train_step_samples_s"), result.pop("inference_samples_s")
            print(f"{spec} -> train {result['train_step_ratio']:.3f} merged {result['merged_inference_ratio']:.3f} "
                  f"({time.time() - t:.0f} s)", flush=True)
        except Exception as err:  # a failed row is reported, the others still run
            traceback.print_exc()
            result = {**spec, "error": repr(err)}
        results.append(result)
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| method | size | precision | compile | batch | train step (method / reference) | train_step_ratio | "
             "merged_inference_ratio |", "|---|---|---|---|---:|---|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | {r.get('size')} | {r.get('precision')} | {r.get('compile')} | | error: "
                         f"{r['error'][:80]} | | |")
            continue
        (a, sa), (b, sb) = r["train_step_s"].items()
        lines.append(f"| {r['method']} (r {r['rank']}) | {r['size']} | {r['precision']} | {r['compile'] or '-'} | "
                     f"{r['batch_size']} | {sa:.4f} s {a} / {sb:.4f} s {b} | {r['train_step_ratio']:.3f} | "
                     f"{r['merged_inference_ratio']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--compile", action="store_true", help="also the ViT-B/16 rows under torch.compile(reduce-overhead)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, 1 step: checks this script only")
    args = parser.parse_args()
    global DEVICE
    if args.dry_run:
        DEVICE, args.steps = "cpu", 1
        SIZES.update(clip="tiny", mlp="tiny-mlp")
    else:
        assert torch.cuda.is_available(), "needs a CUDA device (or --dry-run)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
                              "torch": torch.__version__, "triton": triton_version, "python": sys.version.split()[0]}
    print(json.dumps(report), flush=True)
    section("exactness on CUDA")
    report["exactness"] = exactness()
    print(json.dumps(report["exactness"], indent=1), flush=True)
    section("CUDA kernels per step vs --count-ops")
    report["kernels"] = kernels_per_step()
    section("speed bench")
    batch = 2 if args.dry_run else 32
    runs = [dict(method=m, size=SIZES["clip"], batch_size=batch, steps=args.steps, precision=p)
            for p in ("fp32", "bf16") for m in ("lora", "lilora", "rank1_pool")]
    runs += [dict(method=m, size=SIZES["mlp"], batch_size=2 if args.dry_run else 8, steps=args.steps,
                  precision="bf16") for m in ("lilora", "rank1_pool")]
    if args.compile:
        runs += [dict(method=m, size=SIZES["clip"], batch_size=batch, steps=args.steps, precision="fp32",
                      compile="reduce-overhead" if DEVICE == "cuda" else "default", warmup=3)
                 for m in ("lilora", "rank1_pool")]
    report["bench"] = bench(runs)
    md = (f"GPU: {report['device']}, torch {report['torch']}, Triton {report['triton']}\n\n{table(report['bench'])}\n\n"
          f"kernels per forward + backward (profiler) vs --count-ops: {json.dumps(report['kernels'])}\n"
          f"exactness: {json.dumps(report['exactness'])}\n")
    print("\n" + md, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
