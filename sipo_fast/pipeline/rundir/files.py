"""The files of a run directory: content hashes, per-file records, atomic writes, JSON lines.

Everything is written to a temporary name first (ending in ``TMP_SUFFIX``) and moved into place with
``os.replace`` / ``os.rename``, so a killed process leaves either the old file or the new one, never half of
one. An artifact's content hash covers every file except its logs, the rendered report and the score cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from .lock import LOCK

STAGE_JSON = "stage.json"
# Every temporary name the project writes ends in TMP_SUFFIX, so a file left by a kill -9 between creating and
# renaming it is recognisably ours: directory scans and artifact hashes skip it (see is_scratch).
TMP_SUFFIX = ".sipo-tmp"


def is_scratch(name: str) -> bool:
    """Is ``name`` one of the project's own lock or temporary files (never user data, never an artifact)?"""
    return name == LOCK or (name.startswith(".") and name.endswith(TMP_SUFFIX))


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
