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
import time
from pathlib import Path
from typing import Any, Callable, Iterable

MANIFEST = "manifest.json"
STAGE_JSON = "stage.json"
FORMAT = 1
WORK = ".work"
# Every temporary name the project writes ends in TMP_SUFFIX, so a file left by a kill -9 between creating and
# renaming it is recognisably ours: directory scans and artifact hashes skip it (see is_scratch).
TMP_SUFFIX = ".sipo-tmp"


def is_scratch(name: str) -> bool:
    """Is ``name`` one of the project's own lock or temporary files (never user data, never an artifact)?"""
    return name == ".lock" or (name.startswith(".") and name.endswith(TMP_SUFFIX))
UNHASHED_DIRS = ("logs",)  # timings and trainer logs vary run to run; they are not part of an artifact's identity
# The evaluation report renders the hashed sweeps (eval/sweeps/*.json) and stamps the time it was generated;
# scores.sqlite is the scorers' cache.
UNHASHED_FILES = ("report.md", "report.png", "scores.sqlite")


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), first 16 hex digits."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def hashed_files(path: Path, include: Callable[[Path], bool] | None = None) -> list[tuple[Path, Path]]:
    """(relative path, path) of the files that make up an artifact, sorted: every file except under ``logs/``,
    the rendered report (``report.md``/``report.png``, which carry a timestamp) and the score cache."""
    out = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if rel.parts[0] in UNHASHED_DIRS or rel.as_posix() in UNHASHED_FILES:
            continue
        if include is None or include(rel):
            out.append((rel, f))
    return out


def _feed(h, path: Path) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def dir_hash(path: Path, include: Callable[[Path], bool] | None = None) -> str:
    """Content hash of a directory: relative paths and bytes of its :func:`hashed_files`.
    ``include(relative_path)``, if given, further restricts the files hashed. Files are read in chunks."""
    h = hashlib.sha256()
    for rel, f in hashed_files(path, include):
        h.update(str(rel.as_posix()).encode() + b"\0")
        _feed(h, f)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _recorded(rel: Path) -> bool:
    # stage.json holds the records; .fingerprint stamps a work directory and is removed when it commits
    return rel.as_posix() not in (STAGE_JSON, ".fingerprint")


def file_records(path: Path) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of an artifact's hashed files, ``stage.json`` excepted (it holds
    these records). Kept in ``stage.json`` so that an artifact can be checked file by file without the
    manifest (adoption after a crash, ``sipo-fast repair``)."""
    out = {}
    for rel, f in hashed_files(path, _recorded):
        h = hashlib.sha256()
        _feed(h, f)
        out[rel.as_posix()] = {"size": f.stat().st_size, "sha256": h.hexdigest()}
    return out


def check_records(path: Path, records) -> str | None:
    """Why the files under ``path`` do not match ``records`` (:func:`file_records`), or None if they do.
    Sizes first (cheap: catches truncated files), then hashes."""
    if not isinstance(records, dict):
        return "its stage.json records no file sizes and hashes (written by an older version)"
    have = {rel.as_posix(): f for rel, f in hashed_files(path, _recorded)}
    missing, extra = sorted(set(records) - set(have)), sorted(set(have) - set(records))
    if missing or extra:
        return f"files missing {missing[:3]} / unexpected {extra[:3]}"
    for rel, rec in records.items():
        if not isinstance(rec, dict) or have[rel].stat().st_size != rec.get("size"):
            return f"{rel} has {have[rel].stat().st_size} bytes, stage.json recorded {rec.get('size')}"
    for rel, rec in records.items():
        h = hashlib.sha256()
        _feed(h, have[rel])
        if h.hexdigest() != rec.get("sha256"):
            return f"{rel} does not match its recorded sha256"
    return None


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def follow_umask(path, *, directory: bool = False) -> None:
    """``tempfile`` makes private files (0600) and directories (0700); a run directory shared between users
    or nodes needs the permissions the umask gives ordinary files (0644 / 0755 with umask 022)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        follow_umask(tmp)
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


class ManifestError(ValueError):
    """``manifest.json`` cannot be read or has the wrong shape. Nothing is lost: every finished stage keeps
    its own ``stage.json``, from which ``sipo_fast.pipeline.repair`` rebuilds the manifest."""


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
    source); a directory made with a different identity is refused rather than silently mixed. Callers hold
    the directory's lock (:mod:`.lock`) while they write.
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
        old = data.get("identity")
        if old == identity:
            return
        if old is not None and (data["stages"] or (self.root / WORK).is_dir()):
            diff = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
            raise ValueError(f"{self.root} was made by an incompatible config (differs in {sorted(diff)}: "
                             f"{ {k: f'{a!r} -> {b!r}' for k, (a, b) in diff.items()} }); use a new --output-dir, "
                             f"or pass --force to discard that run")
        self._save_manifest({**data, "format": FORMAT, "identity": identity})

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


def __getattr__(name: str):
    """``Parts`` and ``crash_point`` live in :mod:`.parts` (which builds on the writers above); they are still
    importable from here, where they were first defined."""
    if name in ("Parts", "crash_point"):
        from . import parts

        return getattr(parts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
