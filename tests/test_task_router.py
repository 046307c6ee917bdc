"""Task routers of task-id methods (methods/task_router.py) and the mixed-batch forward they use
(adapters.use_sample_tasks): statistics and distances, routing, save / load, X-TAIL with task-id
accuracy through the trainer, and the instruction path's routed generation."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import (
    LLAVA_IMAGE_TOKEN,
    METHOD_ARGS,
    TASKS,
    TRAIN,
    make_seq_first,
    make_tiny_clip,
    make_tiny_llava,
    run_stream,
)
from torch import nn

from continual_lora.adapters import (
    LoRAConfig,
    UnknownTaskError,
    add_task,
    branches,
    inject_adapters,
    merge,
    set_task,
    unmerge,
    use_sample_tasks,
    use_task,
)
from continual_lora.errors import UserError
from continual_lora.kinds.clip_ops import encode_images, text_classifier
from continual_lora.methods import LiLoRAConfig, PrototypeRouter, build_method
from continual_lora.methods.o_lora import OLoRAConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """Every adapter parameter of every task random and nonzero (zero-initialised B would hide a wrong task)."""
    g = torch.Generator().manual_seed(seed)
    for _, branch in sorted(branches(model).items()):
        for _, p in sorted(branch.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def adapted(model: nn.Module, config, tasks=("a", "b", "c")) -> nn.Module:
    inject_adapters(model, config)
    for task in tasks:
        add_task(model, task)
    randomize_adapters(model)
    return model.eval()


# --- mixed batches ---------------------------------------------------------------------------------
CONFIGS = {"lora": LoRAConfig(rank=3, alpha=6.0), "lilora": LiLoRAConfig(rank=4, alpha=8.0, inner_rank=2, dropout=0.0)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_mixed_batch_equals_each_sample_through_its_own_task_clip(name) -> None:
    model = adapted(make_tiny_clip(), CONFIGS[name])
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    tasks = ["b", "a", "b", "c", "a"]
    with torch.no_grad(), use_sample_tasks(model, tasks):
        mixed = encode_images(model, images)
    for n, task in enumerate(tasks):
        with torch.no_grad(), use_task(model, task):
            torch.testing.assert_close(mixed[n : n + 1], encode_images(model, images[n : n + 1]), atol=1e-5, rtol=1e-5)
    with torch.no_grad(), use_task(model, "a"):  # the tasks really differ
        assert not torch.allclose(encode_images(model, images), mixed, atol=1e-3)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_mixed_batch_on_sequence_first_attention(name) -> None:
    """(L, N, D) blocks with nn.MultiheadAttention: the batch axis is 1 for the Linear layers."""
    config = dataclasses.replace(CONFIGS[name], seq_dim=0, targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1",
                                                                  "fc2"))
    model = adapted(make_seq_first(), config, tasks=("a", "b"))
    x = torch.randn(5, 4, 16)  # L = 5 tokens, N = 4 samples
    tasks = ["b", "a", "a", "b"]
    with torch.no_grad(), use_sample_tasks(model, tasks):
        mixed = model(x)
    for n, task in enumerate(tasks):
        with torch.no_grad(), use_task(model, task):
            torch.testing.assert_close(mixed[n : n + 1], model(x[:, n : n + 1]), atol=1e-5, rtol=1e-5)


def test_mixed_batch_errors() -> None:
    model = adapted(make_tiny_clip(), CONFIGS["lora"], tasks=("a", "b"))
    with pytest.raises(UnknownTaskError, match="nope"):
        with use_sample_tasks(model, ["a", "nope"]):
            pass
    with pytest.raises(ValueError, match="mixed batch of 2 samples"), use_sample_tasks(model, ["a", "b"]):
        model.get_image_features(pixel_values=torch.randn(3, 3, 16, 16))
    assert all(b.sample_groups is None for b in branches(model).values())  # the block restored the branches
    merge(model, "a")
    with pytest.raises(RuntimeError, match="unmerge"), use_sample_tasks(model, ["a", "b"]):
        pass
    unmerge(model)
    summed = adapted(make_tiny_clip(), OLoRAConfig(rank=2, alpha=4.0), tasks=("a", "b"))
    with pytest.raises(NotImplementedError, match="OLoRABranch"), use_sample_tasks(summed, ["a", "b"]):
        pass


# --- the prototype router ------------------------------------------------------------------------
def clusters(seed: int, nuisance: float = 0.0, n: int = 40, d: int = 8) -> dict[str, torch.Tensor]:
    """Three tasks' features around well-separated centres, plus a shared direction of spread ``nuisance``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(d)[:3] * 3.0
    shared = torch.zeros(d)
    shared[-1] = 1.0
    return {t: centres[i] + 0.3 * torch.randn(n, d, generator=g) + nuisance * torch.randn(n, 1, generator=g) * shared
            for i, t in enumerate(("a", "b", "c"))}


