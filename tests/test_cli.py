"""The public CLI: metrics, config validation, every shipped YAML, and one real end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from continual_lora.app.runner import RunConfig, build_methods
from continual_lora.cli import load_yaml, main
from continual_lora.config import ConfigError, from_dict, to_dict

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- metrics command --------------------------------------------------------------------------
def test_metrics_command_prints_json(tmp_path, capsys) -> None:
    csv = write(tmp_path / "m.csv", "after,a,b\na,80,40\nb,70,90\n")
    assert main(["metrics", str(csv)]) == 0
    out = json.loads(capsys.readouterr().out)
    # transfer = R[1,2] = 40; average = 70; last = 80; bwt = 70 - 80 = -10; forgetting = 10
    assert out == {"transfer": 40.0, "average": 70.0, "last": 80.0, "bwt": -10.0, "forgetting": 10.0}
    assert main(["metrics", str(csv), "--protocol", "cvit"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"ap": 80.0, "map": 80.0, "bwt": -10.0}  # map = (80 + (70 + 90) / 2) / 2


@pytest.mark.parametrize("text", ["", "a,b\n1,2\n", "a,b\n1,x\n3,4\n", "a,b\n1,2\n3\n"])
def test_metrics_command_malformed_exits_2_with_one_line(tmp_path, capsys, text) -> None:
    csv = write(tmp_path / "bad.csv", text)
    assert main(["metrics", str(csv)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_metrics_command_missing_file_exits_2(tmp_path, capsys) -> None:
    assert main(["metrics", str(tmp_path / "nope.csv")]) == 2


# --- config validation ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=0.1", "train.'lrr'"),
        ("train.lr=-1", "train.lr"),
        ("train.batch_size=abc", "train.batch_size"),
        ("benchmark.order=III", "benchmark.order"),
        ("methods.seq_lora.rank=0", "rank"),
        ("methods.seq_lora.rnak=4", "methods.seq_lora.'rnak'"),
        ("methods.nosuch.rank=4", "no method 'nosuch'"),
        ("methods.seq_lora.train.lrr=0.1", "methods.seq_lora.train.'lrr'"),
        ("methods.seq_lora.train.lr=-1", "methods.seq_lora.train"),
        ("methods.seq_lora.train=5", "methods.seq_lora.train must be a mapping"),
        ("colour=blue", "'colour'"),
    ],
)
def test_bad_config_fails_before_training_naming_the_key(tmp_path, capsys, override, message) -> None:
    cfg = write(tmp_path / "c.yaml", "name: t\nmethods:\n  - name: seq_lora\n")
    assert main(["run", str(cfg), override, f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "t").exists()  # nothing was written


def test_unknown_method_name_is_rejected(tmp_path, capsys) -> None:
    cfg = write(tmp_path / "c.yaml", "methods:\n  - name: nosuch\n")
    assert main(["run", str(cfg)]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_loads(path) -> None:
    if path.parent.name == "accelerate":  # launcher configs: `accelerate launch --config_file <path>`
        from accelerate.commands.config.config_args import ClusterConfig

        cluster = ClusterConfig.from_yaml_file(str(path))
        machines, processes = {"multi_gpu_8": (1, 8), "multi_node_64": (8, 64), "single_gpu": (1, 1),
                               "zero2_8gpu": (1, 8), "zero3_8gpu": (1, 8), "zero3_64gpu": (8, 64)}[path.stem]
        assert (cluster.num_machines, cluster.num_processes) == (machines, processes)
        assert cluster.mixed_precision == "no"  # precision is train.precision
        return
    data = load_yaml(path)
    if "methods" in data or "benchmark" in data or "train" in data:
        config = from_dict(RunConfig, data)
        assert build_methods(config)
        assert from_dict(RunConfig, json.loads(json.dumps(to_dict(config)))) == config  # results.json -> export
    else:
        pytest.fail(f"{path} is not a run config")


def test_demo_ships_each_methods_tuned_settings() -> None:
    """configs/demo.yaml runs each method as configs/mtil-mini/<method>.yaml does: same benchmark, same
    train section after the method's own train keys (its learning rate chosen on validation data)."""
    demo = from_dict(RunConfig, load_yaml(ROOT / "configs/demo.yaml"))
    for entry in demo.methods:
        alone = from_dict(RunConfig, load_yaml(ROOT / "configs/mtil-mini" / f"{entry['name']}.yaml"))
        assert demo.benchmark == alone.benchmark and demo.pretrain == alone.pretrain
        assert demo.for_method(entry["name"]).train == alone.for_method(entry["name"]).train, entry["name"]
        label = entry["name"]
        assert build_methods(demo)[label].config == build_methods(alone)[label].config, label


