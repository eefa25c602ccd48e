"""One process owns a spool: a second daemon on the same spool would deliver every message twice."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mailrelayd.statefiles import private_dir


class SpoolLockedError(Exception):
    """Another process holds the spool."""


class SpoolLock:
    """An exclusive ``flock`` on ``<spool_dir>/lock``, held for the life of the process that owns the
    spool (released by the kernel on any exit, kill -9 included, so it never goes stale)."""

    def __init__(self, spool_dir: Path) -> None:
        self.path = spool_dir / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLockedError(f"{self.path.parent}: spool is in use by another mailrelayd process") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SpoolLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
