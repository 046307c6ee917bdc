"""The typed seams between the layers: the method <-> kind <-> trainer contract, the registries, the
benchmark config sections, the training step and the one-process runtime."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch
from torch import nn

from continual_lora.adapters import ADAPTER_CONFIGS, LoRAConfig
from continual_lora.app.runner import RunConfig, build_methods
from continual_lora.benchmarks import BENCHMARKS, ConfigDeprecationWarning, parse_benchmark
from continual_lora.benchmarks.cvit import CvitConfig
from continual_lora.benchmarks.cvit_mini import CvitMiniConfig
from continual_lora.benchmarks.mtil_mini import MtilMiniConfig
from continual_lora.config import ConfigError, from_dict, to_dict
from continual_lora.continual import Objective, adamw, optimizer_step, warmup_cosine
from continual_lora.contract import TaskContext, TaskKind, no_gather
from continual_lora.methods import METHODS, Method, build_method, register_method
from continual_lora.runtime import Engine, Runtime


class CountKind(TaskKind):
    """A minimal kind: regression of the model's output to 1 on random inputs (no optional member)."""

    def num_train(self, task):
        return 8

    def train_batch(self, task, indices, generator):
        return torch.randn(len(indices), 10, generator=generator)

    def loss(self, model, batch, gather=no_gather):
        return (model(batch) - 1.0).square().mean()

    def evaluate(self, model, task, xtail=False, routing=None):
        return 50.0


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(10, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def context(kind: TaskKind, index: int = 0) -> TaskContext:
    task = type("T", (), {"name": f"t{index}"})()
    return TaskContext(task, index, [task], kind, torch.Generator().manual_seed(0))


# --- the contract -------------------------------------------------------------------------------
def test_a_kind_declares_every_optional_member_with_a_default() -> None:
    kind = CountKind()
    assert kind.protocol == "mtil" and kind.evaluate_future is True
    assert kind.test_shard(object(), 0, 2) is None and kind.extra_state() == {}
    results = {"metrics": {}}
    assert kind.extra_results(results) is results
    with pytest.raises(NotImplementedError):
        kind.num_test(object())

    class Incomplete(TaskKind):
        def num_train(self, task):
            return 1

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def test_hooks_that_need_the_context_say_so_without_one() -> None:
    model = Net()
    ewc = build_method("ewc", rank=2, targets=("fc1",))
    ewc.attach(model)
    ewc.begin_task(model, "t0", 0)  # SeqLoRA's begin_task needs no context
    with pytest.raises(RuntimeError, match="ewc needs the trainer's task context"):
        ewc.end_task(model, "t0", 0)  # the Fisher needs the task's data
    ewc.end_task(model, "t0", 0, context(CountKind()))  # with one it works
    assert ewc.trained_tasks == ["t0"] and float(ewc.loss_terms(model)["ewc"].detach()) == 0.0  # at the anchor


def test_distillation_methods_refuse_a_kind_without_image_text_features() -> None:
    model = Net()
    lwf = build_method("lwf_vr", rank=2, targets=("fc1",))
    lwf.attach(model)
    with pytest.raises(TypeError, match="lwf_vr needs an image-text task kind .* not CountKind"):
        lwf.begin_task(model, "t0", 0, context(CountKind()))
    zscl = build_method("zscl", rank=2, targets=("fc1",))
    with pytest.raises(TypeError, match="zscl needs an image-text task kind"):
        zscl.distillation(Net(), torch.zeros(2, 3, 8, 8), context(CountKind()))


# --- registries -----------------------------------------------------------------------------------
def test_a_method_is_named_once_and_its_config_registered_under_that_name() -> None:
    for name, cls in METHODS.items():
        assert cls.name == name
        config = cls.config_cls
        if config is LoRAConfig:  # a shared config keeps its own name (seq_lora trains a plain LoRA)
            assert config.method == "lora"
        else:
            assert config.method == name and ADAPTER_CONFIGS[name] is config, name

    @dataclasses.dataclass
    class ProbeConfig(LoRAConfig):
        strength: float = 0.5

    try:
        @register_method
        class Probe(Method):
            name = "probe_method"
            config_cls = ProbeConfig

        assert ProbeConfig.method == "probe_method" and ADAPTER_CONFIGS["probe_method"] is ProbeConfig
        assert build_method("probe_method", strength=0.25).config.to_dict()["method"] == "probe_method"
        with pytest.raises(TypeError, match=r"hooks \['loss_terms'\] must accept the task context"):
            @register_method
            class Old(Method):  # a method written for set_context (continual-lora <= 0.1.0)
                name = "old_method"

                def loss_terms(self, model, batch):
                    return {}
        assert "old_method" not in METHODS
    finally:
        METHODS.pop("probe_method", None)
        ADAPTER_CONFIGS.pop("probe_method", None)


# --- the benchmark section ------------------------------------------------------------------------
def test_the_benchmark_section_becomes_the_named_benchmarks_config() -> None:
    assert isinstance(RunConfig().benchmark, MtilMiniConfig)
    config = from_dict(RunConfig, {"benchmark": {"name": "cvit-mini", "max_test_per_task": 5}})
    assert isinstance(config.benchmark, CvitMiniConfig) and config.benchmark.max_test_per_task == 5
    assert to_dict(config)["benchmark"]["name"] == "cvit-mini"
    assert isinstance(parse_benchmark({"name": "cvit"}), CvitConfig)
    for name, benchmark in BENCHMARKS.items():
        assert benchmark.name == name  # (the config class's name default)
    with pytest.raises(ConfigError, match="benchmark.name: unknown benchmark 'imagenet'"):
        from_dict(RunConfig, {"benchmark": {"name": "imagenet"}})
    with pytest.raises(ConfigError, match="benchmark.name: unknown benchmark"):
        from_dict(RunConfig, {"benchmark": {"name": ["mtil-mini"]}})
    with pytest.raises(ConfigError, match="unknown config key benchmark.'nonsense'"):
        from_dict(RunConfig, {"benchmark": {"name": "cvit-mini", "nonsense": 1}})
    with pytest.raises(ConfigError, match=r"benchmark.order: expected one of 'I', 'II', got 'III'"):
        from_dict(RunConfig, {"benchmark": {"order": "III"}})
    with pytest.raises(ConfigError, match=r"methods.rank1_pool.routing_token: expected int or one of 'mean', got 'cls'"):
        build_methods(from_dict(RunConfig, {"methods": [{"name": "rank1_pool", "routing_token": "cls"}]}))


def test_a_key_of_the_old_flat_section_is_dropped_with_a_deprecation_warning() -> None:
    with pytest.warns(ConfigDeprecationWarning, match=r"benchmark: order, shots: not settings of cvit-mini, ignored"):
        config = from_dict(RunConfig, {"benchmark": {"name": "cvit-mini", "order": "II", "shots": 5}})
    assert isinstance(config.benchmark, CvitMiniConfig) and not hasattr(config.benchmark, "order")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_dict(RunConfig, {"benchmark": {"name": "mtil-mini", "order": "II"}})  # its own key: no warning


# --- the training step ------------------------------------------------------------------------------
def test_warmup_cosine_schedule() -> None:
    lr, min_lr, steps, warmup = 2e-3, 1e-6, 20, 4
    f = warmup_cosine(steps, warmup, lr, min_lr)
    assert [f(s) for s in range(warmup)] == [0.25, 0.5, 0.75, 1.0]
    assert f(warmup) == pytest.approx(1.0)
    for s in range(warmup, steps):
        progress = (s - warmup) / (steps - warmup)
        assert lr * f(s) == pytest.approx(min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress)))
    optimizer, schedule = adamw([nn.Parameter(torch.zeros(2))], lr, 0.0, steps, warmup, min_lr)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == [lr * f(s) for s in range(steps)]


