"""Resumable parts of a stage in progress, in its work directory (:meth:`.directory.RunDir.work_dir`)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .files import TMP_SUFFIX, follow_umask, write_jsonl


class Parts:
    """Resumable units of a stage (one objective's adapter, one weight's candidates): each part is a file
    or directory in the work directory, written atomically; a part that exists is finished.

    ``save_part_jsonl`` / ``save_part_dir`` write a part (it counts towards the crash point of the resume
    tests); ``write_jsonl`` writes any other file of the stage (a merged file, a copy), which is not a part.

    Under several processes (``dist``, see :mod:`sipo_fast.distributed`) only rank 0 writes; every write ends at
    a barrier, so that when a ``save_part_*``/``write_jsonl`` call returns on any rank the file is in place, and
    ``done`` answers rank 0's view on every rank, so all ranks skip (or run) the same parts together."""

    def __init__(self, work: Path, stage: str, crash_after: int | None = None, dist=None):
        self.work, self.stage, self.crash_after, self.done_here = work, stage, crash_after, 0
        if dist is None:
            from sipo_fast.distributed import Dist

            dist = Dist()
        self.dist = dist

    def path(self, name: str) -> Path:
        return self.work / name

    def done(self, name: str) -> bool:
        return self.dist.on_main(lambda: self.path(name).exists())

    def write_jsonl(self, name: str, rows: list[dict]) -> None:
        """Write a file of the stage that is not a resumable part (no crash point)."""
        self.dist.on_main(lambda: write_jsonl(self.path(name), rows))

    def remove(self, name: str) -> None:
        """Delete a scratch file or folder of the work directory, once every rank is past reading it."""
        self.dist.barrier()
        self.dist.on_main(lambda: shutil.rmtree(self.path(name)) if self.path(name).is_dir()
                          else self.path(name).unlink(missing_ok=True))

    def save_part_jsonl(self, name: str, rows: list[dict]) -> None:
        """Save a finished part as JSON lines."""
        self.dist.on_main(lambda: write_jsonl(self.path(name), rows))
        self._mark()

    def save_part_dir(self, name: str, writer) -> None:
        """Save a finished part as a directory: ``writer(tmp_dir)`` fills a temporary directory, which is then
        renamed to the part's name."""
        def run() -> None:
            final = self.path(name)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX, dir=final.parent))
            try:
                follow_umask(tmp, directory=True)
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
