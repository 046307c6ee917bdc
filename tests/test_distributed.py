"""Data-parallel training through the real launchers: 2 CPU processes (gloo) under torchrun (DDP)
and under ``accelerate launch`` with DeepSpeed ZeRO-2 and ZeRO-3, each vs one process.

Both runs use the same config and the same GLOBAL batch (train.batch_size = 8: one process takes
8 rows, each of the two ranks 4), with dropout 0 so that no random mask differs between them.

Tolerance. The two runs compute the same function in a different order: one (8, ...) matmul vs two
(4, ...) ones, CLIP's contrastive logits over all-gathered features, gradients summed by DDP's
all-reduce (a + b) / 2 instead of inside one matmul. These are float32 rounding differences
(~1e-7 relative per step), so training losses must agree to 1e-4 relative and each accuracy cell
within one test image (100 / n_test points); in practice the matrices come out identical.
The Rank-1 pool's vote counts are integers summed by an all-reduce, so its merged expert sets S
must be identical on both ranks and equal to the single process's. The same tolerances hold under
ZeRO: it changes where gradients and optimiser state live (and, for ZeRO-3, the frozen weights
while a task trains), not what is computed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
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
benchmark: {version: 1, domains: [digits, textile], shots: 3, max_test_per_task: 40}
pretrain: {steps: 8, batch_size: 16, warmup: 2, vision_layers: 1, text_layers: 1, vision_width: 32, text_width: 32,
           vision_heads: 2, text_heads: 2, vision_mlp: 64, text_mlp: 64, projection_dim: 16, eval_domains: [digits, textile]}
train: {iterations: 4, batch_size: 8, grad_accum: 2, lr: 5.0e-3, progress: false}
logging: {trackers: [tensorboard]}
methods:
  - {name: rank1_pool, rank: 4, top_r: 2, alpha: 4.0, dropout: 0.0}
  - {name: lilora, rank: 2, inner_rank: 1, alpha: 4.0, dropout: 0.0, stability: a_cosine, lambda_stab: 0.1}
  - {name: lwf_vr, rank: 2, alpha: 4.0, dropout: 0.0}
  - {name: replay, rank: 2, alpha: 4.0, dropout: 0.0}
"""
# lwf_vr: a method term that couples the rank's own rows (text->image distillation, gathered);
# replay: a method term on a batch the method draws itself (whole on every rank, not gathered)
METHODS = ("rank1_pool", "lilora", "lwf_vr", "replay")
N_TEST = 40  # max_test_per_task: both domains have at least 40 test images


ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
# ZeRO-3 through an accelerate config that points at a DeepSpeed JSON (the other way to configure
# it). The JSON lowers stage3_param_persistence_threshold from DeepSpeed's default (1e5 elements,
# more than any weight of this tiny model) to 0, so that the base weights are partitioned; the
# trainer still raises it above the largest adapter tensor.
ZERO3_JSON = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}
ZERO3_YAML = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {json}
  zero3_init_flag: false