def test_overrides_reach_nested_and_method_keys(tmp_path) -> None:
    cfg = write(tmp_path / "c.yaml", "methods:\n  - name: lilora\n    rank: 8\n")
    data = load_yaml(cfg, ["train.iterations=7", "methods.lilora.rank=4", "benchmark.shots=null", "train.lr=2e-3"])
    config = from_dict(RunConfig, data)
    assert config.train.iterations == 7 and config.benchmark.shots is None
    assert config.train.lr == 0.002  # "2e-3" is a float here, although YAML 1.1 reads it as a string
    assert build_methods(config)["lilora"].config.rank == 4
    own = from_dict(RunConfig, load_yaml(cfg, ["methods.lilora.train.lr=5e-3", "train.iterations=7"]))
    assert own.train.lr == 2e-3 and own.for_method("lilora").train.lr == 5e-3  # the method's own train keys
    assert own.for_method("lilora").train.iterations == 7  # the rest from the run's train section
    with pytest.raises(ConfigError, match="not key=value"):
        load_yaml(cfg, ["rank4"])


# --- the real thing: `continual-lora run` end to end on two small real tasks --------------------
TINY = """
name: e2e
benchmark: {domains: [digits, shapes_crop], shots: 3, max_test_per_task: 40}
pretrain: {steps: 8, batch_size: 16, warmup: 2, vision_layers: 1, text_layers: 1, vision_width: 32, text_width: 32,
           vision_heads: 2, text_heads: 2, vision_mlp: 64, text_mlp: 64, projection_dim: 16, eval_domains: [digits, shapes_crop]}
train: {iterations: 3, batch_size: 8, progress: false}
methods:
  - {name: seq_lora, rank: 2}
  - {name: lilora, rank: 2, inner_rank: 1, alpha: 4.0, train: {lr: 4.0e-3}}
"""


def test_cli_run_end_to_end(tmp_path) -> None:
    cfg = write(tmp_path / "tiny.yaml", TINY)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CONTINUAL_LORA_CACHE": os.environ.get(
        "CONTINUAL_LORA_TEST_CACHE", str(tmp_path / "cache"))}
    cmd = [sys.executable, "-m", "continual_lora.cli", "run", str(cfg), f"output_dir={tmp_path}/runs"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| seq_lora |" in proc.stdout and "| lilora |" in proc.stdout
    for method in ("seq_lora", "lilora"):
        run_dir = tmp_path / "runs" / "e2e" / method
        res = json.loads((run_dir / "results.json").read_text())
        for key in ("method", "tasks", "zero_shot", "matrix", "metrics", "params", "wall_time_s",
                    "peak_memory_mb", "config", "versions", "seed"):
            assert key in res, key
        assert res["method"] == method and res["tasks"] == ["digits", "shapes_crop"]
        lr = 4e-3 if method == "lilora" else 2e-3  # lilora's own train: {lr} replaces the run's for it alone
        assert res["config"]["train"]["lr"] == lr and res["config"]["pretrain"]["mix"] == "v2"
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert next(e for e in steps if e["event"] == "step")["lr"] == pytest.approx(lr)
        assert len(res["matrix"]) == 2 and all(len(r) == 2 for r in res["matrix"])
        assert set(res["metrics"]) == {"transfer", "average", "last", "bwt", "forgetting"}
        assert res["params"]["trainable"] > 0 and res["peak_memory_mb"] > 0
        for name in ("accuracy_matrix.csv", "accuracy_matrix.png", "curves.png"):
            assert (run_dir / name).stat().st_size > 0
        csv_metrics = subprocess.run([sys.executable, "-m", "continual_lora.cli", "metrics",
                                      str(run_dir / "accuracy_matrix.csv")], capture_output=True, text=True)
        assert json.loads(csv_metrics.stdout) == pytest.approx(res["metrics"], abs=1e-3)
    # a finished run is never overwritten silently
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    assert (tmp_path / "runs" / "e2e" / "comparison.png").exists()
    # the README's `continual-lora compare runs/<name>/*`: the glob also matches comparison.png
    glob = sorted(str(p) for p in (tmp_path / "runs" / "e2e").iterdir())
    compared = subprocess.run([sys.executable, "-m", "continual_lora.cli", "compare", *glob],
                              capture_output=True, text=True, env=env, timeout=120)
    assert compared.returncode == 0, compared.stderr[-2000:]
    assert "| seq_lora |" in compared.stdout and "| lilora |" in compared.stdout
    missing = subprocess.run([sys.executable, "-m", "continual_lora.cli", "compare", str(tmp_path)],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode != 0 and "not a run directory" in missing.stderr
