"""The runner's resume logic with cheap stand-in stages: skip what is done, re-run what a config change or
an upstream change affects (and only that), keep finished parts across a crash, refuse a foreign directory."""
import json
import logging

import pytest

from sipo_fast.pipeline import PipelineConfig
from sipo_fast.pipeline.preflight import Findings
from sipo_fast.pipeline.rundir.files import read_jsonl
from sipo_fast.pipeline.runner import SIPOPipeline
from sipo_fast.pipeline.stages.stage import Stage


class Recorder(Stage):
    """Writes out.jsonl = its config values + its inputs' contents; counts its runs."""

    def __init__(self, name, upstream, keys, log):
        self.name, self.upstream, self.config_keys, self.log = name, upstream, keys, log

    def run(self, ctx, parts, inputs):
        self.log.append(self.name)
        rows = [{"config": {k: ctx.config.get(k) for k in self.config_keys}}]
        rows += [{"from": u, "rows": read_jsonl(p / "out.jsonl")} for u, p in inputs.items()]
        parts.save_part_jsonl("out.jsonl", rows)
        return {"rows": len(rows)}


class Ctx:
    def __init__(self, config):
        self.config = config

    def validate(self):
        pass

    def preflight(self, stages=None):
        return Findings()  # stand-in stages read no data or model; the output-dir checks still run


def make(tmp_path, config=None, runs=None):
    config = config or PipelineConfig()
    runs = runs if runs is not None else []
    pipe = SIPOPipeline(config, tmp_path / "run", progress=False)
    pipe.stages = {
        "align": Recorder("align", (), ("seed", "align.learning_rate"), runs),
        "sample": Recorder("sample", ("align",), ("sample.max_new_tokens",), runs),
        "refine": Recorder("refine", ("align", "sample"), ("refine.enabled",), runs),
        "filter": Recorder("filter", ("align", "refine"), ("filter.beta",), runs),
    }
    pipe._ctx = Ctx(config)
    pipe.check_inputs = lambda stages=None: pipe._ctx.preflight(stages)  # the stand-in context's input checks
    return pipe, runs


def test_second_run_skips_everything(tmp_path, caplog):
    pipe, runs = make(tmp_path)
    pipe.run()
    assert runs == ["align", "sample", "refine", "filter"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert sorted(manifest["stages"]) == ["align", "filter", "refine", "sample"]
    assert manifest["stages"]["sample"]["inputs"] == {"align": manifest["stages"]["align"]["artifact"]}
    with caplog.at_level(logging.INFO, logger="sipo_fast"):
        pipe2, runs2 = make(tmp_path)
        pipe2.run()
    assert runs2 == []
    assert caplog.text.count("up to date, skipping") == 4
    assert [r["state"] for r in pipe2.status()] == ["done"] * 4


def test_changed_config_reruns_the_stage_and_what_depends_on_it(tmp_path, caplog):
    make(tmp_path)[0].run()
    cfg = PipelineConfig().override(["refine.enabled=false"])
    with caplog.at_level(logging.INFO, logger="sipo_fast"):
        pipe, runs = make(tmp_path, cfg)
        # filter is downstream of the stale refine: stale too (issue 14: no "done" below a stale stage)
        assert [r["state"] for r in pipe.status()] == ["done", "done", "stale", "stale"]
        assert "upstream refine will re-run" in pipe.status()[3]["reason"]
        pipe.run()
    assert runs == ["refine", "filter"]  # align and sample untouched
    assert "refine: running (config changed: refine.enabled: True -> False)" in caplog.text
    assert "filter: running (its input changed: refine)" in caplog.text


def test_change_that_leaves_the_output_equal_stops_propagating(tmp_path):
    """Re-running a stage whose artifact comes out byte-identical does not re-run its consumers."""
    make(tmp_path)[0].run()
    pipe, runs = make(tmp_path)
    pipe.run(["sample"], rerun=True)
    assert runs == ["sample"]
    pipe, runs = make(tmp_path)
    pipe.run()
    assert runs == []


def test_tampered_artifact_is_redone(tmp_path, caplog):
    make(tmp_path)[0].run()
    (tmp_path / "run" / "sample" / "out.jsonl").write_text('{"edited": true}\n')
    with caplog.at_level(logging.INFO, logger="sipo_fast"):
        pipe, runs = make(tmp_path)
        pipe.run()
    assert runs == ["sample"]  # rewritten identically, so refine and filter stay valid
    assert "sample: running (its files changed on disk)" in caplog.text


def test_single_stage_needs_its_upstream(tmp_path):
    pipe, runs = make(tmp_path)
    with pytest.raises(ValueError, match=r"stage 'refine' needs \['align', 'sample'\] done first.*sipo-fast align"):
        pipe.run(["refine"])
    pipe.run(["align"])
    assert runs == ["align"]
    with pytest.raises(ValueError, match="unknown stage"):
        pipe.run(["polish"])


def test_incompatible_directory_is_refused(tmp_path):
    make(tmp_path)[0].run()
    other = PipelineConfig().override(["model.name=tiny"])
    with pytest.raises(ValueError, match="incompatible config.*model.*--force"):
        make(tmp_path, other)[0].run()
    pipe = SIPOPipeline(other, tmp_path / "run", force=True, progress=False)
    pipe.stages, pipe._ctx = make(tmp_path / "x", other)[0].stages, Ctx(other)
    pipe.check_inputs = lambda stages=None: pipe._ctx.preflight(stages)
    pipe.run()  # --force discards the old run
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["identity"]["model"] == "tiny"


def test_committed_but_unrecorded_stage_is_adopted(tmp_path, caplog):
    """A crash between moving a finished stage into place and writing the manifest loses nothing."""
    make(tmp_path)[0].run()
    manifest_path = tmp_path / "run" / "manifest.json"
    data = json.loads(manifest_path.read_text())
    del data["stages"]["filter"]
    manifest_path.write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="sipo_fast"):
        pipe, runs = make(tmp_path)
        pipe.run()
    assert runs == []
    assert "filter: found finished artifact from an interrupted run, keeping it" in caplog.text


def test_finished_parts_survive_a_failed_stage(tmp_path):
    """A stage that dies after saving part 0 restarts from part 1 with the same config."""
    attempts = []

    class TwoParts(Stage):
        name, upstream, config_keys = "align", (), ("seed",)

        def run(self, ctx, parts, inputs):
            for i in range(2):
                if parts.done(f"p{i}.jsonl"):
                    continue
                attempts.append(i)
                if i == 1 and len(attempts) == 2:
                    raise RuntimeError("killed")
                parts.save_part_jsonl(f"p{i}.jsonl", [{"i": i}])
            return {}

    pipe, _ = make(tmp_path)
    pipe.stages = {"align": TwoParts()}
    with pytest.raises(RuntimeError):
        pipe.run()
    pipe.run()
    assert attempts == [0, 1, 1]  # part 0 was not redone
    assert sorted(p.name for p in (tmp_path / "run" / "align").iterdir()) == ["logs", "p0.jsonl", "p1.jsonl",
                                                                             "stage.json"]
