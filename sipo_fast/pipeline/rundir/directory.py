"""The run directory: ``manifest.json`` of finished stages, the run's identity, stage and work directories.

Layout of a run directory::

    config.yaml             resolved config of the latest invocation
    manifest.json           {"format": 1, "identity": {...}, "stages": {name: entry}}
    <stage>/                a finished stage's artifact (datasets, adapters, stage.json; logs/ not hashed)
    .work/<stage>/          a stage in progress: finished parts survive a crash and are reused on resume

A stage's **fingerprint** is the hash of its name, its ``version``, the config values it reads and the content
hashes of the upstream artifacts it consumes (never a module path: moving code leaves run directories valid).
A stage is up to date when the manifest holds its fingerprint and its directory still hashes to the recorded
content hash; otherwise it (and, through the changed hashes, what consumes it) runs again. The files
themselves are written atomically (:mod:`.files`).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .files import STAGE_JSON, atomic_write_json, atomic_write_text, dir_hash, is_scratch

MANIFEST = "manifest.json"
FORMAT = 1
WORK = ".work"


def identity(config) -> dict:
    """What makes a run directory what it is; a config that differs here needs its own directory."""
    return {"model": config.model.name, "data": config.data.source, "objectives": list(config.data.objectives),
            "use_lora": config.align.use_lora}


class ManifestError(ValueError):
    """``manifest.json`` cannot be read or has the wrong shape. Nothing is lost: every finished stage keeps
    its own ``stage.json``, from which :mod:`.repair` rebuilds the manifest."""


def manifest_problem(data) -> str | None:
    """Why ``data`` is not a manifest of this format's shape, or None."""
    if not isinstance(data, dict):
        return f"it holds a {type(data).__name__}, not a JSON object"
    if data.get("identity") is not None and not isinstance(data.get("identity"), dict):
        return "its 'identity' is not an object"
    stages = data.get("stages")
    if not isinstance(stages, dict):
        return "it has no 'stages' object"
    for name, e in stages.items():
        if not isinstance(e, dict) or not isinstance(e.get("fingerprint"), str) \
                or not isinstance(e.get("artifact"), str) or not isinstance(e.get("summary"), dict):
            return f"its entry for stage {name!r} lacks fingerprint, artifact or summary"
    return None


