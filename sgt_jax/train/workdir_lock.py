"""One run per workdir: an exclusive `fcntl.flock` on WORKDIR/.lock, holding "host pid".

Taken on process 0 before anything is written, so a second run on the same workdir exits before it
can write a step directory or a metrics row. The kernel drops a flock when its holder dies; a lock
still held although the pid written in it is dead on this host (an orphaned child inherited the
descriptor) is reclaimed by replacing the file. Object stores (gs://, s3://) have no flock: there a
warning says so, and the run relies on Orbax refusing to overwrite a committed step.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"
_held: dict[str, "WorkdirLock"] = {}  # absolute workdir -> the lock this process holds


class WorkdirLocked(RuntimeError):
    """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkdirLock:
    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._fd: int | None = None
        self._depth = 0

    def _holder(self) -> tuple[str, int | None]:
        try:
            with open(self.path) as f:
                parts = f.read().split()
            return parts[0], int(parts[1])
        except (OSError, ValueError, IndexError):
            return "?", None

    def _try_lock(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return True

    def acquire(self) -> "WorkdirLock":
        if self._fd is not None:
            self._depth += 1
            return self
        os.makedirs(self.workdir, exist_ok=True)
        if not self._try_lock():
            host, pid = self._holder()
            if host == socket.gethostname() and pid is not None and not _pid_alive(pid):
                log.warning("%s names pid %d on this host, which is dead: reclaiming the stale lock", self.path, pid)
                os.unlink(self.path)  # the orphan keeps its (now unlinked) inode locked
                if self._try_lock():
                    self._depth = 1
                    return self
                host, pid = self._holder()
            raise WorkdirLocked(f"another run holds this workdir ({host}, pid {pid}): {self.workdir} "
                                f"(lock file {self.path}); wait for it, stop it, or use another --workdir")
        self._depth = 1
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        _held.pop(self.workdir, None)


def acquire(workdir: str) -> WorkdirLock | None:
    """Lock `workdir` for this process (re-entrant); None where no lock is possible (object stores)."""
    if "://" in workdir:
        log.warning("workdir %s is on an object store, which has no file locks: no workdir lock is taken. "
                    "Do not start two runs on it; a second run fails when Orbax finds a committed step.", workdir)
        return None
    key = os.path.abspath(workdir)
    lock = _held.get(key) or WorkdirLock(key)
    lock.acquire()
    _held[key] = lock
    return lock