num_machines: 1
num_processes: 2
machine_rank: 0
rdzv_backend: static
same_network: true
use_cpu: false
"""
LAUNCHERS = {  # mode -> the launcher's arguments before the module to run ({root}: the test's folder)
    "ddp": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # the shipped 8-GPU ZeRO-2 config, with 2 processes instead of 8
    "zero2": ["-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / "zero2_8gpu.yaml"),
              "--num_processes", "2"],
    "zero3": ["-m", "accelerate.commands.launch", "--config_file", "{root}/zero3.yaml"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """<root>/<mode>/dist/<method>: one single-process run, then one launch per entry of LAUNCHERS."""
    root = tmp_path_factory.mktemp("distributed")
    cfg = root / "dist.yaml"
    cfg.write_text(CONFIG)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "CONTINUAL_LORA_CACHE": os.environ.get("CONTINUAL_LORA_TEST_CACHE", str(root / "cache"))}
    single = [sys.executable, "-m", "continual_lora.cli", "run", str(cfg), f"output_dir={root}/single"]
    proc = subprocess.run(single, capture_output=True, text=True, env=env, timeout=300)  # also fills the caches
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root / "zero3.json").write_text(json.dumps(ZERO3_JSON))
    (root / "zero3.yaml").write_text(ZERO3_YAML.format(json=root / "zero3.json"))
    for mode, launcher in LAUNCHERS.items():
        # accelerate's default rendezvous port is fixed (29500): take a free one for each launch
        port = ["--main_process_port", str(free_port())] if "accelerate.commands.launch" in launcher else []
        launch = [sys.executable, *(a.format(root=root) for a in launcher), *port, "-m", "continual_lora.cli", "run",
                  str(cfg), f"output_dir={root}/{mode}", "train.dump_replicas=true"]
        proc = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, f"{mode}:\n{proc.stderr[-3000:]}"
        (root / f"{mode}.stdout").write_text(proc.stdout)
    return root


def results(root: Path, mode: str, method: str) -> dict:
    return json.loads((root / mode / "dist" / method / "results.json").read_text())


@pytest.mark.parametrize("mode", LAUNCHERS)
@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_reproduce_the_single_process_run(runs, method, mode) -> None:
    one, two = results(runs, "single", method), results(runs, mode, method)
    assert two["runtime"]["world_size"] == 2 and two["runtime"]["backend"] == "gloo"
    assert two["runtime"]["engine"] == ("ddp" if mode == "ddp" else "deepspeed")
    assert two["runtime"]["zero_stage"] == {"ddp": None, "zero2": 2, "zero3": 3}[mode]
    assert one["runtime"]["world_size"] == 1 and one["runtime"]["engine"] == "single"
    assert two["zero_shot"] == one["zero_shot"]  # sharded evaluation, counts all-reduced: exact
    for row_one, row_two in zip(one["matrix"], two["matrix"], strict=True):
        for a, b in zip(row_one, row_two, strict=True):
            assert abs(a - b) <= 100.0 / N_TEST + 1e-9, (one["matrix"], two["matrix"])
    assert two["train_losses"] == pytest.approx(one["train_losses"], rel=1e-4)
    # AdamW's step hides a constant gradient scale; the pre-clip norm does not (accumulation,
    # rank averaging, the gathers' backward)
    assert all(n is not None and n > 0 for n in one["grad_norms"])
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-4)


@pytest.mark.parametrize("mode", LAUNCHERS)
def test_rank1_pool_merged_experts_are_the_same_on_both_ranks(runs, mode) -> None:
    run = runs / mode / "dist" / "rank1_pool"
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


@pytest.mark.parametrize("mode", LAUNCHERS)
def test_lilora_factors_and_snapshots_are_the_same_on_both_ranks(runs, mode) -> None:
    run = runs / mode / "dist" / "lilora"
    rank0 = load_file(str(run / "checkpoint" / "method" / WEIGHTS_NAME))
    rank1 = load_file(str(run / "rank1" / "method" / WEIGHTS_NAME))
    assert rank0.keys() == rank1.keys() and any(k.endswith("A_prev") for k in rank0)
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key


@pytest.mark.parametrize("method", METHODS)
def test_zero3_partitions_the_frozen_weights_and_keeps_adapters_whole(runs, method) -> None:
    layout = results(runs, "zero3", method)["runtime"]["zero3_layout"]  # the last task's engine, rank 0
    assert layout["adapters_partitioned"] == []  # methods read them outside their module's forward
    assert any(name.endswith("base_layer.weight") for name in layout["example_partitioned"])
    total, local = layout["partitioned_numel"], layout["local_numel"]
    assert total > layout["whole_numel"]  # most of the model is sharded
    assert total / 2 <= local <= total / 2 + layout["partitioned_tensors"]  # half each, up to padding
    assert "zero3_layout" not in results(runs, "zero2", method)["runtime"]


@pytest.mark.parametrize("name,stage,processes", [("zero2_8gpu", 2, 8), ("zero3_8gpu", 3, 8), ("zero3_64gpu", 3, 64)])
def test_shipped_deepspeed_accelerate_configs(name, stage, processes) -> None:
    """What the launch lines in docs/scale.md rely on (zero2_8gpu.yaml itself runs in the test above)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))
    assert config.distributed_type == "DEEPSPEED" and config.num_processes == processes
    assert config.deepspeed_config["zero_stage"] == stage and config.deepspeed_config["zero3_init_flag"] is False
    assert config.mixed_precision == "no"  # precision is train.precision