def routing_accuracy(router: PrototypeRouter, test: dict[str, torch.Tensor]) -> float:
    picked = [router.assign(f, ["a", "b", "c"]) == i for i, f in enumerate(test.values())]
    return torch.cat(picked).float().mean().item()


@pytest.mark.parametrize("metric", ["cosine", "mahalanobis"])
def test_the_prototype_router_finds_the_task_of_well_separated_features(metric) -> None:
    router = PrototypeRouter(metric=metric, shrinkage=0.1)
    for task, f in clusters(0).items():
        router.observe(task, f)
    assert routing_accuracy(router, clusters(1)) == 1.0
    assert router.assign(clusters(1)["b"], ["b", "c"]).eq(0).all()  # indices follow the given tasks


def test_mahalanobis_discounts_a_direction_every_task_varies_along() -> None:
    """A large spread shared by all tasks swamps the cosine; the pooled covariance discounts it."""
    scores = {}
    for metric in ("cosine", "mahalanobis"):
        router = PrototypeRouter(metric=metric, shrinkage=0.1)
        for task, f in clusters(0, nuisance=5.0).items():
            router.observe(task, f)
        scores[metric] = routing_accuracy(router, clusters(1, nuisance=5.0))
    assert scores["mahalanobis"] >= 0.97 and scores["cosine"] < 0.8, scores


@pytest.mark.parametrize("bad, message", [(dict(router_metric="maha"), "router_metric"), (dict(route="All"), "route"),
                                          (dict(router_shrinkage=0.0), "router_shrinkage"),
                                          (dict(task_router="proto"), "task_router")])
def test_router_options_are_checked_in_python_too(bad, message) -> None:
    with pytest.raises(ValueError, match=message):
        build_method("per_task_lora", **METHOD_ARGS["per_task_lora"], **{"task_router": "prototype", **bad})


def test_mahalanobis_without_any_within_task_spread_still_routes() -> None:
    router = PrototypeRouter("mahalanobis", shrinkage=0.1)
    router.observe("a", torch.tensor([[0.0, 1.0]]))  # one sample per task: the pooled scatter is zero
    router.observe("b", torch.tensor([[1.0, 0.0]]))
    assert router.assign(torch.tensor([[0.1, 0.9], [0.8, 0.3]]), ["a", "b"]).tolist() == [0, 1]


def test_mahalanobis_distance_by_hand() -> None:
    router = PrototypeRouter(metric="mahalanobis", shrinkage=0.25)
    fa = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 1.0]])
    fb = torch.tensor([[0.0, 4.0], [0.0, 6.0]])
    router.observe("a", fa)
    router.observe("b", fb)
    scatter = (fa - fa.mean(0)).T @ (fa - fa.mean(0)) + (fb - fb.mean(0)).T @ (fb - fb.mean(0))
    pooled = scatter / (5 - 2)
    cov = 0.75 * pooled + 0.25 * (pooled.trace() / 2) * torch.eye(2)
    torch.testing.assert_close(router.covariance().float(), cov)
    x = torch.tensor([[1.0, 3.0]])
    expected = [((x - m) @ torch.linalg.inv(cov) @ (x - m).T).item() for m in (fa.mean(0), fb.mean(0))]
    torch.testing.assert_close(router.distances(x, ["a", "b"]).float(), torch.tensor([expected]))
    with pytest.raises(ValueError, match="already"):
        router.observe("a", fa)


# --- through the trainer: X-TAIL, task-id accuracy, resume --------------------------------------
def routed(name: str, router: str, **kw):
    return build_method(name, **METHOD_ARGS[name], task_router=router, **kw)