class RunDir:
    """One run directory and its manifest.

    ``identity`` holds the config values that make a run directory what it is (model, objectives, data
    source, :func:`identity`); a directory made with a different identity is refused rather than silently
    mixed. Callers hold the directory's lock (:mod:`.lock`) while they write.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # -- manifest -------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> dict:
        """The manifest; an empty one when there is none. Raises :class:`ManifestError` when it cannot be
        read, has the wrong shape, or is missing beside finished stages."""
        if not self.manifest_path.exists():
            if self.stage_records():
                raise ManifestError(f"{self.manifest_path} is missing but {self.root} holds finished stages; "
                                    f"rebuild it with `sipo-fast repair --output-dir {self.root}`")
            return {"format": FORMAT, "identity": None, "stages": {}}
        try:
            data = json.loads(self.manifest_path.read_bytes().decode("utf-8"))
        except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            why = f"not valid JSON ({exc})"
        else:
            if isinstance(data, dict) and data.get("format") != FORMAT:
                return data  # another format: open() says so
            why = manifest_problem(data)
            if why is None:
                return data
        raise ManifestError(f"{self.manifest_path} is unreadable: {why}. Every finished stage can be recovered from "
                            f"its stage.json: run `sipo-fast repair --output-dir {self.root}` (or just run again: "
                            "a run repairs it first)")

    def _save_manifest(self, data: dict) -> None:
        atomic_write_json(self.manifest_path, data)

    def stage_records(self) -> list[str]:
        """Names of the subdirectories holding a ``stage.json`` (finished stages, whatever the manifest says)."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob(f"*/{STAGE_JSON}") if p.is_file())

    def is_run_dir(self) -> bool:
        """Has this directory been made by sipo_fast? (a manifest, a finished stage, or a stage in progress)"""
        return self.manifest_path.exists() or bool(self.stage_records()) or (self.root / WORK).is_dir()

    def foreign_files(self) -> list[str]:
        """Names in an existing directory that is not a run directory (empty list: fine to use). The lock and
        our own temporary files do not count: a run creating the directory right now leaves them."""
        if not self.root.is_dir() or self.is_run_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if not is_scratch(p.name))

    def open(self, identity: dict) -> None:
        """Create or reopen the directory for a run with ``identity`` (after validation, under the lock).

        Raises ValueError if the directory holds files but is not a run directory, was written by another
        manifest format, or was made for a different identity and holds work (``--force`` moves it aside
        first, see :meth:`move_aside`). A manifest whose identity is unknown (rebuilt) or that holds no work
        yet takes ``identity``."""
        extra = self.foreign_files()
        if extra:
            raise ValueError(f"{self.root} is not empty and has no {MANIFEST}, so it is not a sipo_fast run "
                             f"directory (found {extra[:5]}); choose an empty or new --output-dir")
        self.root.mkdir(parents=True, exist_ok=True)
        data = self.manifest()
        if data.get("format") != FORMAT:
            raise ValueError(f"{self.root} was made by manifest format {data.get('format')}, this version writes "
                             f"{FORMAT}; use a new --output-dir, or pass --force to start this one over")
        if data.get("identity") == identity:
            return
        why = self.identity_conflict(identity, data)
        if why is not None:
            raise ValueError(f"{self.root} was {why}")
        self._save_manifest({**data, "format": FORMAT, "identity": identity})

    def identity_conflict(self, identity: dict, data: dict | None = None) -> str | None:
        """Why a run with ``identity`` may not use this directory (it holds work made for another identity), or
        None. A manifest whose identity is unknown (rebuilt) or that holds no work yet takes any identity.
        ``data``: the manifest, if already read."""
        data = self.manifest() if data is None else data
        old = data.get("identity")
        if old is None or old == identity or not (data.get("stages") or (self.root / WORK).is_dir()):
            return None
        diff = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
        return (f"made by an incompatible config (differs in {sorted(diff)}: "
                f"{ {k: f'{a!r} -> {b!r}' for k, (a, b) in diff.items()} }); use a new --output-dir, or pass "
                "--force to move that run aside and start over")

    def move_aside(self) -> Path | None:
        """``--force``: rename an existing run directory to ``<dir>.old-<time>`` (returned; the caller deletes it
        once the new run has started cleanly). Refuses anything that is not a sipo_fast run directory."""
        if not self.root.exists():
            return None
        if not self.root.is_dir():
            raise ValueError(f"--force: {self.root} is a file, not a run directory; it was left alone")
        if not self.is_run_dir():
            extra = self.foreign_files()
            if not extra:
                return None  # empty: nothing to move
            raise ValueError(f"--force only replaces sipo_fast run directories, and {self.root} is not one (no "
                             f"{MANIFEST}; found {extra[:5]}); nothing was deleted. Choose another --output-dir")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            aside = self.root.with_name(f"{self.root.name}.old-{stamp}" + (f"-{n}" if n else ""))
            if not aside.exists():
                os.rename(self.root, aside)
                return aside
        raise ValueError(f"--force: too many {self.root.name}.old-{stamp}* directories; remove some")

    def entry(self, stage: str) -> dict | None:
        return self.manifest()["stages"].get(stage)

    def finish(self, stage: str, fingerprint: str, inputs: dict, summary: dict, **extra) -> str:
        """Record ``stage`` as finished (``extra``: more fields of its entry); returns its content hash."""
        data = self.manifest()
        artifact = dir_hash(self.stage_dir(stage))
        data["stages"][stage] = {"fingerprint": fingerprint, "inputs": inputs, "artifact": artifact,
                                 "summary": summary, **extra}
        self._save_manifest(data)
        return artifact

    def forget(self, stage: str) -> None:
        data = self.manifest()
        if data["stages"].pop(stage, None) is not None:
            self._save_manifest(data)

    # -- stage directories ------------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def artifact_hash(self, stage: str) -> str | None:
        """Recorded content hash of a finished stage whose files still match it, else None."""
        entry = self.entry(stage)
        d = self.stage_dir(stage)
        if entry is None or not d.is_dir():
            return None
        return entry["artifact"] if dir_hash(d) == entry["artifact"] else None

    def is_current(self, stage: str, fingerprint: str) -> bool:
        entry = self.entry(stage)
        return entry is not None and entry["fingerprint"] == fingerprint and self.artifact_hash(stage) is not None

    def work_dir(self, stage: str, fingerprint: str) -> Path:
        """Scratch directory of a stage in progress, reused only if it was started for the same fingerprint."""
        work = self.root / WORK / stage
        stamp = work / ".fingerprint"
        if work.exists() and (not stamp.exists() or stamp.read_text() != fingerprint):
            shutil.rmtree(work)  # left by an older config: its parts cannot be reused
        if not work.exists():
            work.mkdir(parents=True)
            atomic_write_text(stamp, fingerprint)
        return work

    def commit(self, stage: str, work: Path) -> Path:
        """Move a finished work directory into place as ``<stage>/`` (replacing an older artifact)."""
        (work / ".fingerprint").unlink(missing_ok=True)
        final = self.stage_dir(stage)
        old = self.root / WORK / f"{stage}.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.rename(final, old)
        os.rename(work, final)
        shutil.rmtree(old, ignore_errors=True)
        return final

