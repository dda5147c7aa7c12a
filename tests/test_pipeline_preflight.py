"""Preflight (issue 14, defect class 4 and the data half of 8): every input is resolved before the first stage,
each problem is one line naming the dataset, file:line, model, key or path at fault, and nothing is written."""
import json
import os
import shutil
import time
from collections import namedtuple

import pytest

from sipo_fast.pipeline import preset
from sipo_fast.pipeline.preflight import PreflightError
from sipo_fast.pipeline.runner import SIPOPipeline



def problems(config, out, **kw) -> list[str]:
    with pytest.raises(PreflightError) as exc:
        SIPOPipeline(config, out, progress=False, **kw).preflight()
    return exc.value.problems


def rows(n=12):
    """Normalised rows: half of them conflicting (pref_helpful != pref_harmless)."""
    return [{"prompt": f"Question {i}?", "response_0": f"Answer A{i}.", "response_1": f"Answer B{i}.",
             "pref_helpful": i % 2, "pref_harmless": 0} for i in range(n)]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def test_smoke_preflight_passes_and_writes_nothing(tmp_path):
    facts = SIPOPipeline(preset("smoke"), tmp_path / "run", progress=False).preflight()
    text = "\n".join(facts)
    assert "data demo: 12 train / 4 eval pairs" in text
    assert "LoRA r=8 on ['q_proj', 'k_proj', 'v_proj', 'o_proj']" in text
    assert "scorers ['relevance', 'tone']" in text and "1 process(es)" in text
    assert "evaluation: 3 held-out prompts of demo" in text
    assert f"output {tmp_path / 'run'}: writable" in text
    assert not (tmp_path / "run").exists()


def test_bad_cells_are_named_by_file_and_line(tmp_path):
    items = rows()
    items[2]["pref_helpful"] = 2
    items[4]["pref_harmless"] = None
    items[5]["response_1"] = "   "
    items[7]["pref_helpful"] = "yes"
    path = tmp_path / "d.jsonl"
    write_jsonl(path, items)
    with open(path, "a") as fh:
        fh.write("\n")  # a blank line is skipped but counted, as in an editor
        fh.write(json.dumps(rows(1)[0]) + "\n")
    cfg = preset("smoke").override([f"data.source={path}", "eval.enabled=false"])
    got = problems(cfg, tmp_path / "run")
    assert f"data: {path}:3: pref_helpful=2: a preference must be 0 or 1 (the index of the preferred response)" in got
    assert f"data: {path}:5: pref_harmless is null" in got
    assert f"data: {path}:6: response_1 is empty" in got
    assert f"data: {path}:8: pref_helpful='yes': a preference must be 0 or 1 (the index of the preferred " \
           "response)" in got


def test_non_utf8_and_broken_json_lines_are_named(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r).encode() for r in rows()]
    lines[3] = lines[3].replace(b"Question", b"Qu\xe9stion")  # latin-1, not UTF-8
    lines[6] = b'{"prompt": "unterminated'
    path.write_bytes(b"\n".join(lines) + b"\n")
    cfg = preset("smoke").override([f"data.source={path}", "eval.enabled=false"])
    got = problems(cfg, tmp_path / "run")
    assert any(p.startswith(f"data: {path}:4: not UTF-8 (byte 0xe9 at column") for p in got), got
    assert any(p.startswith(f"data: {path}:7: not valid JSON") for p in got), got


def test_every_problem_at_once_one_line_each(tmp_path, monkeypatch):
    """A wrong LoRA module name, a missing scorer model, a launcher typo and a full disk: all four, one line each."""
    from sipo_fast import distributed

    monkeypatch.setattr(distributed, "_CURRENT", distributed.Dist())  # the process itself stays single
    monkeypatch.setenv("WORLD_SIZE", "two")
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    cfg = preset("smoke").override(["align.target_modules=[q_proj, qkv]", "eval.scorers=[relevance, "
                                    f"beaver_cost:{tmp_path / 'no-model'}]"])
    got = problems(cfg, tmp_path / "run")
    assert len(got) == 4, got
    assert got[0] == "world: launcher environment WORLD_SIZE='two' is not a process count/index"
    assert got[1].startswith("align.target_modules: ['qkv'] match no linear layer of 'tiny'; its linear layers "
                             "are named ['down_proj', 'gate_proj', 'k_proj', 'lm_head'")
    assert got[2].startswith(f"eval.scorers: beaver_cost:{tmp_path / 'no-model'}: no such directory")
    assert got[3].startswith(f"--output-dir {tmp_path / 'run'}: 1.0 KB free") and "need an estimated" in got[3]
    assert all("\n" not in p for p in got)