@pytest.mark.parametrize("name", ["per_task_lora", "lilora"])
def test_xtail_routes_each_sample_and_reports_task_id_accuracy(clip_stream, tmp_path, name) -> None:
    kind, base = clip_stream
    state, trainer = run_stream(base, routed(name, "prototype"), kind, TASKS, TRAIN, tmp=tmp_path / "full", xtail=True)
    accuracy = state.xtail_task_id_accuracy
    assert set(accuracy) == {t.name for t in TASKS} and all(0 <= v <= 100 for v in accuracy.values())
    assert sum(accuracy.values()) / 3 > 100 / 3  # better than a random pick of the three tasks
    assert state.task_id_accuracy == {}  # route: xtail (default): the per-task matrix keeps the oracle id
    plain, _ = run_stream(base, build_method(name, **METHOD_ARGS[name]), kind, TASKS, TRAIN, xtail=True)
    assert plain.matrix == state.matrix  # the router does not change training or oracle-id evaluation
    assert plain.xtail_task_id_accuracy == {}
    # a run stopped after task 1 and resumed reloads the router: the same numbers
    with pytest.raises(KeyboardInterrupt):
        run_stream(base, routed(name, "prototype"), kind, TASKS, TRAIN, tmp=tmp_path / "cut", xtail=True, stop_after=1)
    resumed, _ = run_stream(base, routed(name, "prototype"), kind, TASKS, TRAIN, tmp=tmp_path / "cut", xtail=True,
                            resume=True)
    assert resumed.xtail_matrix == state.xtail_matrix and resumed.xtail_task_id_accuracy == accuracy


@pytest.mark.parametrize("name", ["per_task_lora", "lilora"])
def test_confidence_routing_and_route_all(clip_stream, name) -> None:
    kind, base = clip_stream
    state, trainer = run_stream(base, routed(name, "confidence", route="all"), kind, TASKS, TRAIN, xtail=True)
    assert set(state.task_id_accuracy) == set(state.xtail_task_id_accuracy) == {t.name for t in TASKS}
    # route: all -> after the last task the per-task matrix is routed too: the same routing as X-TAIL
    assert state.task_id_accuracy == state.xtail_task_id_accuracy
    # the rule, computed here by hand: each test image goes to the task whose adapter gives the highest
    # top-class probability over that task's own classes
    model, expected = trainer.model.eval(), {}
    with torch.no_grad():
        classifiers = {}
        for t in TASKS:
            with use_task(model, t.name):
                classifiers[t.name] = text_classifier(model, kind.tokenizer, t.class_names, t.templates)
        for t in TASKS:
            scores = []
            for other in TASKS:
                with use_task(model, other.name):
                    logits = kind.logit_scale * kind.image_features(model, {"images": t.test_images}) @ classifiers[other.name].t()
                scores.append(logits.softmax(dim=-1).amax(dim=-1))
            expected[t.name] = 100.0 * float((torch.stack(scores).argmax(dim=0) == TASKS.index(t)).float().mean())
    assert state.xtail_task_id_accuracy == pytest.approx(expected)
    oracle, _ = run_stream(base, build_method(name, **METHOD_ARGS[name]), kind, TASKS, TRAIN)
    # after task 0 there is one task to route to: task 0 is scored as with the oracle id; the tasks not
    # trained yet also go through task 0's adapter (no id at all), not through the base model
    assert state.matrix[0][0] == oracle.matrix[0][0] and len(state.matrix) == 3


def test_oracle_xtail_scores_each_task_with_its_own_adapter_or_the_base_model(clip_stream) -> None:
    kind, base = clip_stream
    oracle, _ = run_stream(base, routed("per_task_lora", "oracle"), kind, TASKS, TRAIN, xtail=True)
    plain, _ = run_stream(base, build_method("per_task_lora", **METHOD_ARGS["per_task_lora"]), kind, TASKS, TRAIN,
                          xtail=True)
    assert oracle.matrix == plain.matrix and oracle.xtail_task_id_accuracy == {}
    for j, row in enumerate(oracle.xtail_matrix):
        assert row[j] == plain.xtail_matrix[j][j]  # right after task j, no id means task j's adapter: the same
        assert row[j + 1:] == oracle.xtail_zero_shot[j + 1:]  # tasks not trained yet: the base model
    # earlier tasks: their own adapter, where the plain run uses the last one
    assert any(row[i] != plain.xtail_matrix[j][i] for j, row in enumerate(oracle.xtail_matrix) for i in range(j))


