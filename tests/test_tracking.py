"""Experiment tracking: metrics.jsonl of a real two-task run, and what TensorBoard, W&B (offline) and
MLflow (file store) hold afterwards, each read back with its own reader; resuming; the ``logging:`` section."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from continual_lora.app.runner import RunConfig
from continual_lora.app.tracking import METRICS, TRACKER_IDS, LoggingConfig, RunLogger, check_trackers
from continual_lora.config import ConfigError, from_dict
from continual_lora.continual import RunState, StepLog, warmup_cosine

METHODS = ("lilora", "rank1_pool")
STEPS, EVERY = 4, 3  # tiny_run: 4 optimiser steps per task, logging.every = 3


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]


# --- metrics.jsonl ---------------------------------------------------------------------------------
@pytest.mark.parametrize("label", METHODS)
def test_metrics_jsonl_of_a_two_task_run(tiny_run, label) -> None:
    run_dir = tiny_run / label
    results = json.loads((run_dir / "results.json").read_text())
    log = events(run_dir)
    tasks = results["tasks"]
    assert [e["event"] for e in log] == ["config", "zero_shot", "step", "step", "task", "step", "step", "task", "end"]
    assert all(isinstance(e["time"], float) for e in log)
    assert log[0]["config"] == results["config"] and log[0]["config"]["logging"]["every"] == EVERY
    assert log[1] == {**log[1], "global_step": 0, "accuracy": dict(zip(tasks, results["zero_shot"]))}

    steps = [e for e in log if e["event"] == "step"]
    # every 3rd step, and each task's last (4th): global steps 3, 4 | 7, 8
    assert [(e["task"], e["task_index"], e["step"], e["global_step"]) for e in steps] == [
        (tasks[0], 0, 3, 3), (tasks[0], 0, 4, 4), (tasks[1], 1, 3, 7), (tasks[1], 1, 4, 8)]
    schedule = warmup_cosine(STEPS, 0, 2e-3, 1e-6)  # train.lr, warm-up 3 % of 4 steps = 0, min_lr
    for e in steps:
        assert e["loss"] == pytest.approx(e["task_loss"] + sum(e["terms"].values()), abs=1e-6)
        assert set(e["terms"]) == ({"ago"} if label == "rank1_pool" else set())
        assert e["lr"] == pytest.approx(2e-3 * schedule(e["step"] - 1), rel=1e-9) and e["grad_norm"] > 0
    assert [e["loss"] for e in steps if e["step"] == STEPS] == results["train_losses"]  # the tail mean of 4 steps

    task_events = [e for e in log if e["event"] == "task"]
    for j, e in enumerate(task_events):
        assert (e["task"], e["task_index"], e["global_step"]) == (tasks[j], j, STEPS * (j + 1))
        assert e["accuracy"] == dict(zip(tasks, results["matrix"][j]))
        assert e["params"]["trainable"] == results["params"]["trainable_per_task"][j]
        assert e["task_seconds"] == pytest.approx(results["task_seconds"][j], abs=0.01)
        assert e["train_loss"] == results["train_losses"][j] and e["grad_norm"] == results["grad_norms"][j]
    assert task_events[0]["metrics"]["last"] == results["matrix"][0][0]  # one task so far: its own score
    assert task_events[-1]["metrics"] == results["metrics"] == log[-1]["metrics"]
    assert task_events[-1]["params"]["stored"] == results["params"]["stored"]


# --- TensorBoard ------------------------------------------------------------------------------------
def test_tensorboard_event_file_is_readable_with_tensorboards_reader(tiny_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tiny_run / "rank1_pool"
    log = events(run_dir)
    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert files
    reader = EventAccumulator(str(run_dir / "tensorboard"))
    reader.Reload()
    scalars = set(reader.Tags()["scalars"])
    assert {"loss/total", "loss/task", "loss/ago", "train/lr", "train/grad_norm", "metrics/last", "eval/digits",
            "params/trainable", "time/task_seconds"} <= scalars
    steps = [e for e in log if e["event"] == "step"]
    loss = reader.Scalars("loss/total")
    assert [s.step for s in loss] == [e["global_step"] for e in steps]
    assert [s.value for s in loss] == pytest.approx([e["loss"] for e in steps], rel=1e-6)
    tasks = [e for e in log if e["event"] == "task"]
    accuracy = reader.Scalars("eval/digits")
    assert [s.step for s in accuracy] == [0] + [e["global_step"] for e in tasks]
    assert [s.value for s in accuracy] == pytest.approx([log[1]["accuracy"]["digits"]] +
                                                        [e["accuracy"]["digits"] for e in tasks])
    assert "config/text_summary" in reader.Tags()["tensors"]  # the run config as text


# --- Weights & Biases, offline ------------------------------------------------------------------------
def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (``run-<id>.wandb``): W&B's LevelDB-style log, a 7-byte
    header (":W&B", magic 0xBEE1, version) then 32 KiB blocks of chunks (crc32c, length, type;
    1 full, 2 first, 3 middle, 4 last), each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    block, pos, parts, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:  # zero padding
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def test_wandb_offline_run_holds_the_history(tiny_run) -> None:
    run_dir = tiny_run / "lilora"
    run_id = json.loads((run_dir / TRACKER_IDS).read_text())["wandb"]
    files = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    records = wandb_records(files[0])
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].project == "exp" and runs[0].display_name == "lilora" and runs[0].run_group == "exp"
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(items["_step"], {}).update(items)
    log = events(run_dir)
    steps = [e for e in log if e["event"] == "step"]
    assert sorted(k for k, items in history.items() if "loss/total" in items) == [e["global_step"] for e in steps]
    for e in steps:
        assert history[e["global_step"]]["loss/total"] == pytest.approx(e["loss"])
        assert history[e["global_step"]]["train/lr"] == pytest.approx(e["lr"])
    last = [e for e in log if e["event"] == "task"][-1]
    assert history[last["global_step"]]["metrics/average"] == pytest.approx(last["metrics"]["average"])
    assert history[0]["eval/animals"] == pytest.approx(log[1]["accuracy"]["animals"])
    configs = [r.config for r in records if r.WhichOneof("record_type") == "config"]
    keys = {item.key for c in configs for item in c.update}
    assert {"train", "methods", "benchmark", "logging"} <= keys


# --- MLflow, file store ---------------------------------------------------------------------------------
def test_mlflow_file_store_holds_both_runs(tiny_run, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tiny_run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("exp")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(METHODS)
    for label, run in runs.items():
        assert run.info.status == "FINISHED" and run.info.run_id == json.loads(
            (tiny_run / label / TRACKER_IDS).read_text())["mlflow"]
        assert run.data.params["train.lr"] == "0.002" and run.data.params["methods"].startswith("[{")
        log = events(tiny_run / label)
        steps = [e for e in log if e["event"] == "step"]
        history = client.get_metric_history(run.info.run_id, "loss/total")
        assert [m.step for m in history] == [e["global_step"] for e in steps]
        assert [m.value for m in history] == pytest.approx([e["loss"] for e in steps])
        assert run.data.metrics["metrics/last"] == pytest.approx(log[-1]["metrics"]["last"])


# --- resuming, without training: the logger on a scripted run ---------------------------------------------
def _step(task: str, index: int, step: int, global_step: int, loss: float) -> StepLog:
    return StepLog(task, index, step, global_step, loss, loss, {}, 1e-3, 1.0)


def _finished(state: RunState, row: list[float], steps: int) -> None:
    state.matrix.append(row)
    for field, value in (("train_losses", 1.0), ("grad_norms", 1.0), ("trainable_params", 10),
                         ("task_steps", steps), ("task_seconds", 0.5)):
        getattr(state, field).append(value)


PARAMS = {"params": {"trainable": 10, "trainable_per_task": [10], "stored": 20, "shared": 0, "per_task": {}, "base": 5}}


def test_a_resumed_run_continues_the_same_runs_without_duplicates(tmp_path, monkeypatch) -> None:
    """A run stopped in its second task and resumed: metrics.jsonl drops the lost steps and continues,
    TensorBoard purges them, W&B and MLflow log into the same runs."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging = LoggingConfig(trackers=["tensorboard", "wandb", "mlflow"])
    make = lambda: RunLogger(tmp_path, logging, name="r", label="m", store=tmp_path, config={"seed": 0},  # noqa: E731
                             protocol="mtil")
    state = RunState(tasks=["a", "b"], zero_shot=[10.0, 20.0])
    first = make()
    first.start(state)
    for k in range(1, 5):
        first.step(_step("a", 0, k, k, 5.0 - k))
    _finished(state, [50.0, 20.0], 4)
    first.task_end(state, PARAMS)
    first.step(_step("b", 1, 1, 5, 9.0))  # the run dies here: this step is lost with its task
    first.close(ok=False)
    ids = json.loads((tmp_path / TRACKER_IDS).read_text())

    resumed = RunState(**{**state.__dict__})  # what the checkpoint after task "a" holds
    second = make()
    second.start(resumed)
    assert json.loads((tmp_path / TRACKER_IDS).read_text()) == ids  # the same W&B and MLflow runs
    for k in range(1, 5):
        second.step(_step("b", 1, k, 4 + k, 1.0 / k))
    _finished(resumed, [45.0, 60.0], 4)
    second.task_end(resumed, PARAMS)
    second.finish({"metrics": {"last": 52.5}, "wall_time_s": 1.0, "peak_memory_mb": 1.0})

    log = events(tmp_path)
    assert [e["event"] for e in log] == ["config", "zero_shot", *["step"] * 4, "task", "resume", *["step"] * 4,
                                         "task", "end"]
    assert [e["global_step"] for e in log if e["event"] == "step"] == list(range(1, 9))
    assert log[7] == {**log[7], "completed_tasks": 1, "global_step": 4}
    assert [e["metrics"]["last"] for e in log if e["event"] == "task"] == [50.0, 52.5]  # (45 + 60) / 2
    reader = EventAccumulator(str(tmp_path / "tensorboard"))
    reader.Reload()
    loss = reader.Scalars("loss/total")  # step 5 of the lost attempt (9.0) purged
    assert [s.step for s in loss] == list(range(1, 9))
    assert [s.value for s in loss] == pytest.approx([4.0, 3.0, 2.0, 1.0, 1.0, 1 / 2, 1 / 3, 1 / 4])


