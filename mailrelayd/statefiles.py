"""File modes for what the daemon and the CLI keep on disk: queued message bodies, suppression lists,
kept feedback reports. Owner read-write (0600; 0640 if an operator granted group read), never world
readable, whatever the process umask (``make run`` and containers often run with 022).

SQLite creates a database 0644 minus the umask, and creates its ``-wal``/``-shm``/``-journal`` files with
the mode of the database file, so creating the database file ourselves first makes all of them private.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from pathlib import Path

from mailrelayd.errors import SpoolCorruptError

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o750
# The most a state file may allow: owner read-write, group read.
_MAX_FILE = 0o640
SQLITE_SIDECARS = ("-wal", "-shm", "-journal")


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) 0750 if missing; an existing directory is left as the operator set it."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    return path


def restrict(path: Path) -> None:
    """Clear any permission beyond owner read-write and group read on an existing file we own (a
    read-only user of the file, such as an operator in the group running the CLI, leaves it alone)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(st.st_mode)
    if mode & ~_MAX_FILE and st.st_uid == os.geteuid():
        os.chmod(path, mode & _MAX_FILE)


def prepare_sqlite(path: Path) -> None:
    """Make sure the SQLite database at ``path`` is created 0600 (or tightened, if an older version
    created it 0644), and so are its WAL, shared-memory and rollback-journal files."""
    private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE))
    except FileExistsError:
        pass
    restrict(path)
    for suffix in SQLITE_SIDECARS:
        restrict(path.with_name(path.name + suffix))


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file created 0600 (fsynced), for state such as a kept report."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


CREATED_SUFFIX = ".created"
"""``spool.db.created`` (``suppressions.db.created``) beside a database: written once its schema is
committed. SQLite takes a missing or zero-length file for a new, empty database, and a spool whose
tables were only in a lost ``-wal`` opens as one too: without this marker, a spool.db truncated,
deleted or left without its WAL would start as an empty queue, every message in it silently gone."""


def created_marker(path: Path) -> Path:
    return path.with_name(path.name + CREATED_SUFFIX)


def mark_created(path: Path) -> None:
    """Write ``path``'s marker (fsynced, with its directory) if it is not there yet. Best effort: a
    full disk or a read-only directory must not keep the daemon from starting (the next start tries
    again); the marker is a safety net, not part of the data."""
    marker = created_marker(path)
    if marker.exists():
        return
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"This database was created here; see mailrelayd.statefiles.CREATED_SUFFIX.\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(marker.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        with contextlib.suppress(OSError):
            marker.unlink()  # an empty or unsynced marker is no proof of anything


def check_not_vanished(conn: sqlite3.Connection, path: Path, table: str) -> None:
    """Raise :class:`SpoolCorruptError` if ``path`` once held our schema (its marker exists) but
    ``table`` is gone: the file was truncated, deleted or replaced, or its WAL was lost."""
    try:
        found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    except sqlite3.Error as e:
        raise SpoolCorruptError(str(path), str(e)) from None
    if found is None and created_marker(path).exists():
        raise SpoolCorruptError(str(path), f"it is empty or missing, but {created_marker(path).name} shows it "
                                "held data: it was truncated, deleted or lost its -wal file. If starting "
                                f"empty is intended, delete {created_marker(path)}")