@pytest.mark.parametrize("mode", LAUNCHERS)
def test_only_rank_zero_reports_and_writes(runs, mode) -> None:
    out = (runs / f"{mode}.stdout").read_text()
    assert all(out.count(f"| {method} |") == 1 for method in METHODS)
    for method in METHODS:
        names = {p.name for p in (runs / mode / "dist" / method).iterdir()}
        assert {"results.json", "checkpoint", "rank1", "accuracy_matrix.csv", "metrics.jsonl"} <= names
        assert not any(n.startswith(".") for n in names)  # no half-written checkpoint left behind


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", LAUNCHERS)
def test_only_rank_zero_logs(runs, mode) -> None:
    """metrics.jsonl and TensorBoard: one writer (rank 0), the same events and steps as one process."""
    for method in METHODS:
        one, two = _events(runs / "single" / "dist" / method), _events(runs / mode / "dist" / method)
        assert [e["event"] for e in two] == [e["event"] for e in one]  # a second rank would add its own
        step = lambda e: (e.get("task_index"), e.get("step"), e.get("global_step"), e.get("lr"))  # noqa: E731
        assert [step(e) for e in two] == [step(e) for e in one]
        rows = [list(e["accuracy"].values()) for e in two if e["event"] == "task"]
        assert rows == results(runs, mode, method)["matrix"]
        files = list((runs / mode / "dist" / method / "tensorboard").glob("events.out.tfevents.*"))
        assert files and len({f.name.rsplit(".", 2)[1] for f in files}) == 1  # one process id


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


def test_instruction_tuning_loss_is_the_global_token_mean(one_thread) -> None:
    """LLaVA-style instruction tuning with answers of 1 to 5 tokens: the two ranks' rows hold
    different numbers of target tokens, and the kind's gathered token mean keeps 2 ranks equal
    to 1 process (a mean of per-rank means would not: observed 5 % apart on cvit-mini)."""
    from instruct_worker import run

    single = run()
    worker = str(Path(__file__).resolve().parent / "instruct_worker.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker]
    proc = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert two["losses"] == pytest.approx(single.train_losses, rel=1e-4)
    assert two["matrix"] == single.matrix


def test_precision_and_gradient_checkpointing_options_run_in_one_process(one_thread) -> None:
    """bf16 / fp16 autocast (fp16 with a loss scaler) train; gradient checkpointing recomputes the
    same function; it re-runs the Rank-1 pool's routing in backward, but votes cast there are not
    counted, so the counts and the merged sets S are unchanged."""
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


def test_objective_enters_autocast_inside_its_forward() -> None:
    """DeepSpeed's engine calls its module inside ``torch.autocast(enabled=False)`` when CUDA autocast
    is already on; the step's Objective enters the run's autocast inside its own forward, so it still applies."""
    from continual_lora.continual import Objective
    from continual_lora.runtime import Runtime

    dtypes = []

    def loss(model, batch):
        out = model(batch)
        dtypes.append(out.dtype)
        return out.float().square().mean()

    step = Objective(torch.nn.Linear(4, 4), loss, autocast=Runtime(precision="bf16").autocast)
    with torch.autocast("cpu", enabled=False):  # the engine's context around its module
        step(torch.randn(2, 4))
    plain = Objective(torch.nn.Linear(4, 4), loss)
    plain(torch.randn(2, 4))
    assert dtypes == [torch.bfloat16, torch.float32]


def test_deepspeed_accelerator_must_match_the_training_device(monkeypatch) -> None:
    from continual_lora.runtime.zero import select_accelerator

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)  # restored afterwards: later launches copy os.environ

    select_accelerator("cpu")  # this machine: DeepSpeed's CPU accelerator
    with pytest.raises(RuntimeError, match="DS_ACCELERATOR=cuda"):
        select_accelerator("cuda:0")


