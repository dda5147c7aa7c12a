"""``SIPOPipeline``: runs the stages in order inside one run directory, resuming what is already done.

For each stage the runner computes its fingerprint (config values it reads + content hashes of the upstream
artifacts it consumes, see :mod:`.rundir.directory`), skips it when the manifest says that fingerprint finished
and the files still match, and otherwise says why it runs (never run, config keys changed, an input changed,
files changed on disk) and runs it into a work directory whose finished parts survive a crash.

Under several processes (``accelerate launch`` / ``torchrun``, see :mod:`sipo_fast.distributed`) every rank runs
every stage; rank 0 alone opens the run directory, decides what runs, writes the manifest, config and artifacts,
and the others follow its decisions, so the artifacts are those of a single process.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from sipo_fast.distributed import current

from .config.pipeline_config import PipelineConfig
from .context import Context
from .preflight import Findings, PreflightError, check_inputs, check_output
from .rundir.directory import ManifestError, RunDir, identity
from .rundir.files import atomic_write_json, atomic_write_text, file_records, stable_hash
from .rundir.lock import LOCK, RunLock
from .rundir.parts import Parts, crash_point
from .rundir.repair import read_record, rebuild, repair
from .stages import STAGES
from .stages.stage import Stage

log = logging.getLogger("sipo_fast.pipeline")


class SIPOPipeline:
    """The SIPO pipeline (SIPO.md §3) over a run directory.

    >>> SIPOPipeline(preset("smoke"), "runs/smoke").run()            # doctest: +SKIP

    ``run()`` runs every stage that is not up to date; ``run(["sample"])`` runs only the named stages (their
    upstream stages must be up to date). ``force=True`` starts over: an existing run directory (never anything
    else) is moved aside as ``<dir>.old-<time>`` and deleted once the new run's first stage has finished.
    ``preflight()`` checks every input without writing anything; ``run()`` calls it first.
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
        self._locks: list[RunLock] = []  # rank 0's locks while it runs (the old directory's too, under --force)
        self._created: list[Path] = []  # directories this run made before its preflight (removed if it fails)

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
        """One row per stage: name, state ("done", "stale", "waiting", "disabled") and the reason. A stage
        downstream of a stale or waiting one is stale too: it re-runs unless that stage's output comes out the
        same. A broken manifest is shown as ``repair`` would rebuild it (nothing is written)."""
        try:
            self.run_dir.manifest()
        except ManifestError:
            data, _ = rebuild(self.run_dir, list(self.stages))
            log.warning("%s is unreadable; showing the stages as `sipo-fast repair` would recover them",
                        self.run_dir.manifest_path)
            saved, self.run_dir = self.run_dir, _FixedManifest(self.run_dir.root, data)
            try:
                return self.status()
            finally:
                self.run_dir = saved
        rows, states = [], {}
        for name, stage in self.stages.items():
            if not self.enabled(name):
                rows.append({"stage": name, "state": "disabled", "reason": "eval.enabled is false"})
                continue
            fp = self._fingerprint(stage)
            behind = [u for u in stage.upstream if states.get(u) in ("stale", "waiting")]
            if fp is None:
                row = {"stage": name, "state": "waiting", "reason": "an upstream stage is not done"}
            elif self.run_dir.is_current(name, fp[0]) and behind:
                row = {"stage": name, "state": "stale", "reason": f"upstream {', '.join(behind)} will re-run (this "
                       "stage re-runs with it unless its output comes out unchanged)"}
            elif self.run_dir.is_current(name, fp[0]):
                row = {"stage": name, "state": "done", "reason": "up to date"}
            else:
                row = {"stage": name, "state": "stale", "reason": self._why(stage, *fp)}
            states[name] = row["state"]
            rows.append(row)
        return rows

    # -- running ----------------------------------------------------------------------------------------------
    def context(self) -> Context:
        if self._ctx is None:  # one progress bar per job: rank 0's
            self._ctx = Context(self.config, self.run_dir, progress=self.progress and current().is_main)
        return self._ctx

    def validate(self) -> None:
        """Fail fast, before any training: data, objectives, conflicts, tokenizers, context length."""
        self.context().validate()

    def check_inputs(self, stages: list[str] | None = None) -> Findings:
        """Config, data, model, LoRA targets, scorers and world (:func:`.preflight.check_inputs`), without
        writing."""
        return check_inputs(self.context(), stages)

    def preflight(self, stages: list[str] | None = None) -> list[str]:
        """Resolve every input and the output directory (:mod:`.preflight`) without writing; returns the facts.
        Raises :class:`PreflightError` with one line per problem."""
        found = self.check_inputs(stages)
        # The output directory is rank 0's (it alone locks and writes it): its findings hold for every rank.
        out = current().on_main(lambda: check_output(self.run_dir, force=self.force, identity=identity(self.config),
                                                     estimate_bytes=found.estimate_bytes, held=bool(self._locks)))
        if self.force and stages is not None:
            need = sorted({u for s in stages for u in self.stages[s].upstream if u not in stages})
            if need:
                out.problems.append(f"--force starts the run over, but {stages} need(s) {need}, which it would "
                                    "discard: use `sipo-fast run --force`")
        problems = found.problems + out.problems
        if problems:
            raise PreflightError(problems)
        return found.facts + out.facts

    def run(self, stages: list[str] | None = None, *, rerun: bool = False) -> dict:
        """Run the pipeline (or only ``stages``); returns {stage: summary} of every enabled stage. Every op runs
        on ``config.backend`` for the length of the run (the process-wide default is restored afterwards; "auto"
        leaves it as it is)."""
        if self.config.backend == "auto":
            return self._run(stages, rerun=rerun)
        from sipo_fast.ops.backend import use_backend

        log.info("backend=%s: every op runs its %s path for this run", self.config.backend, self.config.backend)
        with use_backend(self.config.backend):
            return self._run(stages, rerun=rerun)

    def _run(self, stages: list[str] | None, *, rerun: bool) -> dict:
        if stages is not None:
            unknown = [s for s in stages if s not in self.stages]
            if unknown:
                raise ValueError(f"unknown stage(s) {unknown}; stages are {', '.join(self.stages)}")
        dist = current()
        handler, aside = None, None
        try:
            dist.on_main(self._claim)  # a second run on a directory in use is refused at once
            try:
                self.preflight(stages)
            except BaseException:
                dist.on_main(self._unclaim)
                raise
            aside = dist.on_main(self._open)
            for name in stages or []:
                missing = [u for u in self.stages[name].upstream
                           if u not in stages and self.run_dir.artifact_hash(u) is None]
                if missing:
                    raise self._missing(name, missing)
            handler = self._file_log() if dist.is_main else None
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
                aside = dist.on_main(lambda: self._discard(aside))  # the new run has started cleanly
            return out
        finally:
            if aside is not None:
                log.warning("the previous run is kept at %s (the new run did not finish a stage); move it back "
                            "with `mv %s %s` if you want it", aside, aside, self.run_dir.root)
            if handler is not None:
                logging.getLogger("sipo_fast").removeHandler(handler)
                handler.close()
            dist.on_main(self._unlock)

    # -- the run directory: lock, --force, repair (rank 0) ------------------------------------------------------
    def _claim(self) -> None:
        """Take the directory's lock before anything looks inside it, creating the directory if it is new, so
        that of two runs started together on one new directory the lock alone picks the one that proceeds;
        the other is refused as "in use by another sipo-fast run". A directory holding someone else's files
        gets no lock file (preflight refuses it)."""
        root = self.run_dir.root
        if not root.exists():
            missing = [p for p in (root, *root.parents) if not p.exists()]
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError:
                return  # preflight says why (not writable, a file in the way)
            self._created = missing[::-1]
        if root.is_dir() and not self.run_dir.foreign_files():  # never add a file to someone else's directory
            self._locks.append(RunLock(root).acquire())

    def _unclaim(self) -> None:
        """After a failed preflight: release the lock and remove the directories ``_claim`` made, if they hold
        nothing but the lock file (a run refused before its first write leaves no trace)."""
        self._unlock()
        for d in reversed(self._created):
            try:
                (d / LOCK).unlink(missing_ok=True)
                d.rmdir()
            except OSError:
                break
        self._created = []

    def _open(self) -> str | None:
        """After preflight: move the old run aside (--force), create and lock the directory, repair a broken
        manifest, record the identity. Returns the moved-aside directory, if any."""
        aside = self.run_dir.move_aside() if self.force else None
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        if aside is not None or not self._locks:
            self._locks.append(RunLock(self.run_dir.root).acquire())
        for note in repair(self.run_dir, list(self.stages)):
            log.warning("manifest.json was unreadable and has been rebuilt: %s", note)
        self.run_dir.open(identity(self.config))
        if aside is not None:
            log.info("--force: the previous run was moved to %s; it is deleted once this run finishes a stage", aside)
        return str(aside) if aside is not None else None

    def _discard(self, aside: str | None) -> None:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
            log.info("--force: deleted the previous run %s", aside)

    def _unlock(self) -> None:
        while self._locks:
            self._locks.pop().release()

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
            # stage.json is part of the artifact (hashed): counts only, no timings. It holds everything the
            # manifest entry holds plus every file's size and sha256, so the entry can be rebuilt and checked
            # without the manifest (adoption after a crash, repair).
            atomic_write_json(work / "stage.json", {"stage": stage.name, "fingerprint": fingerprint,
                                                    "version": stage.version, "inputs": inputs, "config": values,
                                                    "summary": summary, "files": file_records(work)})
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
        """A stage directory committed just before a crash, but not yet in the manifest, is kept if its
        stage.json was written for this fingerprint and every file still has its recorded size and sha256."""
        meta = self.run_dir.stage_dir(stage.name) / "stage.json"
        if self.run_dir.entry(stage.name) is not None or not meta.exists():
            return False
        record, why = read_record(self.run_dir, stage.name)
        if record is None or record["fingerprint"] != fingerprint:
            log.warning("%s: not keeping the artifact found from an interrupted run (%s)", stage.name,
                        why or "made for another fingerprint")
            return False
        log.info("%s: found finished artifact from an interrupted run, keeping it", stage.name)
        self._record(stage, fingerprint, inputs, values, record["summary"])
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


class _FixedManifest(RunDir):
    """A run directory seen through a manifest held in memory (``status`` of a directory awaiting repair)."""

    def __init__(self, root, data: dict):
        super().__init__(root)
        self._data = data

    def manifest(self) -> dict:
        return self._data
