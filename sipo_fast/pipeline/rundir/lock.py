"""An exclusive lock on a run directory, held for a whole run by its one writer (rank 0 under accelerate).

Two ``sipo-fast run`` on one directory would each take the other's ``.work`` for an interrupted run and
overwrite or delete it; the lock refuses the second one at once, naming the holder.

How: ``fcntl.flock`` on ``<run dir>/.lock``. The kernel drops a flock when its process dies (kill -9 included),
so a lock left by a dead process is never held: the next run takes it and logs whose it was. The file's
content (pid, host, start time, command) is only for messages. On NFS, Linux emulates flock with POSIX
byte-range locks, so the lock also holds between nodes sharing a run directory.

After taking the lock the path is checked to still name the locked file: a directory moved aside by
``--force`` between our ``open`` and ``flock`` would otherwise give us a lock on the old directory.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger("sipo_fast.pipeline")
LOCK = ".lock"


class RunLockedError(ValueError):
    """The run directory is locked by another live process."""


def holder(root: Path) -> dict | None:
    """Who holds ``root``'s lock now ({pid, host, since, command}), or None if nobody does.

    Read-only (``sipo-fast status``, ``--dry-run``): probes with a shared non-blocking flock on the existing
    file, never creates it."""
    path = Path(root) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return _read_info(fd)
        raise
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (since {info.get('since', '?')}, "
            f"command: {info.get('command', '?')})")


def _read_info(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 65536).decode("utf-8", "replace") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError) as exc:
        return isinstance(exc, PermissionError)  # EPERM: alive, owned by someone else
    return True


class RunLock:
    """``with RunLock(dir):`` or ``acquire()`` / ``release()``. Non-blocking: a held lock raises
    :class:`RunLockedError` at once with the holder's pid and host."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.fd: int | None = None

    @property
    def path(self) -> Path:
        return self.root / LOCK

    def acquire(self) -> "RunLock":
        if self.fd is not None:
            return self
        for _ in range(10):  # retried only when the directory is swapped under us (see module docstring)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # mode filtered by the umask
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                info = _read_info(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise RunLockedError(f"{self.root} is in use by another sipo-fast run: {describe(info)}; wait "
                                         "for it to finish or stop it, or use another --output-dir") from None
                raise
            if self._same_file(fd):
                self.fd = fd
                self._stamp()
                return self
            os.close(fd)
        raise RunLockedError(f"{self.root}: could not lock {LOCK}: the directory keeps being replaced")

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _stamp(self) -> None:
        """Record who holds the lock, after noting a previous holder that died without releasing it."""
        old = _read_info(self.fd)
        if old.get("pid") and not old.get("released"):
            same_host = old.get("host") == socket.gethostname()
            state = "no longer running" if same_host and not _pid_alive(old["pid"]) else "its lock was free"
            log.warning("%s: taking over the lock left by %s (%s)", self.root, describe(old), state)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
        self._write(info)

    def _write(self, info: dict) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self._write({**_read_info(self.fd), "released": True})  # a clean exit: the next run need not warn
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