def test_one_optimizer_step_accumulates_micro_batches_then_clips_and_steps() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    batches = [torch.randn(3, 4), torch.randn(3, 4)]
    start = model.weight.detach().clone()

    def loss(m, x):
        return m(x).square().mean()

    ref = [torch.autograd.grad(loss(model, x), model.weight)[0] for x in batches]
    expected = start - 0.1 * (ref[0] + ref[1]) / 2  # SGD on the mean of the micro-batch losses
    engine = Engine(Objective(model, loss), torch.optim.SGD(model.parameters(), lr=0.1))
    feed = iter(batches)
    out = optimizer_step(engine, lambda: next(feed), list(model.parameters()), grad_accum=2, max_grad_norm=None)
    torch.testing.assert_close(model.weight.detach(), expected)
    assert out.terms == {} and float(out.grad_norm) > 0 and model.weight.grad is None  # zeroed after the step
    engine.close()
    assert engine.module is None and engine.optimizer is None


def test_objective_adds_the_methods_terms_to_the_loss() -> None:
    model = Net()
    objective = Objective(model, lambda m, b: torch.tensor(2.0), lambda m, b: {"a": torch.tensor(0.5)})
    total, terms = objective(None)
    assert float(total) == 2.5 and set(terms) == {"a"}


# --- the one-process runtime ---------------------------------------------------------------------------
def test_one_process_runtime_is_the_plain_operations() -> None:
    runtime = Runtime()
    x = torch.randn(4, 2)
    assert runtime.gather(x) is x and runtime.local_rows(4) is None
    assert runtime.all_gather_object(3) == [3] and runtime.is_main and not runtime.distributed
    state = torch.get_rng_state()
    with runtime.task_rng(123):
        pass
    assert torch.equal(state, torch.get_rng_state())  # one process: no per-rank stream
    engine = runtime.engine(Objective(Net(), lambda m, b: m(b).sum()), None)
    assert type(engine) is Engine and engine.scaler is None
    assert runtime.describe()["engine"] == "single"
    assert Runtime(precision="fp16").grad_scaler() is not None
    with pytest.raises(ValueError, match="precision"):
        Runtime(precision="fp8")
    with pytest.raises(ValueError, match="divisible"):
        type("Two", (Runtime,), {"world_size": 2})().check_batch_size(3)


# --- adding a benchmark: one module (config + builder) and one registry entry ------------------------
def test_a_new_benchmark_runs_through_the_command_line_after_one_registry_entry(synthetic, tmp_path) -> None:
    """conftest's ``synthetic`` fixture registers a benchmark exactly as benchmarks/<new>.py + one line of
    benchmarks/__init__.py would (SyntheticConfig + build_synthetic)."""
    from continual_lora.cli import main

    assert main(["run", str(synthetic), f"output_dir={tmp_path}"]) == 0
    results = json.loads((tmp_path / "synth" / "seq_lora" / "results.json").read_text())
    assert results["finished"] and results["tasks"] == ["alpha", "beta"]
    assert results["config"]["benchmark"] == {"name": "synthetic", "tasks": 2, "nan_task": None}
