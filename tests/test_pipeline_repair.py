"""Run directories that cannot lose work (issue 14, defect classes 1, 3, 6, 7, 10), with the cheap stand-in
stages of test_pipeline_runner: a broken manifest is rebuilt from the stages' stage.json, adoption checks
sizes and hashes, --force only moves run directories aside and only after validation, the identity is written
only after validation, and files follow the umask."""
import json
import logging
import os
import stat

import pytest

from sipo_fast.pipeline import PipelineConfig
from sipo_fast.pipeline.preflight import Findings, PreflightError
from sipo_fast.pipeline.rundir.repair import repair
from sipo_fast.pipeline.rundir.directory import ManifestError, RunDir
from sipo_fast.pipeline.rundir.files import file_records
from test_pipeline_runner import make

STAGES = ["align", "sample", "refine", "filter"]


def manifest(tmp_path) -> dict:
    return json.loads((tmp_path / "run" / "manifest.json").read_text())


@pytest.mark.parametrize("content", ['{"format": 1, "stages": ', '[1, 2]', '{"format": 1, "stages": {"align": 3}}',
                                     '{"format": 1, "identity": "x", "stages": {}}', b'\xff\xfe'])
def test_unreadable_or_wrong_shape_manifest_is_rebuilt_not_a_reason_to_delete(tmp_path, caplog, content):
    make(tmp_path)[0].run()
    before = manifest(tmp_path)
    path = tmp_path / "run" / "manifest.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ManifestError, match="sipo-fast repair") as exc:
        RunDir(tmp_path / "run").manifest()
    assert "delete" not in str(exc.value)
    with caplog.at_level(logging.INFO, logger="sipo_fast"):
        pipe, runs = make(tmp_path)
        assert [r["state"] for r in pipe.status()] == ["done"] * 4  # status shows the recoverable stages
        pipe.run()  # repairs by itself, with a warning
    assert runs == []  # nothing re-ran: every stage was recovered from its stage.json
    assert "manifest.json was unreadable and has been rebuilt: align: recovered" in caplog.text
    after = manifest(tmp_path)
    assert after["stages"] == before["stages"]
    assert list((tmp_path / "run").glob("manifest.json.broken-*"))  # the broken file is kept, not lost


def test_repair_skips_a_stage_whose_files_changed(tmp_path):
    make(tmp_path)[0].run()
    (tmp_path / "run" / "manifest.json").write_text("garbage")
    (tmp_path / "run" / "refine" / "out.jsonl").write_text("truncat")
    notes = repair(RunDir(tmp_path / "run"), STAGES)
    assert "refine: not recovered, out.jsonl has 7 bytes" in " ".join(notes)
    assert sorted(manifest(tmp_path)["stages"]) == ["align", "filter", "sample"]
    pipe, runs = make(tmp_path)
    pipe.run()
    assert runs == ["refine"]  # rewritten identically, so filter stays valid


def test_missing_manifest_beside_finished_stages_is_repaired(tmp_path):
    make(tmp_path)[0].run()
    (tmp_path / "run" / "manifest.json").unlink()
    pipe, runs = make(tmp_path)
    pipe.run()
    assert runs == [] and sorted(manifest(tmp_path)["stages"]) == sorted(STAGES)


def test_stage_json_records_every_file_size_and_hash(tmp_path):
    make(tmp_path)[0].run()
    record = json.loads((tmp_path / "run" / "sample" / "stage.json").read_text())
    data = (tmp_path / "run" / "sample" / "out.jsonl").read_bytes()
    import hashlib

    assert record["files"] == {"out.jsonl": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    assert record["inputs"] == manifest(tmp_path)["stages"]["sample"]["inputs"]


def test_adoption_refuses_a_truncated_artifact(tmp_path, caplog):
    """Crash between commit and manifest write, then the artifact is damaged: it must run again, not be adopted."""
    make(tmp_path)[0].run()
    data = manifest(tmp_path)
    del data["stages"]["refine"], data["stages"]["filter"]
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(data))
    out = tmp_path / "run" / "refine" / "out.jsonl"
    out.write_bytes(out.read_bytes()[:5])
    with caplog.at_level(logging.INFO, logger="sipo_fast"):
        pipe, runs = make(tmp_path)
        pipe.run()
    assert runs == ["refine"]  # redone; filter adopted (its own files are intact and its inputs unchanged)
    assert "refine: not keeping the artifact found from an interrupted run (out.jsonl has 5 bytes" in caplog.text
    assert "filter: found finished artifact from an interrupted run, keeping it" in caplog.text


