"""Operator counts of a training step (app/opcount.py, `continual-lora bench --count-ops`).

A GPU step at ViT-B/16 sizes is bound by kernel launches, so the seed methods must add few
operators per adapted weight over a LoRA of the same rank, alpha and dropout. An operator count
is exact, so this is a test, not a timing: the per-weight cost is the difference between a tiny
CLIP with 3 and with 2 layers per tower (12 more adapted weights), which cancels everything that
does not grow with the number of adapted weights. The numbers are the ones docs/results.md states.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import clip_inputs, make_tiny_clip
from torch import nn

from continual_lora.adapters import LoRAConfig, add_task, branches, inject_adapters
from continual_lora.app.opcount import OpCounter, count_step_ops, launches_kernel
from continual_lora.cli import main
from continual_lora.methods import build_method

# operators per adapted weight over the matching LoRA in one forward + backward (docs/results.md)
PER_WEIGHT = {
    # router addmm, softmax, the fused routing operator (its CPU fallback runs 8 ATen operators)
    ("rank1_pool", "first task"): 3,
    # + the second gradient contribution to B (the AGO loss, batched over layers) being added
    ("rank1_pool", "later task"): 4,
    # B_t of all weights is built per shape group (lilora_up.py): nothing per weight
    ("lilora", "first task"): 0,
    ("lilora", "later task"): 0,
}
# per shape group: stack x4, sigmoid, 1 - gate, bmm, 2 mul, add; backward: B0's gradient (first task only),
# (1 - gate) grad, 2 bmm, 2 (mul, sum) for the gate, neg, add, sigmoid_backward; 1 stack of the gradients
LILORA_PER_GROUP = {"first task": 22, "later task": 21}
ARGS = {"rank1_pool": dict(rank=6, top_r=4, alpha=8.0, dropout=0.1),
        "lilora": dict(rank=4, alpha=8.0, inner_rank=2, dropout=0.1)}


pytestmark = pytest.mark.usefixtures("one_thread")


def step_counts(method: str, layers: int, later_task: bool) -> tuple[OpCounter, OpCounter, int]:
    """(method's counter, LoRA's counter, adapted weights) for one step of a tiny CLIP."""
    base = make_tiny_clip(num_hidden_layers=layers)
    batch = clip_inputs(batch=2, seed=0)
    algo = build_method(method, **ARGS[method])
    model = copy.deepcopy(base)
    algo.attach(model)
    algo.begin_task(model, "t0", 0)
    model.train()
    if later_task:  # a finished first task: the AGO loss is on, LiLoRA's B0 frozen
        with torch.no_grad():
            model(**batch, return_loss=True)
        algo.end_task(model, "t0", 0)
        algo.begin_task(model, "t1", 1)
        model.train()
    method_ops = count_step_ops(lambda: model(**batch, return_loss=True).loss
                                + sum(algo.loss_terms(model, batch).values()))
    lora = copy.deepcopy(base)
    inject_adapters(lora, LoRAConfig(rank=algo.config.rank, alpha=algo.config.alpha, dropout=algo.config.dropout))
    add_task(lora, "t0")
    lora.train()
    lora_ops = count_step_ops(lambda: lora(**batch, return_loss=True).loss)
    return method_ops, lora_ops, len(branches(model))


@pytest.mark.parametrize("method, task", list(PER_WEIGHT))
def test_operators_per_adapted_weight_do_not_grow(method: str, task: str) -> None:
    later = task == "later task"
    small, small_lora, n_small = step_counts(method, 2, later)
    large, large_lora, n_large = step_counts(method, 3, later)
    extra_small, extra_large = small.kernel_ops - small_lora.kernel_ops, large.kernel_ops - large_lora.kernel_ops
    per_weight = (extra_large - extra_small) / (n_large - n_small)
    assert per_weight == PER_WEIGHT[method, task], (
        f"{method} ({task}) now adds {per_weight} operators per adapted weight over LoRA (documented: "
        f"{PER_WEIGHT[method, task]}); extra operators: {dict(large.by_op - large_lora.by_op)}")
    if method == "lilora":  # two shape groups (out = 32: q, k, v, out_proj, fc2; out = 64: fc1) + the terms' add
        assert extra_small == extra_large == 2 * LILORA_PER_GROUP[task] + 1
    else:
        # the fused operator is counted once; its CPU fallback runs 8 ATen operators instead
        own = large.by_op["continual_lora::rank1_route"]
        assert own == n_large and large.aten_ops == large.kernel_ops + 7 * own


def test_counter_skips_views_and_allocations_and_counts_backward() -> None:
    layer = nn.Linear(4, 3)
    x = torch.randn(2, 5, 4)
    counter = count_step_ops(lambda: layer(x).transpose(0, 1).reshape(-1).sum())
    # forward: mm (3-D input: view, mm, _unsafe_view), add (bias) - F.linear may fuse to addmm - sum;
    # backward: expand (view), mm for the weight, sum for the bias
    assert "aten::view" in counter.excluded and "aten::transpose.int" in counter.excluded
    assert not any(name.startswith(("aten::view", "aten::transpose", "aten::empty", "aten::_unsafe_view"))
                   for name in counter.by_op)
    assert counter.kernel_ops == sum(counter.by_op.values()) >= 4
    assert not launches_kernel(torch.ops.aten.t.default) and launches_kernel(torch.ops.aten.mm.default)


def test_bench_count_ops_prints_json_last(capsys) -> None:
    assert main(["bench", "--method", "rank1_pool", "--size", "tiny", "--count-ops"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["kernel_ops"].keys() == {"rank1_pool", "lora"}
    assert result["kernel_ops_ratio"] == result["kernel_ops"]["rank1_pool"] / result["kernel_ops"]["lora"] <= 1.25
    assert result["extra_kernel_ops_per_weight"] == pytest.approx(3, abs=0.2)  # + two operators per step
    assert result["aten_ops"]["rank1_pool"] > result["kernel_ops"]["rank1_pool"]