# --- the logging: section -------------------------------------------------------------------------
@pytest.mark.parametrize(("logging", "message"), [
    ({"trackers": ["comet"]}, "logging.trackers"),
    ({"trackers": ["wandb", "wandb"]}, "each tracker once"),
    ({"every": 0}, "logging.every"),
    ({"project": " "}, "logging.project"),
    ({"wandb_mode": "cloud"}, "logging.wandb_mode"),
    ({"mlflow": True}, "'mlflow'"),
])
def test_logging_section_is_validated_naming_the_key(logging, message) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, {"logging": logging})


def test_a_missing_tracker_package_fails_before_training(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    check_trackers(LoggingConfig(trackers=["tensorboard"]))
    with pytest.raises(ConfigError, match=r"wandb not installed; pip install 'continual-lora\[tracking\]'"):
        check_trackers(LoggingConfig(trackers=["tensorboard", "wandb"]))


def test_non_finite_step_values_are_null_in_the_file_and_not_sent_to_trackers(tmp_path) -> None:
    from continual_lora.app.tracking import RunLogger, Tracker
    from continual_lora.continual import StepLog

    class Recorder(Tracker):
        def __init__(self) -> None:
            self.seen: list[dict[str, float]] = []

        def log(self, values, step) -> None:
            self.seen.append(values)

    logger = RunLogger(tmp_path, LoggingConfig(), name="x", label="m", store=tmp_path, config={}, protocol="mtil")
    recorder = Recorder()
    logger.trackers = [recorder]
    # an fp16 step the loss scaler skipped: non-finite loss and gradient norm
    logger.step(StepLog("a", 0, 1, 1, float("inf"), float("nan"), {"ago": float("-inf")}, 1e-3, float("nan")))
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    event = json.loads(line)  # strict JSON: no NaN / Infinity literals
    assert "NaN" not in line and "Infinity" not in line
    assert event["loss"] is event["task_loss"] is event["grad_norm"] is event["terms"]["ago"] is None
    assert recorder.seen == [{"train/lr": 1e-3}]


def test_a_torn_last_line_is_dropped_when_a_run_resumes(tmp_path) -> None:
    from continual_lora.app.tracking import RunLogger
    from continual_lora.continual import RunState

    good = [{"event": "config", "config": {}}, {"event": "task", "task": "a", "task_index": 0},
            {"event": "step", "task": "b", "task_index": 1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in good) + '{"event": "st')
    logger = RunLogger(tmp_path, LoggingConfig(), name="x", label="m", store=tmp_path, config={}, protocol="mtil")
    state = RunState(tasks=["a", "b"], zero_shot=[1.0, 2.0], matrix=[[1.0, 2.0]], task_steps=[3])
    logger.start(state)  # one task completed: its events stay, task b's and the torn line go
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["config", "task", "resume"]
