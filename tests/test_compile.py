"""``train.compile``: the seed methods trace without graph breaks, and a compiled run trains like an eager one.

Inductor on the CPU compiles for about a minute per task, so the run here uses the ``aot_eager``
backend (dynamo + AOTAutograd: the same tracing, functionalisation of the counts update and
backward graph, no code generation); docs/results.md reports the inductor run.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import METHOD_ARGS, TASKS, TRAIN, clip_inputs, make_tiny_clip, run_stream

from continual_lora.continual import ContinualTrainer, TrainConfig
from continual_lora.methods import build_method
from continual_lora.runtime import Runtime


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["rank1_pool", "lilora"])
def test_a_training_step_traces_without_graph_breaks(name: str) -> None:
    """Forward, CLIP loss and the method's terms, on the second task (AGO on / B0 frozen) as one graph."""
    import torch._dynamo

    model = make_tiny_clip()
    method = build_method(name, **{**METHOD_ARGS[name], "dropout": 0.1})
    method.attach(model)
    batch = clip_inputs(batch=2, seed=0)
    method.begin_task(model, "t0", 0)
    model.train()
    with torch.no_grad():
        model(**batch, return_loss=True)
    method.end_task(model, "t0", 0)
    method.begin_task(model, "t1", 1)
    model.train()

    def step(batch):
        return model(**batch, return_loss=True).loss + sum(method.loss_terms(model, batch).values())

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(batch)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_compiled_run_trains_like_the_eager_run(clip_stream, monkeypatch) -> None:
    kind, base = clip_stream
    compiled: list[str] = []
    real_compile = torch.compile

    def compile_aot_eager(fn, mode=None, **kw):
        compiled.append(mode)
        return real_compile(fn, backend="aot_eager", **kw)

    runs = {}
    for on in (False, True):
        train = dataclasses.replace(TRAIN, iterations=3, compile=on, compile_mode="reduce-overhead")
        with monkeypatch.context() as patch:
            patch.setattr(torch, "compile", compile_aot_eager)
            state, _ = run_stream(base, build_method("rank1_pool", **METHOD_ARGS["rank1_pool"]), kind, TASKS[:2],
                                        train)
        runs[on] = state
    assert compiled == ["reduce-overhead"] * 2  # one compiled objective per task, in the compiled run only
    assert runs[True].matrix == runs[False].matrix
    torch.testing.assert_close(torch.tensor(runs[True].train_losses), torch.tensor(runs[False].train_losses),
                               atol=1e-5, rtol=0)


def test_compile_options_are_checked(clip_stream) -> None:
    with pytest.raises(ValueError, match="train.compile_mode"):
        TrainConfig(compile=True, compile_mode="fast")
    runtime = Runtime(deepspeed={"zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match="train.compile is not supported under DeepSpeed"):
        ContinualTrainer(copy.deepcopy(clip_stream[1]), build_method("seq_lora"), clip_stream[0], TASKS,
                         dataclasses.replace(TRAIN, compile=True), runtime=runtime)
