"""``SIPOPipeline``: runs the stages in order inside one run directory, resuming what is already done.

For each stage the runner computes its fingerprint (config values it reads + content hashes of the upstream
artifacts it consumes, see :mod:`.rundir`), skips it when the manifest says that fingerprint finished and the
files still match, and otherwise says why it runs (never run, config keys changed, an input changed,
files changed on disk) and runs it into a work directory whose finished parts survive a crash.

Under several processes (``accelerate launch`` / ``torchrun``, see :mod:`.distributed`) every rank runs every
stage; rank 0 alone opens the run directory, decides what runs, writes the manifest, config and artifacts,
and the others follow its decisions, so the artifacts are those of a single process.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .config import PipelineConfig
from .distributed import current
from .rundir import Parts, RunDir, atomic_write_json, atomic_write_text, crash_point, stable_hash
from .stages import STAGES, Context, Stage

log = logging.getLogger("sipo_fast.pipeline")


def identity(config: PipelineConfig) -> dict:
    """What makes a run directory what it is; a config that differs here needs its own directory."""
    return {"model": config.model.name, "data": config.data.source, "objectives": list(config.data.objectives),
            "use_lora": config.align.use_lora}


class SIPOPipeline:
    """The SIPO pipeline (SIPO.md §3) over a run directory.

    >>> SIPOPipeline(preset("smoke"), "runs/smoke").run()            # doctest: +SKIP

    ``run()`` runs every stage that is not up to date; ``run(["sample"])`` runs only the named stages (their
    upstream stages must be up to date). ``force=True`` discards an existing run directory first.
    """

    def __init__(self, config: PipelineConfig, output_dir: str | os.PathLike = "runs/sipo", *, force: bool = False,
                 progress: bool = True):
        if not isinstance(config, PipelineConfig):
            raise ValueError(f"config must be a PipelineConfig (see sipo_fast.pipeline.preset), got "
                             f"{type(config).__name__}")
        self.config, self.progress, self.force = config, progress, force
        self.run_dir = RunDir(output_dir)
        self.stages: dict[str, Stage] = {s.name: s for s in STAGES}
        self._ctx: Context | None = None

    # -- planning ---------------------------------------------------------------------------------------------
    def enabled(self, name: str) -> bool:
        return name != "eval" or self.config.eval.enabled

    def _fingerprint(self, stage: Stage) -> tuple[str, dict, dict] | None:
        """(fingerprint, upstream artifact hashes, config values) or None if an upstream is not finished."""
        inputs = {}
        for up in stage.upstream:
            h = self.run_dir.artifact_hash(up)
            if h is None:
                return None
            inputs[up] = h
        values = {k: self.config.get(k) for k in stage.config_keys}
        fingerprint = stable_hash({"stage": stage.name, "version": stage.version, "config": values, "inputs": inputs})
        return fingerprint, inputs, values

    def _why(self, stage: Stage, fingerprint: str, inputs: dict, values: dict) -> str:
        """Human reason a stage must run, from its previous manifest entry."""
        old = self.run_dir.entry(stage.name)
        if old is None:
            started = (self.run_dir.root / ".work" / stage.name).exists()
            return "resuming an unfinished run" if started else "not run yet"
        if old["fingerprint"] == fingerprint:
            return "its files changed on disk"
        reasons = []
        before, now = _flatten(old.get("config", {})), _flatten(values)
        changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        if changed:
            reasons.append("config changed: " + ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed))
        changed_in = [u for u in inputs if old.get("inputs", {}).get(u) != inputs[u]]
        if changed_in:
            reasons.append("its input changed: " + ", ".join(changed_in))
        return "; ".join(reasons) or "the stage's code or the config keys it reads changed"

    def status(self) -> list[dict]:
        """One row per stage: name, state ("done", "stale", "waiting", "disabled") and the reason."""
        rows = []
        for name, stage in self.stages.items():
            if not self.enabled(name):
                rows.append({"stage": name, "state": "disabled", "reason": "eval.enabled is false"})
                continue
            fp = self._fingerprint(stage)
            if fp is None:
                rows.append({"stage": name, "state": "waiting", "reason": "an upstream stage is not done"})
            elif self.run_dir.is_current(name, fp[0]):
                rows.append({"stage": name, "state": "done", "reason": "up to date"})
            else:
                rows.append({"stage": name, "state": "stale", "reason": self._why(stage, *fp)})
        return rows

    # -- running ----------------------------------------------------------------------------------------------
    def context(self) -> Context:
        if self._ctx is None:  # one progress bar per job: rank 0's
            self._ctx = Context(self.config, self.run_dir, progress=self.progress and current().is_main)
        return self._ctx

    def validate(self) -> None:
        """Fail fast, before any training: data, objectives, conflicts, tokenizers, context length."""
        self.context().validate()

    def run(self, stages: list[str] | None = None, *, rerun: bool = False) -> dict:
        """Run the pipeline (or only ``stages``); returns {stage: summary} of every enabled stage."""
        if stages is not None:
            unknown = [s for s in stages if s not in self.stages]
            if unknown:
                raise ValueError(f"unknown stage(s) {unknown}; stages are {', '.join(self.stages)}")
        dist = current()
        dist.on_main(lambda: self.run_dir.open(identity(self.config), force=self.force))
        for name in stages or []:  # before the (slower) validation: a missing upstream stage is the likelier mistake
            missing = [u for u in self.stages[name].upstream
                       if u not in stages and self.run_dir.artifact_hash(u) is None]
            if missing:
                raise self._missing(name, missing)
        handler = self._file_log() if dist.is_main else None
        try:
            self.validate()
            # The resolved config of the latest invocation that passed validation (sipo_fast.eval reads it).
            dist.on_main(lambda: atomic_write_text(self.run_dir.root / "config.yaml", self.config.to_yaml()))
            out = {}
            for name, stage in self.stages.items():
                if stages is not None and name not in stages:
                    continue
                if not self.enabled(name):
                    log.info("%s: disabled (eval.enabled=false)", name)
                    continue
                out[name] = self._run_stage(stage, rerun=rerun)
            return out
        finally:
            if handler is not None:
                logging.getLogger("sipo_fast").removeHandler(handler)
                handler.close()

    def _run_stage(self, stage: Stage, *, rerun: bool) -> dict:
        dist = current()
        fp = self._fingerprint(stage)
        if fp is None:
            raise self._missing(stage.name, [u for u in stage.upstream if self.run_dir.artifact_hash(u) is None])
        fingerprint, inputs, values = fp
        # Rank 0 decides (skip, adopt, or run in a work directory it prepares); the other ranks follow.
        state, value = dist.on_main(lambda: self._plan(stage, fingerprint, inputs, values, fp, rerun=rerun))
        if state == "done":
            return value
        work = Path(value)
        t0, c0 = time.perf_counter(), time.process_time()
        summary = stage.run(self.context(), Parts(work, stage.name, crash_point(stage.name), dist),
                            {u: self.run_dir.stage_dir(u) for u in stage.upstream})
        dist.barrier()  # every rank is done with the work directory before rank 0 moves it into place

        def finish() -> dict:
            # stage.json is part of the artifact (hashed): counts only, no timings.
            atomic_write_json(work / "stage.json", {"stage": stage.name, "fingerprint": fingerprint,
                                                    "summary": summary})
            # CPU seconds (all threads) beside wall seconds: on a shared machine they show what the stage costs.
            timing = {"seconds": round(time.perf_counter() - t0, 3), "cpu_seconds": round(time.process_time() - c0, 3)}
            if dist.enabled:
                timing["processes"] = dist.world
            atomic_write_json(work / "logs" / "timing.json", timing)
            self.run_dir.commit(stage.name, work)
            self._record(stage, fingerprint, inputs, values, summary)
            log.info("%s: done in %.1f s: %s", stage.name, time.perf_counter() - t0, _short(summary))
            return summary
        return dist.on_main(finish)

    def _plan(self, stage: Stage, fingerprint: str, inputs: dict, values: dict, fp, *, rerun: bool):
        """("done", summary) for a stage that is up to date (or adopted), else ("run", work directory)."""
        if self.run_dir.is_current(stage.name, fingerprint) and not rerun:
            log.info("%s: up to date, skipping (fingerprint %s)", stage.name, fingerprint)
            return "done", self.run_dir.entry(stage.name)["summary"]
        if not rerun and self._adopt(stage, fingerprint, inputs, values):
            return "done", self.run_dir.entry(stage.name)["summary"]
        log.info("%s: running (%s)", stage.name, "rerun requested" if rerun else self._why(stage, *fp))
        self.run_dir.forget(stage.name)
        work = self.run_dir.work_dir(stage.name, fingerprint)
        resumed = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()
                         and not any(x.startswith(".") or x == "logs" for x in p.relative_to(work).parts))
        if resumed:
            log.info("%s: reusing %d file(s) saved by an interrupted run: %s", stage.name, len(resumed),
                     ", ".join(resumed[:8]) + (", ..." if len(resumed) > 8 else ""))
        if current().enabled:
            log.info("%s: %d processes", stage.name, current().world)
        return "run", str(work)

    @staticmethod
    def _missing(name: str, missing: list[str]) -> ValueError:
        return ValueError(f"stage '{name}' needs {missing} done first: run `sipo-fast {missing[0]}` with the same "
                          "config and --output-dir, or `sipo-fast run` for the whole pipeline")

    def _record(self, stage: Stage, fingerprint: str, inputs: dict, values: dict, summary: dict) -> None:
        self.run_dir.finish(stage.name, fingerprint, inputs, summary, config=values, version=stage.version)

    def _adopt(self, stage: Stage, fingerprint: str, inputs: dict, values: dict) -> bool:
        """A stage directory committed just before a crash, but not yet in the manifest, is kept."""
        meta = self.run_dir.stage_dir(stage.name) / "stage.json"
        if self.run_dir.entry(stage.name) is not None or not meta.exists():
            return False
        import json

        data = json.loads(meta.read_text())
        if data.get("fingerprint") != fingerprint:
            return False
        log.info("%s: found finished artifact from an interrupted run, keeping it", stage.name)
        self._record(stage, fingerprint, inputs, values, data["summary"])
        return True

    def _file_log(self) -> logging.Handler:
        path = self.run_dir.root / "logs" / "pipeline.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger = logging.getLogger("sipo_fast")
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        return handler


def _flatten(values: dict, prefix: str = "") -> dict:
    """{"sample": {"max_new_tokens": 8}} -> {"sample.max_new_tokens": 8}, so a change names its field."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(summary: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, (dict, list)))
