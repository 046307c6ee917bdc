"""Data-parallel training through the real launcher: 2 CPU processes (gloo) vs one process.

Both runs use the same config and the same GLOBAL batch (train.batch_size = 8: one process takes
8 rows, each of the two ranks 4), with dropout 0 so that no random mask differs between them.

Tolerance. The two runs compute the same function in a different order: one (8, ...) matmul vs two
(4, ...) ones, CLIP's contrastive logits over all-gathered features, gradients summed by DDP's
all-reduce (a + b) / 2 instead of inside one matmul. These are float32 rounding differences
(~1e-7 relative per step), so training losses must agree to 1e-4 relative and each accuracy cell
within one test image (100 / n_test points); in practice the matrices come out identical.
The Rank-1 pool's vote counts are integers summed by an all-reduce, so its merged expert sets S
must be identical on both ranks and equal to the single process's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from continual_lora.adapters.io import WEIGHTS_NAME
from continual_lora.methods.rank1_pool import load_records

CONFIG = """
name: dist
benchmark: {domains: [digits, textile], shots: 3, max_test_per_task: 40}
pretrain: {steps: 8, batch_size: 16, warmup: 2, vision_layers: 1, text_layers: 1, vision_width: 32, text_width: 32,
           vision_heads: 2, text_heads: 2, vision_mlp: 64, text_mlp: 64, projection_dim: 16}
train: {iterations: 4, batch_size: 8, grad_accum: 2, lr: 5.0e-3, progress: false}
methods:
  - {name: rank1_pool, rank: 4, top_r: 2, alpha: 4.0, dropout: 0.0}
  - {name: lilora, rank: 2, inner_rank: 1, alpha: 4.0, dropout: 0.0, lambda_stab: 0.1}