def test_missing_scorers_for_local_data_fail_before_any_stage(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows())
    got = problems(preset("smoke").override([f"data.source={path}"]), tmp_path / "run")
    assert got[0] == (f"eval.scorers: not set, and data.source='{path}' has no default ground-truth scorers: set "
                   "eval.scorers='[name:path, ...]' (one per objective, e.g. beaver_reward:/models/reward) or "
                   "eval.enabled=false")
    assert "--scorers" not in got[0]  # `run` has no such option


def test_unresolvable_dataset_and_model_offline_fail_in_seconds(tmp_path, monkeypatch):
    """This machine has no route to the hub: the preflight notices in one probe and switches the loaders to the
    local cache, instead of letting each retry for about a minute."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)  # restored after the test
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    from sipo_fast.data.prompts import hub_reachable

    if not constants.HF_HUB_OFFLINE and hub_reachable():
        pytest.skip("the hub is reachable from this machine; this test is about an offline one")
    cfg = preset("smoke").override(["data.source=no-such-org/no-such-dataset", "model.name=no-such-org/no-model",
                                    "eval.enabled=false"])
    t0 = time.monotonic()
    got = problems(cfg, tmp_path / "run")
    assert time.monotonic() - t0 < 30
    assert len(got) == 2 and got[0].startswith("model.name='no-such-org/no-model': "), got
    assert got[1].startswith("data: ") and "no-such-org/no-such-dataset" in got[1], got


@pytest.mark.parametrize("setup,match", [
    (lambda d: d.write_text("a file"), "is a file, not a directory"),
    (lambda d: (d.mkdir(), (d / "notes.txt").write_text("x")), "not a sipo_fast run directory"),
])
def test_output_dir_problems(tmp_path, setup, match):
    out = tmp_path / "run"
    setup(out)
    assert any(match in p for p in problems(preset("smoke"), out))


def test_read_only_output_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda p, mode: False)  # tests may run as root, who may write anywhere
    assert any(p.endswith(f"{tmp_path} is not writable by this user") for p in problems(preset("smoke"),
                                                                                         tmp_path / "run"))


def test_chat_template_is_required_for_the_chat_format(tmp_path, monkeypatch):
    from sipo_fast.pipeline.context import Context

    pipe = SIPOPipeline(preset("smoke"), tmp_path / "run", progress=False)
    tok = pipe.context().tokenizer
    monkeypatch.setattr(tok, "chat_template", None)
    with pytest.raises(PreflightError, match="has no chat template"):
        pipe.preflight()
    assert isinstance(pipe.context(), Context)


def test_evaluation_prompts_are_resolved_before_training(tmp_path):
    """The evaluation stage reads held-out prompts; a local file as data.source has no held-out split (its rows are
    the training data), which used to fail after every training stage. Now the preflight says so."""
    path = write_jsonl(tmp_path / "d.jsonl", rows())
    cfg = preset("smoke").override([f"data.source={path}", "eval.scorers=[relevance, harmlessness]"])
    got = problems(cfg, tmp_path / "run")
    assert len(got) == 1 and got[0].startswith(f"eval prompts: {path}: a single file has no held-out split"), got
    held = write_jsonl(tmp_path / "held.jsonl", rows())  # an explicit prompt source of its own is fine
    SIPOPipeline(cfg.override([f"eval.prompt_source={held}"]), tmp_path / "run", progress=False).preflight()
    SIPOPipeline(cfg.override(["eval.enabled=false"]), tmp_path / "run", progress=False).preflight()  # the rest is fine