def test_saved_router_routes_the_same(clip_stream, tmp_path) -> None:
    kind, base = clip_stream
    method = routed("per_task_lora", "prototype")
    _, trainer = run_stream(base, method, kind, TASKS, TRAIN)
    method.save(trainer.model, str(tmp_path / "m"))
    features = torch.randn(20, 16)
    fresh = routed("per_task_lora", "prototype")
    model = copy.deepcopy(base)
    fresh.load(model, str(tmp_path / "m"))
    assert fresh.router.tasks == method.router.tasks == [t.name for t in TASKS]
    assert torch.equal(fresh.router.assign(features, fresh.router.tasks),
                       method.router.assign(features, method.router.tasks))
    build_method("per_task_lora", **METHOD_ARGS["per_task_lora"]).save(model, str(tmp_path / "plain"))
    with pytest.raises(UserError, match="without a task router"):
        routed("per_task_lora", "prototype").load(copy.deepcopy(base), str(tmp_path / "plain"))


def test_without_a_router_the_unknown_id_error_and_the_last_adapter_remain(clip_stream) -> None:
    kind, base = clip_stream
    method = build_method("lilora", **METHOD_ARGS["lilora"])
    _, trainer = run_stream(base, method, kind, TASKS, TRAIN)
    with pytest.raises(UnknownTaskError, match="unknown task 'delta'"):
        set_task(trainer.model, "delta")  # the release would make fresh random factors
    with method.evaluating(trainer.model, None) as routing:
        assert routing is None and all(b.active_task == "gamma" for b in branches(trainer.model).values())


# --- the instruction path --------------------------------------------------------------------------
def test_routed_generation_equals_each_sample_through_its_task() -> None:
    """LLaVA: features from the vision tower, one mixed-batch generate = per-sample generates."""
    from continual_lora.kinds.instruct import InstructionTuning
    from continual_lora.kinds.instruct_data import InstructSample, InstructTask
    from continual_lora.models.llava_mini import LLAVA_TARGETS
    from test_instruct import color_images, tiny_tokenizer

    model = make_tiny_llava()
    method = build_method("lilora", rank=4, alpha=8.0, inner_rank=2, dropout=0.0, targets=LLAVA_TARGETS,
                          task_router="prototype")
    method.attach(model)
    for task in ("a", "b"):
        add_task(model, task)
    randomize_adapters(model)
    samples = [InstructSample(f"s{k}", (("<image>\nWhat color is it ?", "red"),), image=k) for k in range(6)]
    texts = ["<image> What color is it ? red", "system user assistant"]
    tokenizer = tiny_tokenizer(texts)
    task = InstructTask("a", samples, samples, scorer="exact", answer_format="short", images=color_images(6, 0))
    kind = InstructionTuning.for_model(model, tokenizer, eval_batch_size=6, max_new_tokens=4)
    assert kind.image_token_id == LLAVA_IMAGE_TOKEN
    features = kind.route_features(model, task)
    assert features.shape == (6, 32) and torch.allclose(features.norm(dim=-1), torch.ones(6))
    method.router.observe("a", features[0::3])  # red images -> a, the others -> b
    method.router.observe("b", torch.cat([features[1::3], features[2::3]]))
    method.trained_tasks = ["a", "b"]
    routing = method.routing(model)
    answers = kind.generate(model, task, samples, routing)
    assert routing.counts["a"] == [2, 6]  # the two red images were routed to "a"
    for k, sample in enumerate(samples):
        with use_task(model, "a" if k % 3 == 0 else "b"):
            assert kind.generate(model, task, [sample]) == [answers[k]]
    with use_task(model, "a"):
        assert kind.generate(model, task, samples) != answers  # the two tasks' adapters answer differently


def test_confidence_routing_is_refused_for_instruction_tasks() -> None:
    from continual_lora.models.llava_mini import LLAVA_TARGETS
    from test_instruct import TASKS as INSTRUCT, make_kind, tiny_tokenizer, TEXTS

    model = make_tiny_llava()
    kind = make_kind(tiny_tokenizer(TEXTS), model)
    method = build_method("lilora", rank=4, alpha=8.0, inner_rank=2, targets=LLAVA_TARGETS, task_router="confidence")
    with pytest.raises(UserError, match="task_router 'confidence' is not available for InstructionTuning"):
        run_stream(model, method, kind, INSTRUCT, TRAIN)
