"""The run directory: atomic writes, ``manifest.json`` of finished stages, fingerprints, resumable parts.

Layout of a run directory::

    config.yaml             resolved config of the latest invocation
    manifest.json           {"format": 1, "identity": {...}, "stages": {name: entry}}
    <stage>/                a finished stage's artifact (datasets, adapters, stage.json; logs/ not hashed)
    .work/<stage>/          a stage in progress: finished parts survive a crash and are reused on resume

A stage's **fingerprint** is the hash of the config values it reads plus the content hashes of the upstream
artifacts it consumes. A stage is up to date when the manifest holds its fingerprint and its directory still
hashes to the recorded content hash; otherwise it (and, through the changed hashes, what consumes it) runs
again. Everything is written to a temporary name first and moved into place with ``os.replace`` /
``os.rename``, so a killed process leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

MANIFEST = "manifest.json"
FORMAT = 1
WORK = ".work"
UNHASHED_DIRS = ("logs",)  # timings and trainer logs vary run to run; they are not part of an artifact's identity
# The evaluation report renders the hashed sweeps (eval/sweeps/*.json) and stamps the time it was generated;
# scores.sqlite is the scorers' cache.
UNHASHED_FILES = ("report.md", "report.png", "scores.sqlite")


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), first 16 hex digits."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dir_hash(path: Path, include: Callable[[Path], bool] | None = None) -> str:
    """Content hash of a directory: relative paths and bytes of every file, except under ``logs/``, the
    rendered report (``report.md``/``report.png``, which carry a timestamp) and the score cache.
    ``include(relative_path)``, if given, further restricts the files hashed. Files are read in chunks."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if rel.parts[0] in UNHASHED_DIRS or rel.as_posix() in UNHASHED_FILES:
            continue
        if include is not None and not include(rel):
            continue
        h.update(str(rel.as_posix()).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Rows as JSON lines, atomically (one row per line, keys sorted so equal rows give equal bytes)."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


class RunDir:
    """One run directory and its manifest.

    ``identity`` holds the config values that make a run directory what it is (model, objectives, data
    source); a directory made with a different identity is refused rather than silently mixed.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # -- manifest -------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"format": FORMAT, "identity": None, "stages": {}}
        try:
            data = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.manifest_path} is not valid JSON ({exc}); delete the run directory or pick "
                             "another --output-dir") from exc
        return data

    def _save_manifest(self, data: dict) -> None:
        atomic_write_json(self.manifest_path, data)

    def open(self, identity: dict, *, force: bool = False) -> None:
        """Create or reopen the directory for a run with ``identity``.

        Raises ValueError if the directory holds files but no manifest (not a run directory), was written by
        another manifest format, or was made for a different identity. ``force=True`` wipes it instead.
        """
        if force and self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.manifest_path.exists():
            extra = [p.name for p in self.root.iterdir()]
            if extra:
                raise ValueError(f"{self.root} is not empty and has no {MANIFEST}, so it is not a sipo_fast run "
                                 f"directory (found {sorted(extra)[:5]}); choose an empty or new --output-dir")
            self._save_manifest({"format": FORMAT, "identity": identity, "stages": {}})
            return
        data = self.manifest()
        if data.get("format") != FORMAT:
            raise ValueError(f"{self.root} was made by manifest format {data.get('format')}, this version writes "
                             f"{FORMAT}; use a new --output-dir, or pass --force to start this one over")
        if data.get("identity") != identity:
            diff = {k: (data.get("identity", {}).get(k), v) for k, v in identity.items()
                    if (data.get("identity") or {}).get(k) != v}
            raise ValueError(f"{self.root} was made by an incompatible config (differs in {sorted(diff)}: "
                             f"{ {k: f'{a!r} -> {b!r}' for k, (a, b) in diff.items()} }); use a new --output-dir, "
                             f"or pass --force to discard that run")

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


class Parts:
    """Resumable units of a stage (one objective's adapter, one weight's candidates): each part is a file
    or directory in the work directory, written atomically; a part that exists is finished.

    Under several processes (``dist``, see :mod:`.distributed`) only rank 0 writes; every write ends at a
    barrier, so that when a ``save_*``/``write_jsonl`` call returns on any rank the file is in place, and
    ``done`` answers rank 0's view on every rank, so all ranks skip (or run) the same parts together."""

    def __init__(self, work: Path, stage: str, crash_after: int | None = None, dist=None):
        self.work, self.stage, self.crash_after, self.done_here = work, stage, crash_after, 0
        if dist is None:
            from .distributed import Dist

            dist = Dist()
        self.dist = dist

    def path(self, name: str) -> Path:
        return self.work / name

    def done(self, name: str) -> bool:
        return self.dist.on_main(lambda: self.path(name).exists())

    def write_jsonl(self, name: str, rows: list[dict]) -> None:
        """Write a file of the stage (not a resumable part: no crash point)."""
        self.dist.on_main(lambda: write_jsonl(self.path(name), rows))

    def remove(self, name: str) -> None:
        """Delete a scratch file or folder of the work directory, once every rank is past reading it."""
        self.dist.barrier()
        self.dist.on_main(lambda: shutil.rmtree(self.path(name)) if self.path(name).is_dir()
                          else self.path(name).unlink(missing_ok=True))

    def save_jsonl(self, name: str, rows: list[dict]) -> None:
        self.dist.on_main(lambda: write_jsonl(self.path(name), rows))
        self._mark()

    def save_file(self, name: str, writer) -> None:
        """``writer(tmp_path)`` writes a temporary file, which is then renamed to the part's name."""
        def run() -> None:
            final = self.path(name)
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
            os.close(fd)
            try:
                writer(Path(tmp))
                os.replace(tmp, final)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        self.dist.on_main(run)
        self._mark()

    def save_dir(self, name: str, writer) -> None:
        """``writer(tmp_dir)`` fills a temporary directory, which is then renamed to the part's name."""
        def run() -> None:
            final = self.path(name)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
            try:
                writer(tmp)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self.dist.on_main(run)
        self._mark()

    def _mark(self) -> None:
        # Fault injection for the resume tests (SIPO_FAST_CRASH_AFTER=<stage>:<n>): die like a killed process
        # right after the n-th part of this stage is safely on disk.
        self.done_here += 1
        if self.crash_after is not None and self.done_here >= self.crash_after:
            os._exit(75)


def crash_point(stage: str) -> int | None:
    """Parts after which to kill the process in ``stage``, from ``SIPO_FAST_CRASH_AFTER=<stage>:<n>``."""
    spec = os.environ.get("SIPO_FAST_CRASH_AFTER", "")
    name, _, n = spec.partition(":")
    return int(n) if name == stage and n.isdigit() else None
