"""The ``sipo-fast`` command line: help everywhere, clean errors, and the smoke pipeline end to end in
subprocesses: a full run, a no-op rerun, a run killed mid-stage and resumed to the same artifacts, and a
changed config that re-runs only the stages it affects."""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sipo_fast.cli import STAGE_COMMANDS, main

ENTRY = Path(sys.executable).with_name("sipo-fast")
SMOKE = ["--preset", "smoke", "--no-progress"]


def cli(*args, env=None, timeout=600):
    cmd = [str(ENTRY)] if ENTRY.exists() else [sys.executable, "-m", "sipo_fast.cli"]
    # The subprocess trains with as many threads as this process (conftest sets them), whatever OMP_NUM_THREADS
    # says: artifacts compared across the two must come from the same float reduction order.
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **threads, **(env or {})})


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


# ------------------------------------------------------------------------------------------ fast checks


@pytest.mark.parametrize("command", ["run", "demo", "status", "config", "eval", "env", *STAGE_COMMANDS])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: sipo-fast " + command in capsys.readouterr().out


def test_help_does_not_import_torch():
    code = "import sys, sipo_fast.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_config_prints_the_resolved_yaml_with_overrides(capsys):
    assert main(["config", "--preset", "smoke", "sample.max_new_tokens=5", "--", "refine.enabled=false"]) == 0
    out = capsys.readouterr().out
    assert "max_new_tokens: 5" in out and "enabled: false" in out and "name: tiny" in out


def test_overrides_may_follow_options():
    from sipo_fast.cli import _parse

    args = _parse(["run", "--preset", "smoke", "sample.batch_size=2", "--force", "sample.max_new_tokens=3"])
    assert args.overrides == ["sample.batch_size=2", "sample.max_new_tokens=3"] and args.force
    with pytest.raises(SystemExit):
        _parse(["run", "--bogus"])


