"""The run directory: atomic writes, content hashes, the manifest, identity checks and resumable parts."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from sipo_fast.pipeline.rundir.directory import RunDir
from sipo_fast.pipeline.rundir.files import atomic_write_text, dir_hash, read_jsonl, stable_hash, write_jsonl
from sipo_fast.pipeline.rundir.parts import Parts

ID = {"model": "tiny", "data": "demo", "objectives": ["a", "b"], "use_lora": True}


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path, monkeypatch):
    path = tmp_path / "x.txt"
    atomic_write_text(path, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]  # no temporary left behind


def test_jsonl_round_trip_is_byte_stable(tmp_path):
    rows = [{"b": 1, "a": "é"}, {"a": [1, 2]}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "b.jsonl", [dict(reversed(list(r.items()))) for r in rows])
    assert read_jsonl(tmp_path / "a.jsonl") == rows
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_dir_hash_sees_content_and_names_but_not_logs(tmp_path):
    d = tmp_path / "stage"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "f.txt").write_text("1")
    h = dir_hash(d)
    (d / "logs").mkdir()
    (d / "logs" / "timing.json").write_text("12.3")
    (d / "report.md").write_text("generated at 12:00")
    assert dir_hash(d) == h                      # logs and the time-stamped report are not part of the artifact
    (d / "sub" / "report.md").write_text("x")
    assert dir_hash(d) != h                      # ... only the stage's own report, not any file of that name
    (d / "sub" / "report.md").unlink()
    (d / "sub" / "f.txt").write_text("2")
    assert dir_hash(d) != h                      # content
    (d / "sub" / "f.txt").write_text("1")
    assert dir_hash(d) == h
    (d / "sub" / "f.txt").rename(d / "sub" / "g.txt")
    assert dir_hash(d) != h                      # names


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_open_refuses_foreign_and_incompatible_directories(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a sipo_fast run directory"):
        RunDir(foreign).open(ID)

    run = RunDir(tmp_path / "run")
    run.open(ID)
    run.open(ID)  # reopening with the same identity is fine
    run.work_dir("align", "fp")  # work in progress: now the identity protects it
    with pytest.raises(ValueError, match="incompatible config.*model"):
        run.open({**ID, "model": "default"})
    aside = run.move_aside()  # --force starts over: the old run is moved, not deleted
    assert aside.name.startswith("run.old-") and (aside / ".work" / "align").is_dir()
    run.open({**ID, "model": "default"})
    assert run.manifest()["identity"]["model"] == "default"

    data = run.manifest()
    data["format"] = 99
    run.manifest_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="manifest format 99"):
        run.open({**ID, "model": "default"})


def test_finish_and_is_current_follow_the_files(tmp_path):
    run = RunDir(tmp_path / "run")
    run.open(ID)
    work = run.work_dir("sample", "fp1")
    (work / "candidates.jsonl").write_text("x\n")
    run.commit("sample", work)
    run.finish("sample", "fp1", {"align": "h"}, {"candidates": 1})
    assert run.is_current("sample", "fp1")
    assert not run.is_current("sample", "fp2")          # another fingerprint
    (run.stage_dir("sample") / "candidates.jsonl").write_text("tampered\n")
    assert not run.is_current("sample", "fp1")          # files no longer match the manifest
    assert run.artifact_hash("sample") is None


def test_work_dir_is_reused_only_for_the_same_fingerprint(tmp_path):
    run = RunDir(tmp_path / "run")
    run.open(ID)
    work = run.work_dir("align", "fpA")
    (work / "policies").mkdir()
    assert (run.work_dir("align", "fpA") / "policies").exists()
    assert not (run.work_dir("align", "fpB") / "policies").exists()


def test_commit_replaces_an_older_artifact(tmp_path):
    run = RunDir(tmp_path / "run")
    run.open(ID)
    for text in ("v1", "v2"):
        work = run.work_dir("filter", text)
        (work / "pairs.jsonl").write_text(text)
        run.commit("filter", work)
    assert (run.stage_dir("filter") / "pairs.jsonl").read_text() == "v2"
    assert not (run.stage_dir("filter") / ".fingerprint").exists()
    assert sorted(p.name for p in (run.root / ".work").iterdir()) == []


def test_parts_are_atomic_and_resumable(tmp_path):
    parts = Parts(tmp_path, "sample")
    parts.save_part_jsonl("parts/w0.jsonl", [{"a": 1}])
    parts.save_part_dir("policies/x", lambda d: (d / "f.bin").write_bytes(b"1"))
    assert parts.done("parts/w0.jsonl") and parts.done("policies/x")
    assert not parts.done("parts/w1.jsonl")

    def fail(d):
        (d / "half.bin").write_bytes(b"0")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        parts.save_part_dir("policies/y", fail)
    assert not parts.done("policies/y")
    assert sorted(p.name for p in (tmp_path / "policies").iterdir()) == ["x"]  # no half-written part


def test_crash_hook_kills_right_after_the_nth_part(tmp_path):
    """SIPO_FAST_CRASH_AFTER=<stage>:<n> exits like a killed process once n parts are on disk."""
    code = textwrap.dedent(f"""
        from pathlib import Path
        from sipo_fast.pipeline.rundir.parts import Parts, crash_point
        parts = Parts(Path({str(tmp_path)!r}), "sample", crash_point("sample"))
        for i in range(5):
            parts.save_part_jsonl(f"w{{i}}.jsonl", [{{"i": i}}])
    """)
    env = {**os.environ, "SIPO_FAST_CRASH_AFTER": "sample:2"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w0.jsonl", "w1.jsonl"]
