"""``mailrelayd backup DIR`` and ``mailrelayd restore DIR``.

Backup runs in the CLI's own process, straight against the daemon's WAL databases, not inside
the daemon through the admin socket: in WAL mode a reader never blocks the writer, and SQLite's
online backup API (https://sqlite.org/backup.html) copying everything in one step holds one read
transaction, so the copy is the database exactly as of one commit while the daemon keeps
accepting and delivering. Doing it in the daemon would only add a thread and a request protocol
to the process that must stay fast, and would not work with the daemon stopped. Every message
whose 250 was sent before the backup started is in the copy (a 250 is sent only after its
commit).

Restore checks the backup (manifest, ``PRAGMA quick_check``, the tables we need) and installs it
into a stopped set-up: it takes the spool lock (see :mod:`mailrelayd.spool.lock`), so it refuses
while a daemon owns the spool, and it never deletes what it replaces (moved aside unless the
set-up is empty).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from mailrelayd import __version__
from mailrelayd.config import Config
from mailrelayd.spool.lock import SpoolLock, SpoolLockedError
from mailrelayd.spool.store import check_database

MANIFEST = "manifest.json"
FORMAT = 1


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class DbFile:
    """One database of a set-up: its name in the backup and where it lives."""

    name: str
    path: Path
    required_tables: tuple[str, ...]


def databases(cfg: Config) -> list[DbFile]:
    return [
        DbFile("spool.db", cfg.server.spool_dir / "spool.db", ("messages", "bodies", "recipients", "history")),
        DbFile("suppressions.db", cfg.server.state_dir / "suppressions.db", ()),
    ]


@dataclass(frozen=True)
class BackupResult:
    directory: Path
    files: dict[str, int]
    """Name -> bytes."""
    messages: int
    seconds: float


def backup(cfg: Config, directory: Path) -> BackupResult:
    """Copy every database of ``cfg`` into ``directory`` (created; must be empty or absent)."""
    t0 = time.monotonic()
    if directory.exists() and any(directory.iterdir()):
        raise BackupError(f"{directory}: not empty (give a new directory for each backup)")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)  # the copy holds message bodies
    files: dict[str, int] = {}
    messages = 0
    for db in databases(cfg):
        if not db.path.exists():
            continue
        tmp = directory / f".{db.name}.tmp"
        _copy(db.path, tmp)
        check_database(tmp)
        os.replace(tmp, directory / db.name)
        files[db.name] = (directory / db.name).stat().st_size
        if db.name == "spool.db":
            messages = _count_messages(directory / db.name)
    if "spool.db" not in files:
        raise BackupError(f"{cfg.server.spool_dir / 'spool.db'}: no spool to back up")
    manifest = {"format": FORMAT, "version": __version__, "created_at": time.time(), "host": socket.gethostname(),
                "config": str(cfg.source), "files": files, "messages": messages}
    _write_file(directory / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    _fsync_dir(directory)
    return BackupResult(directory, files, messages, time.monotonic() - t0)


def _copy(src: Path, dst: Path) -> None:
    """The online backup: one ``backup()`` step of all pages = one read snapshot of ``src``."""
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    try:
        source.execute("PRAGMA busy_timeout = 30000")
        target = sqlite3.connect(str(dst))
        try:
            source.backup(target, pages=-1)
            target.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal
        finally:
            target.close()
    finally:
        source.close()
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o600)
        os.fsync(fd)
    finally:
        os.close(fd)


def _count_messages(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
    finally:
        conn.close()


@dataclass(frozen=True)
class RestoreResult:
    installed: dict[str, Path]
    moved_aside: list[Path]
    messages: int


def verify(directory: Path) -> dict[str, object]:
    """Check a backup directory; returns its manifest. Raises BackupError."""
    mpath = directory / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise BackupError(f"{mpath}: missing (not a mailrelayd backup directory)") from None
    except (OSError, ValueError) as e:
        raise BackupError(f"{mpath}: unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
            not isinstance(manifest.get("files"), dict):
        raise BackupError(f"{mpath}: unknown backup format")
    for name in manifest["files"]:
        if name not in ("spool.db", "suppressions.db"):
            raise BackupError(f"{mpath}: unexpected file {name!r}")
        path = directory / name
        if not path.is_file():
            raise BackupError(f"{path}: missing from the backup")
        check_database(path)
    if "spool.db" not in manifest["files"]:
        raise BackupError(f"{mpath}: the backup has no spool.db")
    return manifest


def restore(cfg: Config, directory: Path, *, force: bool = False) -> RestoreResult:
    """Install the backup in ``directory`` as the set-up's databases. The daemon must be stopped."""
    manifest = verify(directory)
    lock = SpoolLock(cfg.server.spool_dir)
    try:
        lock.acquire()
    except SpoolLockedError as e:
        raise BackupError(f"{e}: stop the daemon first (systemctl stop mailrelayd)") from None
    try:
        targets = [db for db in databases(cfg) if db.name in manifest["files"]]  # type: ignore[operator]
        existing = [p for db in targets for p in _db_files(db.path) if p.exists()]
        if existing and not force and any(_has_data(db.path) for db in targets):
            raise BackupError(f"{existing[0]}: exists and holds data; restore --force moves it aside "
                              "(nothing is deleted)")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved: list[Path] = []
        for p in existing:
            aside = p.with_name(f"{p.name}.before-restore-{stamp}")
            os.replace(p, aside)
            moved.append(aside)
        installed: dict[str, Path] = {}
        for db in targets:
            db.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = db.path.with_name(f".{db.name}.restore-tmp")
            _copy(directory / db.name, tmp)
            _same_owner_as_dir(tmp)
            os.replace(tmp, db.path)
            _fsync_dir(db.path.parent)
            installed[db.name] = db.path
        return RestoreResult(installed, moved, _count_messages(cfg.server.spool_dir / "spool.db"))
    finally:
        lock.release()


def _db_files(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def _has_data(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            return any(conn.execute(f'SELECT 1 FROM "{t}" LIMIT 1').fetchone() for t in tables)
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return True  # unreadable counts as data: only --force moves it aside


def _same_owner_as_dir(path: Path) -> None:
    """Run as root for a daemon that runs as its own user: the files belong to that user."""
    if os.geteuid() != 0:
        return
    st = path.parent.stat()
    os.chown(path, st.st_uid, st.st_gid)


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
