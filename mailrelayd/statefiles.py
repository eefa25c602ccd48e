"""File modes for what the daemon and the CLI keep on disk: queued message bodies, suppression lists,
kept feedback reports. Owner read-write (0600; 0640 if an operator granted group read), never world
readable, whatever the process umask (``make run`` and containers often run with 022).

SQLite creates a database 0644 minus the umask, and creates its ``-wal``/``-shm``/``-journal`` files with
the mode of the database file, so creating the database file ourselves first makes all of them private.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

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