@pytest.mark.parametrize("args,match", [
    (["run", "--preset", "nope"], "unknown preset 'nope'"),
    (["run", "--preset", "smoke", "sample.weights=[1.5]"], "off the simplex"),
    (["run", "--preset", "smoke", "data.objectives=[helpful, funny]"], "unknown objective"),
    (["sample", "--preset", "smoke"], "needs ['align'] done first"),
])
def test_bad_input_fails_fast_with_a_message_and_no_traceback(args, match, tmp_path, capsys):
    assert main(args + ["--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_foreign_output_dir_is_refused(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("not a run")
    assert main(["run", "--preset", "smoke", "--output-dir", str(tmp_path)]) == 2
    assert "not a sipo_fast run directory" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").exists()


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("smoke") / "clean"
    proc = cli("run", *SMOKE, "--output-dir", run)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run, proc


def test_smoke_pipeline_end_to_end_through_the_cli(smoke_run):
    run, proc = smoke_run
    stages = manifest(run)["stages"]
    assert set(stages) == {"align", "sample", "refine", "filter", "finetune", "eval"}
    f = stages["filter"]["summary"]
    n = stages["sample"]["summary"]["conflicting_prompts"]
    assert 1 <= n <= 4 and f["conflicting_prompts"] == n
    assert f["candidates"] == 2 * n  # one candidate per prompt and weight
    assert f["survivors"] <= f["candidates"] and f["prompts_covered"] <= f["conflicting_prompts"]
    assert f["pairs"] == 2 * f["prompts_covered"]
    assert f["reward_models"] == ["helpful", "harmless", "soup0", "soup1"]
    assert stages["finetune"]["summary"]["pairs"] == f["pairs"]
    for obj in ("helpful", "harmless"):
        assert (run / "align" / "policies" / obj / "adapter_model.safetensors").exists()
        assert (run / "finetune" / "policies" / obj / "adapter_model.safetensors").exists()
        assert "eval_loss" in stages["align"]["summary"]["metrics"][obj]
    assert (run / "eval" / "report.md").exists() and (run / "eval" / "sweeps" / "sipo.json").exists()
    assert f"filter: {2 * n} candidates" in proc.stdout and "## Hypervolume" in proc.stdout
    for stage in ("align", "sample", "refine", "filter", "finetune", "eval"):
        assert f"[sipo] {stage}: done" in proc.stderr
    assert not list((run / ".work").glob("align*")), "work directories are cleared once a stage commits"


def run_main(caplog, *args) -> int:
    """The CLI in this process (imports already warm), with the pipeline's log captured."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sipo_fast"):
        return main([str(a) for a in args])


def test_rerun_skips_every_finished_stage(smoke_run, caplog):
    run, _ = smoke_run
    before = manifest(run)
    assert run_main(caplog, "run", *SMOKE, "--output-dir", run) == 0
    assert caplog.text.count("up to date, skipping") == 6
    assert manifest(run)["stages"] == before["stages"]


def _forget(run: Path, stages: list[str]) -> None:
    """Make a copied run look as if ``stages`` never ran."""
    data = manifest(run)
    for s in stages:
        data["stages"].pop(s, None)
        shutil.rmtree(run / s, ignore_errors=True)
    (run / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("stage,first_part,later_part", [
    ("align", "policies/helpful/adapter_model.safetensors", "policies/harmless"),
    ("sample", "parts/b0.jsonl", "parts/b1.jsonl"),
    ("refine", "parts/w0.jsonl", "parts/w1.jsonl"),
])
def test_killed_mid_stage_resumes_to_the_same_artifacts(smoke_run, tmp_path, caplog, stage, first_part, later_part):
    """Kill a stage right after its first part is saved (os._exit, as a SIGKILL would), then resume: the finished
    part is reused, the rest is done, and the artifact equals the uninterrupted run's (so every later stage gets
    the same inputs and the same fingerprint)."""
    clean, _ = smoke_run
    run = tmp_path / "killed"
    shutil.copytree(clean, run)
    order = ["align", "sample", "refine", "filter", "finetune", "eval"]
    _forget(run, order[order.index(stage):])
    proc = cli("run", *SMOKE, "--output-dir", run, env={"SIPO_FAST_CRASH_AFTER": f"{stage}:1"})
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert stage not in manifest(run)["stages"]
    assert (run / ".work" / stage / first_part).exists() and not (run / ".work" / stage / later_part).exists()

    assert run_main(caplog, stage, *SMOKE, "--output-dir", run) == 0
    assert f"{stage}: running (resuming an unfinished run)" in caplog.text
    assert f"{stage}: reusing" in caplog.text and first_part in caplog.text
    if stage == "align":
        assert "DPO for objective 'helpful'" not in caplog.text  # not trained twice
        assert "DPO for objective 'harmless'" in caplog.text
    got, want = manifest(run)["stages"][stage], manifest(clean)["stages"][stage]
    assert got["artifact"] == want["artifact"] and got["fingerprint"] == want["fingerprint"]
    assert not (run / ".work" / stage).exists()


def test_changed_config_reruns_only_the_affected_stages(smoke_run, tmp_path, caplog, capsys):
    clean, _ = smoke_run
    run = tmp_path / "changed"
    shutil.copytree(clean, run)
    assert run_main(caplog, "run", *SMOKE, "--output-dir", run, "finetune.learning_rate=0.002") == 0
    for stage in ("align", "sample", "refine", "filter"):
        assert f"{stage}: up to date, skipping" in caplog.text
    assert "finetune: running (config changed: finetune.learning_rate: 0.001 -> 0.002)" in caplog.text
    assert "eval: running (its input changed: finetune)" in caplog.text
    before, after = manifest(clean)["stages"], manifest(run)["stages"]
    assert all(after[s] == before[s] for s in ("align", "sample", "refine", "filter"))
    assert after["finetune"]["fingerprint"] != before["finetune"]["fingerprint"]

    capsys.readouterr()
    status = [a for a in SMOKE if a != "--no-progress"]
    assert main(["status", *status, "--output-dir", str(run), "finetune.learning_rate=0.002"]) == 0
    assert capsys.readouterr().out.count(" done ") == 6
    assert main(["status", *status, "--output-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "finetune  stale     config changed: finetune.learning_rate: 0.002 -> 0.001" in out
    assert "sample    done" in out


def test_single_stage_command_reruns_one_stage(smoke_run, tmp_path, caplog):
    clean, _ = smoke_run
    run = tmp_path / "single"
    shutil.copytree(clean, run)
    assert run_main(caplog, "filter", *SMOKE, "--output-dir", run) == 0
    assert "filter: up to date, skipping" in caplog.text
    assert run_main(caplog, "filter", *SMOKE, "--output-dir", run, "--rerun") == 0
    assert "filter: running (rerun requested)" in caplog.text
    assert "sample:" not in caplog.text  # no other stage touched
    assert manifest(run)["stages"]["filter"]["artifact"] == manifest(clean)["stages"]["filter"]["artifact"]


# ------------------------------------------------------------------------------------------ issue 14: errors, status


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("args,match", [
    (["run", "--preset", "smoke", "--config", "{tmp}/nope.yaml"], "--config {tmp}/nope.yaml: no such file"),
    (["run", "--config", "{tmp}"], "--config {tmp}: is a directory"),
    (["run", "--config", "{tmp}/bad.yaml"], "--config {tmp}/bad.yaml:3:1: YAML syntax error"),
    (["config", "--config", "{tmp}/bad.yaml"], "YAML syntax error"),
    (["run", "--preset", "smoke", "align.use_lora=nope"], "align.use_lora must be true or false"),
    (["run", "--preset", "smoke", "sample.max_new_tokens=2.5"], "sample.max_new_tokens must be a whole number"),
    (["run", "--preset", "smoke", "align.max_steps=0"], "align.max_steps=0"),
    (["run", "--preset", "smoke", "sample.weights=[0.3"], "not valid YAML"),
    (["run", "--preset", "smoke", "--output-dir", "{tmp}/file"], "is a file, not a directory"),
    (["status", "--output-dir", "{tmp}/missing"], "{tmp}/missing: no such directory"),
    (["status", "--output-dir", "{tmp}/file"], "is a file, not a run directory"),
    (["status", "--output-dir", "{tmp}"], "is not a sipo_fast run directory"),
    (["repair", "--output-dir", "{tmp}"], "is not a sipo_fast run directory"),
    # the probe's late failures (issue 14, class 4), now caught before any stage
    (["run", "--preset", "smoke", "--output-dir", "{tmp}/r", "align.target_modules=q_proj"],
     "align.target_modules must be a list"),
    (["run", "--preset", "smoke", "--output-dir", "{tmp}/r", "data.source={tmp}/null.jsonl", "eval.enabled=false"],
     "data: {tmp}/null.jsonl:1: pref_harmless is null"),
    (["run", "--preset", "smoke", "--output-dir", "{tmp}/r", "data.source={tmp}/empty.jsonl", "eval.enabled=false"],
     "data: {tmp}/empty.jsonl:2: response_1 is empty"),
    (["run", "--preset", "smoke", "--output-dir", "{tmp}/r", "data.source={tmp}/null.jsonl"],
     "eval.scorers: not set, and data.source="),
    (["run", "--preset", "smoke", "--output-dir", "{tmp}/r", "model.name={tmp}/no-model"],
     "model.name='{tmp}/no-model': no such directory"),
    (["run", "--preset", "smoke", "--output-dir", "{tmp}/r", "data.source={tmp}/missing.jsonl", "eval.enabled=false"],
     "data.source='{tmp}/missing.jsonl': no such file or directory"),
    (["run", "--preset", "smoke", "--output-dir", "{tmp}/r", "eval.scorers=[beaver_reward:{tmp}/x, relevance]"],
     "eval.scorers: beaver_reward:{tmp}/x: no such directory"),
])
def test_every_failure_is_one_error_line_and_exit_2(args, match, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("align:\n[\n")
    (tmp_path / "file").write_text("x")
    row = {"prompt": "Q?", "response_0": "A.", "response_1": "B.", "pref_helpful": 1, "pref_harmless": 0}
    (tmp_path / "null.jsonl").write_text(json.dumps({**row, "pref_harmless": None}) + "\n")
    (tmp_path / "empty.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "response_1": ""}) + "\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(args) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines and lines[-1].startswith(f"sipo-fast {args[0]}: error: "), lines
    errors = [line for line in lines if line.startswith(f"sipo-fast {args[0]}: error: ")]
    assert errors == lines[-len(errors):]  # nothing after the error lines (a preflight may give several)
    assert any(match.replace("{tmp}", str(tmp_path)) in line for line in errors), errors
    assert not any("Traceback" in line for line in lines)


def test_unexpected_errors_too_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import sipo_fast.cli as cli_mod

    def boom(args):
        raise KeyError("surprise")

    monkeypatch.setattr(cli_mod, "_status", boom)
    assert main(["status", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == ["sipo-fast status: error: KeyError: 'surprise' (a bug? run with --debug for the "
                                "traceback)"]
    assert main(["status", "--debug", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and error_lines(err)[-1].startswith("sipo-fast status: error: KeyError")


def test_full_disk_is_an_error_line(tmp_path, capsys, monkeypatch):
    import errno

    from sipo_fast.pipeline import runner

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "config.yaml"))

    monkeypatch.setattr(runner, "atomic_write_text", full)
    assert main(["run", *SMOKE, "--output-dir", str(tmp_path / "run")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines[-1] == f"sipo-fast run: error: {tmp_path / 'run' / 'config.yaml'}: No space left on device"


def test_preflight_problems_are_one_error_line_each(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "a", "response_0": "b", "response_1": "c", "pref_helpful": 1, '
                     b'"pref_harmless": 0}\n{"prompt": "\xff"}\n')
    assert main(["run", *SMOKE, "--output-dir", str(tmp_path / "run"), f"data.source={data}",
                 "align.target_modules=[q_proj, nope]"]) == 2
    lines = error_lines(capsys.readouterr().err)
    errors = [line for line in lines if line.startswith("sipo-fast run: error: ")]
    assert errors == lines[-len(errors):]  # the error lines end the output
    assert errors[0] == (f"sipo-fast run: error: data: {data}:2: not UTF-8 (byte 0xff at column 13); save the file "
                         "as UTF-8")
    assert errors[1].startswith("sipo-fast run: error: align.target_modules: ['nope'] match no linear layer")
    assert errors[2].startswith("sipo-fast run: error: eval.scorers: not set, and data.source=")
    assert not (tmp_path / "run").exists()


def test_dry_run_resolves_everything_and_writes_nothing(tmp_path, capsys):
    assert main(["run", *SMOKE, "--dry-run", "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "ok: data demo: 12 train / 4 eval pairs" in out and "ok: LoRA r=8" in out
    assert f"dry run: every check passed; nothing was written to {tmp_path / 'run'}" in out
    assert not (tmp_path / "run").exists()


def test_second_run_on_a_directory_in_use_is_refused_naming_the_holder(smoke_run, tmp_path, capsys):
    import socket

    from sipo_fast.pipeline.rundir.lock import RunLock

    clean, _ = smoke_run
    run = tmp_path / "busy"
    shutil.copytree(clean, run)
    before = manifest(run)
    with RunLock(run):
        assert main(["run", *SMOKE, "--output-dir", str(run)]) == 2
        err = error_lines(capsys.readouterr().err)[-1]
        assert f"in use by another sipo-fast run: pid {os.getpid()} on host {socket.gethostname()}" in err
        assert main(["status", "--output-dir", str(run)]) == 0
        assert f"running now: pid {os.getpid()}" in capsys.readouterr().out
    assert manifest(run) == before


def test_status_reads_the_runs_own_config_and_propagates_staleness(smoke_run, tmp_path, capsys):
    clean, _ = smoke_run
    assert main(["status", "--output-dir", str(clean)]) == 0  # no --preset: the run's own config.yaml
    out = capsys.readouterr().out
    assert out.count(" done ") == 6, out
    # an override on top of the run's own config: refine changes, and everything downstream is stale
    assert main(["status", "--output-dir", str(clean), "refine.rewrite_max_new_tokens=5"]) == 0
    out = capsys.readouterr().out
    assert "refine    stale     config changed: refine.rewrite_max_new_tokens: 8 -> 5" in out
    for stage in ("filter", "finetune", "eval"):
        assert f"{stage:<9} stale     upstream" in out, out
    assert "align     done" in out and "sample    done" in out


def test_repair_command_rebuilds_a_broken_manifest(smoke_run, tmp_path, capsys):
    clean, _ = smoke_run
    run = tmp_path / "broken"
    shutil.copytree(clean, run)
    before = manifest(run)["stages"]
    (run / "manifest.json").write_text('{"format": 1, "stages": [')
    assert main(["repair", "--output-dir", str(run)]) == 0
    out = capsys.readouterr().out
    for stage in before:
        assert f"{stage}: recovered from {stage}/stage.json" in out
    assert manifest(run)["stages"] == before
    assert main(["status", "--output-dir", str(run)]) == 0
    assert capsys.readouterr().out.count(" done ") == 6


def test_force_on_foreign_directory_deletes_nothing(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("not a run")
    assert main(["run", *SMOKE, "--force", "--output-dir", str(tmp_path)]) == 2
    assert "--force only replaces run directories" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_force_with_bad_data_keeps_the_finished_run(smoke_run, tmp_path, capsys):
    clean, _ = smoke_run
    run = tmp_path / "finished"
    shutil.copytree(clean, run)
    before = manifest(run)
    assert main(["run", *SMOKE, "--force", "--output-dir", str(run), f"data.source={tmp_path / 'nope.jsonl'}",
                 "eval.enabled=false"]) == 2
    assert "error: data:" in capsys.readouterr().err
    assert manifest(run) == before and not list(tmp_path.glob("finished.old-*"))


def test_eval_backend_flag_sets_the_default_for_the_whole_evaluation(monkeypatch):
    """`sipo-fast eval --backend ref` evaluates under use_backend("ref") and restores the default after."""
    from sipo_fast.cli import eval as eval_cli
    from sipo_fast.ops.backend import get_default_backend

    seen = []
    monkeypatch.setattr(eval_cli, "_run", lambda args: seen.append(get_default_backend()) or 0)
    before = get_default_backend()
    assert main(["eval", "--backend", "ref", "--run-dir", "nowhere"]) == 0
    assert seen == ["ref"] and get_default_backend() == before
    with pytest.raises(SystemExit):
        main(["eval", "--backend", "gpu", "--run-dir", "nowhere"])