def test_force_refuses_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "thesis.tex").write_text("years of work")
    pipe, runs = make(tmp_path)
    pipe.force = True
    with pytest.raises(PreflightError, match="not a sipo_fast run directory.*--force only replaces run directories"):
        pipe.run()
    assert (tmp_path / "run" / "thesis.tex").read_text() == "years of work" and runs == []
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["thesis.tex"]  # not even a lock file added


def test_force_validates_first_and_keeps_the_old_run_until_a_stage_finished(tmp_path, caplog):
    make(tmp_path)[0].run()
    before = manifest(tmp_path)

    class Broken:
        config = PipelineConfig()

        def preflight(self, stages=None):
            return Findings(problems=["data: data.source='nope' is not a dataset"])

    pipe, runs = make(tmp_path)
    pipe.force, pipe._ctx = True, Broken()
    with pytest.raises(PreflightError, match="nope"):
        pipe.run()
    assert manifest(tmp_path) == before and runs == []  # bad input: the finished run is untouched

    class Dies(Exception):
        pass

    pipe, runs = make(tmp_path)
    pipe.force = True
    pipe.stages["align"].run = lambda *a: (_ for _ in ()).throw(Dies())
    with caplog.at_level(logging.INFO, logger="sipo_fast"), pytest.raises(Dies):
        pipe.run()
    kept = list(tmp_path.glob("run.old-*"))
    assert len(kept) == 1 and json.loads((kept[0] / "manifest.json").read_text()) == before
    assert "the previous run is kept at" in caplog.text

    pipe, runs = make(tmp_path)
    pipe.force = True
    pipe.run()
    assert runs == STAGES
    assert [p.name for p in tmp_path.glob("run.old-*")] == [kept[0].name]  # the one of the failed attempt stays


def test_identity_is_written_only_after_validation(tmp_path):
    """A run that fails validation leaves no identity behind, so the corrected config is not 'incompatible'."""
    class Broken:
        config = PipelineConfig()

        def preflight(self, stages=None):
            return Findings(problems=["data: no such file 'wrong.jsonl'"])

    pipe, _ = make(tmp_path)
    pipe._ctx = Broken()
    with pytest.raises(PreflightError):
        pipe.run()
    assert not (tmp_path / "run").exists()
    other = PipelineConfig().override(["model.name=tiny"])
    make(tmp_path, other)[0].run()  # the corrected config is accepted
    assert manifest(tmp_path)["identity"]["model"] == "tiny"


def test_identity_of_a_directory_without_work_can_change(tmp_path):
    run = RunDir(tmp_path / "run")
    run.open({"model": "a"})
    run.open({"model": "b"})  # nothing finished and nothing in progress: nothing to protect
    assert run.manifest()["identity"] == {"model": "b"}


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                      (0o077, 0o600, 0o700)])
def test_files_and_directories_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        make(tmp_path)[0].run()
    finally:
        os.umask(old)
    root = tmp_path / "run"
    for path in [root / "manifest.json", root / "config.yaml", root / "sample" / "out.jsonl",
                 root / "sample" / "stage.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    for path in [root, root / "sample"]:
        assert stat.S_IMODE(path.stat().st_mode) == dir_mode, path


def test_file_records_ignore_logs_and_stage_json(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "t.json").write_text("1")
    (tmp_path / "stage.json").write_text("{}")
    (tmp_path / "a.bin").write_bytes(b"abc")
    assert list(file_records(tmp_path)) == ["a.bin"]