def test_accelerate_mixed_precision_is_refused_unless_it_matches(monkeypatch) -> None:
    from continual_lora.runtime import runtime_from_env

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ValueError, match="train.precision=bf16"):
        runtime_from_env("cpu", "fp32")
    assert runtime_from_env("cpu", "bf16").precision == "bf16"


def test_deepspeed_settings_come_from_accelerate_and_the_run_config(tmp_path, monkeypatch) -> None:
    """accelerate's DeepSpeed config gives the ZeRO settings; the run config gives batch, clipping and
    precision; a DeepSpeed setting that contradicts the run config is an error, not an override."""
    from continual_lora.runtime.zero import zero_settings

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    config = zero_settings(batch_size=64, grad_accum=2, world_size=8, max_grad_norm=1.0, precision="bf16")
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["train_batch_size"] == 128
    assert config["gradient_accumulation_steps"] == 2 and config["gradient_clipping"] == 1.0
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "bf16" not in config and "fp16" not in config  # bf16 runs as the trainer's autocast
    assert "auto" not in json.dumps(config)
    with pytest.raises(ValueError, match="fp16"):
        zero_settings(64, 1, 8, 1.0, precision="fp16")

    def from_file(ds: dict) -> dict:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ds))
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
        return zero_settings(64, 2, 8, None, precision="fp32")

    zero2 = {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}, "train_batch_size": "auto"}
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    config = from_file(zero2)
    assert config["zero_optimization"] == {"stage": 2}  # "auto" bucket size: DeepSpeed's default
    assert config["gradient_clipping"] == 0.0  # train.max_grad_norm = None: no clipping
    with pytest.raises(ValueError, match="train_batch_size"):
        from_file({**zero2, "train_batch_size": 32})
    with pytest.raises(ValueError, match="optimizer"):
        from_file({**zero2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    with pytest.raises(ValueError, match="bf16"):
        from_file({**zero2, "bf16": {"enabled": True}})
    with pytest.raises(ValueError, match="torch_autocast"):
        from_file({**zero2, "torch_autocast": {"enabled": True}})
    with pytest.raises(ValueError, match="scheduler"):
        from_file({**zero2, "scheduler": {"type": "WarmupLR"}})
    with pytest.raises(ValueError, match="amp"):
        from_file({**zero2, "amp": {"enabled": True}})
    with pytest.raises(ValueError, match="gradient_clipping"):
        from_file({**zero2, "gradient_clipping": 0.5})  # the run config says no clipping (None -> 0.0)
    config = from_file({**zero2, "gradient_accumulation_steps": 1})  # accelerate's default 1: ours wins
    assert config["gradient_accumulation_steps"] == 2
    zero3 = {"zero_optimization": {"stage": 3, "offload_param": {"device": "none", "buffer_size": "auto"}}}
    config = from_file(zero3)
    assert config["zero_optimization"] == {"stage": 3, "offload_param": {"device": "none"},
                                           "memory_efficient_linear": False}  # nested "auto" dropped too
    with pytest.raises(ValueError, match="stage3_model_persistence_threshold"):
        from_file({"zero_optimization": {"stage": 3, "stage3_model_persistence_threshold": 10**6}})
