"""Failure modes: bad input and misuse give one-line errors (exit 2, no traceback), never silent wrong
results, and no finished work is lost. Most runs use conftest's ``synthetic`` benchmark through the
CLI in-process (seconds each); two go through a real subprocess to check exit codes and stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import TASKS, TRAIN, adapt, clip_out, make_tiny_clip, module_types, run_stream

from continual_lora.adapters import load_adapter, merge, save_adapter, set_task, unmerge, use_task
from continual_lora.app.runner import RunConfig
from continual_lora.cli import main
from continual_lora.config import ConfigError, from_dict
from continual_lora.continual import read_checkpoint
from continual_lora.errors import CheckpointError, DivergenceError, RunDirError, UserError
from continual_lora.methods import build_method
from continual_lora.methods.seq_lora import SeqLoRA

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``continual-lora argv`` run in this process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def run_dir(tmp_path: Path, method: str = "seq_lora") -> Path:
    return tmp_path / "synth" / method


# --- 1. divergence ---------------------------------------------------------------------------------
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(synthetic, tmp_path, capsys) -> None:
    code, _, err = cli(capsys, "run", synthetic, f"output_dir={tmp_path}", "benchmark.nan_task=1")
    assert code == 2
    one_line_error(err, "training diverged on task 'beta' (2/2)", "the loss is nan", "after task 1 ('alpha') is kept")
    state = read_checkpoint(run_dir(tmp_path))  # verifies every file's SHA-256 as well
    assert state is not None and state.completed == 1 and state.tasks == ["alpha", "beta"]
    weights = load_file(str(run_dir(tmp_path) / "checkpoint" / "method" / "adapter_model.safetensors"))
    assert weights and all(bool(torch.isfinite(t).all()) for t in weights.values())  # task 1's good weights
    results = json.loads((run_dir(tmp_path) / "results.json").read_text())  # (strict JSON: no NaN literal)
    assert results["finished"] is False and len(results["matrix"]) == 1

    code, _, err = cli(capsys, "run", synthetic, f"output_dir={tmp_path}/lr", "train.lr=1e6")
    assert code == 2
    one_line_error(err, "training diverged on task 'alpha' (1/2)", "no checkpoint was written")
    assert not (tmp_path / "lr" / "synth" / "seq_lora" / "results.json").exists()


def test_non_finite_weights_after_the_last_step_are_divergence_too(clip_stream, tmp_path) -> None:
    class Poison(SeqLoRA):  # every loss is finite, but the last update of task 2 leaves NaN weights
        steps = 0

        def after_step(self, model):
            self.steps += 1
            if self.steps == 2 * TRAIN.iterations:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    kind, base = clip_stream
    with pytest.raises(DivergenceError, match="task 'beta' .*tensors are not finite"):
        run_stream(base, Poison(build_method("seq_lora", rank=2).config), kind, TASKS, TRAIN, tmp=tmp_path)
    assert read_checkpoint(tmp_path).completed == 1


# --- 2. resume with another config ---------------------------------------------------------------------
def test_resume_refuses_a_changed_config_unless_the_change_is_allowed(synthetic, tmp_path, capsys) -> None:
    cli(capsys, "run", synthetic, f"output_dir={tmp_path}", "benchmark.nan_task=1")  # stops after task 1
    code, _, err = cli(capsys, "run", synthetic, f"output_dir={tmp_path}", "train.lr=0.5", "--resume")
    assert code == 2
    one_line_error(err, "written with another config", "benchmark.nan_task 1 -> None", "train.lr 0.002 -> 0.5",
                   "--allow-change")
    code, _, err = cli(capsys, "run", synthetic, f"output_dir={tmp_path}", "methods.seq_lora.rank=4", "--resume",
                       "--allow-change", "benchmark.nan_task")
    assert code == 2
    one_line_error(err, "methods.seq_lora.rank 2 -> 4")
    code, out, err = cli(capsys, "run", synthetic, f"output_dir={tmp_path}", "--resume", "train.progress=true",
                         "--allow-change", "benchmark.nan_task")
    assert code == 0, err
    assert "[seq_lora] resuming at task 2/2" in out
    results = json.loads((run_dir(tmp_path) / "results.json").read_text())
    assert results["finished"] and results["config"]["benchmark"]["nan_task"] is None


# --- 3. one run per directory ----------------------------------------------------------------------------
def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_replaced(synthetic, tmp_path, capsys) -> None:
    lock = tmp_path / "synth" / ".seq_lora.lock"
    lock.parent.mkdir(parents=True)
    import socket

    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    code, _, err = cli(capsys, "run", synthetic, f"output_dir={tmp_path}")
    assert code == 2
    one_line_error(err, "is in use by PID", str(os.getpid()), ".seq_lora.lock")
    assert not run_dir(tmp_path).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}))
    code, _, err = cli(capsys, "run", synthetic, f"output_dir={tmp_path}")
    assert code == 0, err
    assert not lock.exists()  # released at the end


# --- 4 / 11. values that would train wrongly or crash later ----------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("train.max_grad_norm=-1", "train.max_grad_norm"), ("logit_scale=-100", "logit_scale"),
    ("train.lr=.nan", "train.lr"), ("train.lr=.inf", "train.lr"), ("train.weight_decay=-1", "train.weight_decay"),
    ("train.min_lr=1.0", "train.min_lr"), ("train.device=tpu", "train.device"),
])
def test_bad_values_are_refused_before_anything_is_written(synthetic, tmp_path, capsys, override, key) -> None:
    code, _, err = cli(capsys, "run", synthetic, f"output_dir={tmp_path}", override)
    assert code == 2
    one_line_error(err, key)
    assert not (tmp_path / "synth").exists()


def test_mtil_mini_values_that_used_to_crash_late(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"benchmark.domains must list some of"):
        from_dict(RunConfig, {"benchmark": {"domains": []}})
    from continual_lora.app.runner import run_settings
    from continual_lora.benchmarks import BENCHMARKS

    config = from_dict(RunConfig, {"benchmark": {"image_size": 30}})
    with pytest.raises(ConfigError, match="benchmark.image_size is 30 but the small CLIP takes pretrain.image_size=32"):
        BENCHMARKS["mtil-mini"].check(config.benchmark, run_settings(config))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_config_error(synthetic, tmp_path, capsys) -> None:
    code, _, err = cli(capsys, "run", synthetic, f"output_dir={tmp_path}", "train.device=cuda")
    assert code == 2
    one_line_error(err, "train.device=cuda", "no CUDA device")


# --- 5. adapter misuse ---------------------------------------------------------------------------------
def test_selecting_another_task_while_one_is_merged_is_an_error() -> None:
    model = adapt(make_tiny_clip(), tasks=("t1", "t2"), seed=3)
    with use_task(model, "t1"):
        t1 = clip_out(model)
    merge(model, "t1")
    with pytest.raises(RuntimeError, match="task 't1' merged into its weights.*unmerge"):
        set_task(model, "t2")
    with pytest.raises(RuntimeError, match="unmerge"):
        with use_task(model, "t2"):
            pass
    set_task(model, "t1")  # the merged task itself: fine
    torch.testing.assert_close(clip_out(model), t1, atol=1e-5, rtol=0)
    unmerge(model)
    set_task(model, "t2")


def test_an_adapter_saved_while_merged_loads_as_the_unmerged_adapters(tmp_path) -> None:
    model = adapt(make_tiny_clip(), tasks=("t1", "t2"), seed=4)
    with use_task(model, "t2"):
        t2 = clip_out(model)
    merge(model, "t1")
    save_adapter(model, tmp_path)
    fresh = load_adapter(make_tiny_clip(), tmp_path)
    with use_task(fresh, "t2"):
        torch.testing.assert_close(clip_out(fresh), t2)


def test_task_selection_on_a_model_without_adapters_is_an_error() -> None:
    with pytest.raises(ValueError, match="no adapters"):
        set_task(make_tiny_clip(), "t1")
    from continual_lora.adapters import add_task

    with pytest.raises(ValueError, match="no adapters"):
        add_task(make_tiny_clip(), "t1")


def test_a_failed_load_leaves_the_model_unchanged(tmp_path) -> None:
    save_adapter(adapt(make_tiny_clip(), rank=4), tmp_path)
    other = make_tiny_clip(hidden=48)
    before = module_types(other)
    with pytest.raises(UserError, match="adapter file has shape"):
        load_adapter(other, tmp_path)
    assert module_types(other) == before and all(p.requires_grad for p in other.parameters())
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match="adapter_model.safetensors is unreadable or corrupt"):
        load_adapter(make_tiny_clip(), tmp_path)


# --- 6. metrics ----------------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("rows, protocol, message", [
    (["after,a,b", "a,50,-1", "b,60,70"], "mtil", "within [0, 100]; R[0][1]"),
    (["after,a,b", "a,50,101", "b,60,70"], "mtil", "within [0, 100]"),
    (["after,a,b", "b,50,40", "a,60,70"], "mtil", "row 1 is labelled 'b'"),
    (["after,a,b", "2,50,40", "1,60,70"], "mtil", "row 1 is labelled '2'"),
    (["after,a,b", "a,-5,40", "b,60,70"], "cvit", "CVIT scores are >= 0"),
])
def test_metrics_refuses_impossible_scores_and_misordered_rows(tmp_path, capsys, rows, protocol, message) -> None:
    code, _, err = cli(capsys, "metrics", write_csv(tmp_path / "m.csv", rows), "--protocol", protocol)
    assert code == 2
    one_line_error(err, message)


def test_metrics_accepts_cider_above_100_and_index_labels(tmp_path, capsys) -> None:
    code, out, _ = cli(capsys, "metrics", write_csv(tmp_path / "m.csv", ["after,a,b", "1,150,40", "2,120,70"]),
                       "--protocol", "cvit")
    assert code == 0 and json.loads(out)["ap"] == 95.0


# --- 7. --overwrite keeps the old run until the new one has a checkpoint ------------------------------------
def test_overwrite_restores_the_old_run_when_the_new_one_fails_before_its_first_checkpoint(
        synthetic, tmp_path, capsys) -> None:
    assert cli(capsys, "run", synthetic, f"output_dir={tmp_path}")[0] == 0
    before = (run_dir(tmp_path) / "results.json").read_text()
    code, _, err = cli(capsys, "run", synthetic, f"output_dir={tmp_path}", "--overwrite", "benchmark.nan_task=0")
    assert code == 2 and "diverged" in err
    assert (run_dir(tmp_path) / "results.json").read_text() == before  # the finished run is back
    assert not (tmp_path / "synth" / ".seq_lora.replaced").exists()
    code, _, err = cli(capsys, "run", synthetic, f"output_dir={tmp_path}", "--overwrite", "train.iterations=1")
    assert code == 0, err
    assert json.loads((run_dir(tmp_path) / "results.json").read_text())["config"]["train"]["iterations"] == 1


# --- 8 / 9. results.json last; --resume finishes what is missing ------------------------------------------
def test_a_kill_while_writing_the_plots_leaves_an_unfinished_run_that_resume_completes(
        synthetic, tmp_path, capsys, monkeypatch) -> None:
    from continual_lora.app import plots

    real = plots.task_curves

    def killed(results, path):
        if results["finished"]:
            raise KeyboardInterrupt  # killed while the last artefacts are written
        real(results, path)

    monkeypatch.setattr(plots, "task_curves", killed)
    code, _, err = cli(capsys, "run", synthetic, f"output_dir={tmp_path}")
    assert code == 130 and "--resume" in err and "Traceback" not in err
    assert json.loads((run_dir(tmp_path) / "results.json").read_text())["finished"] is False
    monkeypatch.setattr(plots, "task_curves", real)
    (run_dir(tmp_path) / "accuracy_matrix.png").unlink()
    code, out, err = cli(capsys, "run", synthetic, f"output_dir={tmp_path}", "--resume")
    assert code == 0, err
    assert "all 2 tasks were already trained" in out
    assert json.loads((run_dir(tmp_path) / "results.json").read_text())["finished"]
    for name in ("accuracy_matrix.csv", "accuracy_matrix.png", "curves.png"):
        assert (run_dir(tmp_path) / name).stat().st_size > 0
    (run_dir(tmp_path) / "curves.png").unlink()
    code, out, _ = cli(capsys, "run", synthetic, f"output_dir={tmp_path}", "--resume")  # finished: artefacts only
    assert code == 0 and "already finished" in out and (run_dir(tmp_path) / "curves.png").exists()


def test_resume_of_a_multi_method_config_skips_finished_methods(synthetic, tmp_path, capsys) -> None:
    synthetic.write_text(synthetic.read_text().replace(
        "methods: [{name: seq_lora, rank: 2, targets: [q_proj, v_proj]}]",
        "methods: [{name: seq_lora, rank: 2, targets: [q_proj, v_proj]}, {name: per_task_lora, rank: 2}]"))
    assert cli(capsys, "run", synthetic, f"output_dir={tmp_path}", "--method", "seq_lora")[0] == 0
    code, out, err = cli(capsys, "run", synthetic, f"output_dir={tmp_path}", "--resume")
    assert code == 0, err
    assert "[seq_lora] already finished" in out and "[per_task_lora] --resume: no checkpoint" in out
    assert json.loads((run_dir(tmp_path, "per_task_lora") / "results.json").read_text())["finished"]


# --- 10. unreadable input ------------------------------------------------------------------------------------
def test_unreadable_configs_are_one_line_errors(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1\nname: x\n")
    code, _, err = cli(capsys, "run", bad)
    assert code == 2
    one_line_error(err, "bad.yaml is not valid YAML (line")
    good = tmp_path / "good.yaml"
    good.write_text("name: x\n")
    code, _, err = cli(capsys, "run", good, "train.lr=[1")
    assert code == 2
    one_line_error(err, "override 'train.lr=[1' is not valid YAML")
    code, _, err = cli(capsys, "run", tmp_path)
    assert code == 2
    one_line_error(err, "is a directory")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    code, _, err = cli(capsys, "run", latin)
    assert code == 2
    one_line_error(err, "not a UTF-8 text file")
    for path, message in ((tmp_path, "is a directory"), (latin, "not a UTF-8"), (tmp_path / "none.csv", "no such file")):
        code, _, err = cli(capsys, "metrics", path)
        assert code == 2
        one_line_error(err, message)


# --- 12. corrupt checkpoints and caches -----------------------------------------------------------------------
@pytest.mark.parametrize("damage, message", [
    ("truncate", "is missing or does not match the SHA-256"),
    ("flip", "is missing or does not match the SHA-256"),
    ("state", "state.json is unreadable or corrupt"),
])
def test_a_damaged_checkpoint_is_named_with_the_remedy(synthetic, tmp_path, capsys, damage, message) -> None:
    cli(capsys, "run", synthetic, f"output_dir={tmp_path}", "benchmark.nan_task=1")  # checkpoint after task 1
    ckpt = run_dir(tmp_path) / "checkpoint"
    weights = ckpt / "method" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":  # same size: only the recorded SHA-256 notices
        data[-3] ^= 0x01
        weights.write_bytes(bytes(data))
    else:
        (ckpt / "state.json").write_text("{\"tasks\": [")
    code, _, err = cli(capsys, "run", synthetic, f"output_dir={tmp_path}", "--resume", "--allow-change", "benchmark")
    assert code == 2
    one_line_error(err, message, "--overwrite")


def test_a_corrupt_cache_entry_is_rebuilt(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CONTINUAL_LORA_CACHE", str(tmp_path))
    from continual_lora.data.domains import load_domain

    first = load_domain("digits", 16)
    (entry,) = (tmp_path / "data").glob("digits-16px-*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="cache entry .*digits-16px.* is unreadable"):
        again = load_domain("digits", 16)
    assert torch.equal(first.train_images, again.train_images)


# --- 13. compare ---------------------------------------------------------------------------------------------
def test_compare_error_paths(synthetic, tmp_path, capsys) -> None:
    cli(capsys, "run", synthetic, f"output_dir={tmp_path}/done")
    cli(capsys, "run", synthetic, f"output_dir={tmp_path}/partial", "benchmark.nan_task=1")
    done, partial = tmp_path / "done" / "synth" / "seq_lora", tmp_path / "partial" / "synth" / "seq_lora"
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "results.json").write_text("{")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    cases = [
        ([tmp_path / "runs" / "x" / "*"], "does not exist"),
        ([partial], "the run is not finished"),
        ([corrupt], "results.json is unreadable or corrupt"),
        ([tmp_path], "no results.json"),
        ([plain], "no run directories among"),
        ([done, "--plot", tmp_path / "nodir" / "plot.png"], "cannot write the comparison plot"),
    ]
    for args, message in cases:
        code, _, err = cli(capsys, "compare", *args)
        assert code == 2, (args, err)
        one_line_error(err, message)
    assert cli(capsys, "compare", done)[0] == 0


# --- 14. pretrain from a run config ------------------------------------------------------------------------------
def test_pretrain_reads_the_pretrain_section_of_a_run_config(tmp_path, capsys, monkeypatch) -> None:
    from continual_lora.models import small_clip

    seen = []
    monkeypatch.setattr(small_clip, "pretrain", lambda cfg, progress=True: seen.append(cfg) or tmp_path)
    root = Path(__file__).resolve().parents[1]
    assert cli(capsys, "pretrain", root / "configs" / "demo.yaml")[0] == 0  # no pretrain section: the defaults
    assert cli(capsys, "pretrain", root / "configs" / "demo.yaml", "pretrain.steps=5")[0] == 0
    bare = tmp_path / "bare.yaml"
    bare.write_text("steps: 7\n")
    assert cli(capsys, "pretrain", bare)[0] == 0
    assert [c.steps for c in seen] == [small_clip.PretrainConfig().steps, 5, 7]


# --- 15. the command line itself -----------------------------------------------------------------------------------
def test_options_may_follow_overrides(synthetic, tmp_path, capsys) -> None:
    code, out, err = cli(capsys, "run", synthetic, f"output_dir={tmp_path}", "--method", "seq_lora", "name=mixed")
    assert code == 0, err
    assert (tmp_path / "mixed" / "seq_lora" / "results.json").exists()


def test_expected_errors_exit_2_and_bugs_keep_their_traceback(synthetic, tmp_path, capsys, monkeypatch) -> None:
    from continual_lora.app import runner

    for error in (ConfigError("bad key"), RunDirError("locked"), CheckpointError("corrupt"),
                  DivergenceError("diverged")):
        monkeypatch.setattr(runner, "run_method", lambda *a, error=error, **k: (_ for _ in ()).throw(error))
        code, _, err = cli(capsys, "run", synthetic, f"output_dir={tmp_path}")
        assert code == 2
        one_line_error(err, str(error))

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a real bug")

    monkeypatch.setattr(runner, "run_method", bug)
    with pytest.raises(ZeroDivisionError):
        main(["run", str(synthetic), f"output_dir={tmp_path}"])


def test_in_a_real_process_errors_are_one_line_and_ctrl_c_says_how_to_resume(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: -1}\n")
    proc = subprocess.run([sys.executable, "-m", "continual_lora.cli", "run", str(bad)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: ") and "train.lr" in proc.stderr
    script = ("import sys, continual_lora.cli as c, continual_lora.app.runner as r\n"
              "def stop(*a, **k): raise KeyboardInterrupt\n"
              "r.run_method = stop\n"
              f"sys.exit(c.main(['run', {str(tmp_path / 'x.yaml')!r}]))\n")
    (tmp_path / "x.yaml").write_text("name: x\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr
    assert "interrupted" in proc.stderr and "--resume" in proc.stderr


# --- also: what results.json records ------------------------------------------------------------------------------
def test_results_record_the_base_model_fingerprint_and_the_thread_count(synthetic, tmp_path, capsys) -> None:
    assert cli(capsys, "run", synthetic, f"output_dir={tmp_path}")[0] == 0
    results = json.loads((run_dir(tmp_path) / "results.json").read_text())
    assert len(results["base_model"]) == 12 and results["threads"] == torch.get_num_threads()
    assert cli(capsys, "run", synthetic, f"output_dir={tmp_path}/again")[0] == 0
    again = json.loads((tmp_path / "again" / "synth" / "seq_lora" / "results.json").read_text())
    assert again["base_model"] == results["base_model"]