"""
METHODS = ("rank1_pool", "lilora")
N_TEST = 40  # max_test_per_task: both domains have at least 40 test images


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    cfg = root / "dist.yaml"
    cfg.write_text(CONFIG)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "CONTINUAL_LORA_CACHE": os.environ.get("CONTINUAL_LORA_TEST_CACHE", str(root / "cache"))}
    single = [sys.executable, "-m", "continual_lora.cli", "run", str(cfg), f"output_dir={root}/single"]
    proc = subprocess.run(single, capture_output=True, text=True, env=env, timeout=300)  # also fills the caches
    assert proc.returncode == 0, proc.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "continual_lora.cli", "run", str(cfg), f"output_dir={root}/ddp", "train.dump_replicas=true"]
    proc = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root / "ddp.stdout").write_text(proc.stdout)
    return root


def results(root: Path, mode: str, method: str) -> dict:
    return json.loads((root / mode / "dist" / method / "results.json").read_text())


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_reproduce_the_single_process_run(runs, method) -> None:
    one, two = results(runs, "single", method), results(runs, "ddp", method)
    assert two["runtime"]["world_size"] == 2 and two["runtime"]["backend"] == "gloo"
    assert one["runtime"]["world_size"] == 1
    assert two["zero_shot"] == one["zero_shot"]  # sharded evaluation, counts all-reduced: exact
    for row_one, row_two in zip(one["matrix"], two["matrix"], strict=True):
        for a, b in zip(row_one, row_two, strict=True):
            assert abs(a - b) <= 100.0 / N_TEST + 1e-9, (one["matrix"], two["matrix"])
    assert two["train_losses"] == pytest.approx(one["train_losses"], rel=1e-4)


def test_rank1_pool_merged_experts_are_the_same_on_both_ranks(runs) -> None:
    run = runs / "ddp" / "dist" / "rank1_pool"
    rank0 = load_records(run / "checkpoint" / "method")  # written by rank 0
    rank1 = load_records(run / "rank1" / "method")  # dumped by rank 1 (train.dump_replicas)
    single = load_records(runs / "single" / "dist" / "rank1_pool" / "checkpoint" / "method")
    assert rank0.tasks == rank1.tasks == single.tasks == ["digits", "textile"]
    merged_sets = [k for k in rank0.tensors if k.endswith(".S")]
    assert merged_sets
    for key, value in rank0.tensors.items():
        assert torch.equal(value, rank1.tensors[key]), key  # replicas are bit-identical
    for key in merged_sets:
        assert torch.equal(rank0.tensors[key], single.tensors[key]), key
    for key in (k for k in rank0.tensors if k.endswith((".A", ".B"))):
        torch.testing.assert_close(rank0.tensors[key], single.tensors[key], rtol=1e-4, atol=1e-5)


def test_lilora_factors_and_snapshots_are_the_same_on_both_ranks(runs) -> None:
    run = runs / "ddp" / "dist" / "lilora"
    rank0 = load_file(str(run / "checkpoint" / "method" / WEIGHTS_NAME))
    rank1 = load_file(str(run / "rank1" / "method" / WEIGHTS_NAME))
    assert rank0.keys() == rank1.keys() and any(k.endswith("A_prev") for k in rank0)
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key


def test_only_rank_zero_reports_and_writes(runs) -> None:
    out = (runs / "ddp.stdout").read_text()
    assert out.count("| rank1_pool |") == 1 and out.count("| lilora |") == 1
    for method in METHODS:
        names = {p.name for p in (runs / "ddp" / "dist" / method).iterdir()}
        assert {"results.json", "checkpoint", "rank1", "accuracy_matrix.csv"} <= names
        assert not any(n.startswith(".") for n in names)  # no half-written checkpoint left behind


@pytest.fixture
def one_thread():
    """In-process runs on one thread, like the launched ranks (OMP_NUM_THREADS=1): on a shared
    2-core machine, OpenMP threads that wait for each other make these tiny runs 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_rank_resumes_from_the_same_task_boundary(tmp_path, one_thread) -> None:
    """Two ranks stop after task 1 (checkpoint written by rank 0), then resume from it with fresh
    models and methods: the matrix equals an uninterrupted single-process run of the same stream."""
    from distributed_worker import trainer

    full = trainer(None, "rank1_pool").run()
    worker = str(Path(__file__).resolve().parent / "distributed_worker.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
              str(tmp_path), "rank1_pool"]
    proc = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert len(resumed["matrix"]) == 3
    for row_one, row_two in zip(full.matrix, resumed["matrix"], strict=True):
        assert all(abs(a - b) <= 100.0 / 30 + 1e-9 for a, b in zip(row_one, row_two, strict=True))  # 30 test images
    assert resumed["losses"] == pytest.approx(full.train_losses, rel=1e-4)


def test_precision_and_gradient_checkpointing_options_run_in_one_process(one_thread) -> None:
    """bf16 / fp16 autocast (fp16 with a loss scaler) train; gradient checkpointing recomputes the
    same function, and although it re-runs the Rank-1 pool's routing in backward (counting each
    vote twice), the ranking and so the merged sets S are unchanged."""
    from distributed_worker import TASKS, TRAIN, trainer

    from continual_lora.methods.rank1_pool import export_records

    runs = {}
    for precision, checkpointing in (("fp32", False), ("fp32", True), ("bf16", False), ("fp16", False)):
        train = dataclasses.replace(TRAIN, iterations=3, precision=precision, gradient_checkpointing=checkpointing)
        run = trainer(None, "rank1_pool", train=train)
        state = run.run()
        assert len(state.matrix) == len(TASKS) and all(math.isfinite(v) for v in state.train_losses)
        runs[precision, checkpointing] = (state, export_records(run.model))
    (plain, plain_records), (recomputed, recomputed_records) = runs["fp32", False], runs["fp32", True]
    assert recomputed.matrix == plain.matrix
    assert recomputed.train_losses == pytest.approx(plain.train_losses, rel=1e-5)
    for key, value in plain_records.tensors.items():
        if key.endswith(".S"):
            assert torch.equal(value, recomputed_records.tensors[key]), key
        if key.endswith(".counts"):  # the recomputed forward inside backward does not vote again
            assert torch.equal(value, recomputed_records.tensors[key]), key
    with pytest.raises(ValueError, match="train.precision"):
        dataclasses.replace(TRAIN, precision="fp8")
