"""The suppression list: addresses we no longer send to.

:class:`SuppressionStore` is the interface; :class:`SqliteSuppressionStore` the implementation for
one host, :class:`mailrelayd.feedback.pgstore.PostgresSuppressionStore` the one shared by a fleet
(``[feedback] store = "postgresql://..."``); :func:`open_store` picks one from the config.

Kinds: ``hard_bounce`` and ``complaint`` suppress at once; ``soft_bounce`` only after
``soft_threshold`` soft bounces within ``soft_window`` seconds (each soft bounce is kept as a
row of its own until it leaves the window); ``manual`` comes from the CLI or an import.
Sources: ``dsn``, ``arf``, ``smtp`` (a synchronous reply to our own delivery attempt),
``manual``.

Concurrency: the daemon writes from a worker thread and asks :meth:`is_suppressed` on the
event loop, while the CLI may open the same file from another process. SQLite runs in WAL
mode with a busy timeout; every change to the suppressions bumps a generation counter in
the database, and :meth:`SqliteSuppressionStore.refresh` (one ``PRAGMA data_version`` when
nothing changed) reloads the in-memory set when another process changed it.
"""

from __future__ import annotations

import csv
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from mailrelayd.config import FeedbackConfig

from mailrelayd.errors import SpoolCorruptError
from mailrelayd.feedback.addresses import normalise_domain
from mailrelayd.reasons import reason_text
from mailrelayd.statefiles import check_not_vanished, mark_created, prepare_sqlite

KINDS = ("hard_bounce", "complaint", "soft_bounce", "manual")
SOURCES = ("dsn", "arf", "smtp", "manual")
# When an address is suppressed again for another reason, the stored kind only moves up.
_RANK = {"soft_bounce": 1, "hard_bounce": 2, "complaint": 3, "manual": 4}
_SCHEMA_VERSION = 1
_CORRUPT_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppressions (
    address    TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    reason     TEXT NOT NULL DEFAULT '',
    source     TEXT NOT NULL DEFAULT '',
    queue_id   TEXT NOT NULL DEFAULT '',
    first_seen REAL NOT NULL,
    last_seen  REAL NOT NULL,
    count      INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS suppressions_kind ON suppressions (kind);
CREATE INDEX IF NOT EXISTS suppressions_last_seen ON suppressions (last_seen);
CREATE TABLE IF NOT EXISTS soft_bounces (
    id       INTEGER PRIMARY KEY,
    address  TEXT NOT NULL,
    reason   TEXT NOT NULL DEFAULT '',
    source   TEXT NOT NULL DEFAULT '',
    queue_id TEXT NOT NULL DEFAULT '',
    seen     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS soft_bounces_address_seen ON soft_bounces (address, seen);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', 1), ('generation', 0);
"""
EXPORT_COLUMNS = ("address", "reason", "kind", "source", "queue_id", "first_seen", "last_seen", "count")
SUPPRESSING_KINDS = ("hard_bounce", "complaint", "manual")
"""Kinds that suppress on their first record (a soft bounce only past the threshold)."""


@dataclass(frozen=True)
class Suppression:
    """One suppressed address. Times are Unix timestamps (seconds)."""

    address: str
    kind: str
    reason: str
    source: str
    queue_id: str
    first_seen: float
    last_seen: float
    count: int


def normalise(address: str, *, case_insensitive_local: bool = False) -> str:
    """The key an address is stored under: no ``<>``/spaces, domain lowercased without trailing dot
    and IDNA-encoded (U-labels become A-labels, as in :mod:`mailrelayd.smtp.address`), a UTF-8
    local part in NFC (RFC 6532 section 3.1).

    The local part is kept as given (RFC 5321 section 2.4: only the receiving host may treat
    it case-insensitively) unless ``case_insensitive_local``. Raises ``ValueError`` when the
    value is not ``local@domain``.
    """
    text = str(address).strip().strip("<>").strip()
    local, sep, domain = text.rpartition("@")
    domain = normalise_domain(domain)
    if not sep or not local or not domain or any(ch.isspace() or ord(ch) < 32 for ch in text):
        raise ValueError(f"not an address: {address!r}")
    if not local.isascii():
        local = unicodedata.normalize("NFC", local)
    return f"{local.lower() if case_insensitive_local else local}@{domain}"


@dataclass(frozen=True)
class StoreStatus:
    """Health of a store, for /ready and the metrics."""

    backend: str
    """``sqlite`` or ``postgresql``."""
    up: bool
    """False: degraded (the shared database is unreachable; the last known list is used)."""
    detail: str = ""
    outbox: int = 0
    """Feedback records kept locally, waiting for the shared database."""


class StoreUnavailableError(Exception):
    """The store's database cannot be reached (only a shared store raises it)."""


@runtime_checkable
class SuppressionStore(Protocol):
    """What the daemon and the CLI need from a suppression list."""

    def is_suppressed(self, address: str) -> bool:
        """Fast membership test, safe on the event loop (no I/O)."""
        ...

    def record(
        self, address: str, kind: str, reason: str, source: str, queue_id: str = "", now: float | None = None
    ) -> bool:
        """Record one bounce/complaint; True if the address is suppressed afterwards."""
        ...

    def add(self, address: str, reason: str, kind: str = "manual", source: str = "manual") -> bool:
        """Suppress an address by hand; True if it was not suppressed before."""
        ...

    def remove(self, address: str) -> bool:
        """Lift a suppression (and forget its soft bounces); True if there was one."""
        ...

    def get(self, address: str) -> Suppression | None:
        """The suppression record of an address, if any."""
        ...

    def list(self, kind: str | None = None, since: float | None = None) -> list[Suppression]:
        """Suppressions, optionally of one kind and last seen at or after ``since``."""
        ...

    def counts_by_kind(self) -> dict[str, int]:
        """Number of suppressed addresses per kind (every kind present, zeros included)."""
        ...

    def import_csv(self, fileobj: IO[str]) -> int:
        """Import ``address,reason[,kind]`` rows (with a header row); returns the number imported."""
        ...

    def export_csv(self, fileobj: IO[str]) -> None:
        """Write every suppression as CSV (importable again)."""
        ...

    def refresh(self) -> bool:
        """Pick up changes made by other processes; True if the in-memory view changed."""
        ...

    def status(self) -> StoreStatus:
        """Health, without I/O (safe on the event loop)."""
        ...

    def close(self) -> None:
        """Release the database."""
        ...


class SqliteSuppressionStore:
    """SQLite (WAL) suppression store with an in-memory set for :meth:`is_suppressed`.

    Memory: the set holds one ``str`` per suppressed address, about 100 bytes each on
    CPython 3.11 (a ~70-byte string object plus its hash-table slot), so roughly 100 MB per
    million suppressed addresses. Loading it at open (and on a :meth:`refresh` that sees a
    change) reads the ``address`` column once, about a second per million rows.

    Thread safety: database access is serialised by a lock, so the writing methods may be
    called from any thread; :meth:`is_suppressed` takes no lock (a set lookup) and never
    touches the database.
    """

    def __init__(
        self,
        path: Path,
        *,
        case_insensitive_local: bool = False,
        soft_threshold: int = 3,
        soft_window: float = 7 * 86400,
        busy_timeout: float = 5.0,
    ) -> None:
        if soft_threshold < 1 or soft_window <= 0:
            raise ValueError("soft_threshold must be >= 1 and soft_window > 0")
        self.path = Path(path)
        self.case_insensitive_local = case_insensitive_local
        self.soft_threshold = soft_threshold
        self.soft_window = soft_window
        self._lock = threading.Lock()
        # isolation_level=None: no implicit transactions; writes use BEGIN IMMEDIATE so two
        # processes never deadlock upgrading a read lock.
        prepare_sqlite(self.path)  # suppressions.db and its -wal/-shm: 0600 whatever the umask
        self._db = sqlite3.connect(
            str(self.path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._open(busy_timeout)
        except BaseException as e:
            self._db.close()
            code = getattr(e, "sqlite_errorcode", None)
            if isinstance(e, sqlite3.DatabaseError) and code is not None and (code & 0xFF) in _CORRUPT_CODES:
                # One line naming the file (the CLI used to say only "database disk image is malformed").
                raise SpoolCorruptError(str(self.path), str(e)) from None
            raise

    def _open(self, busy_timeout: float) -> None:
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        with self._lock:
            # A suppressions.db truncated, deleted or without its -wal would open empty: every
            # suppressed address mailed again. Refused (SpoolCorruptError) if it once held the list.
            check_not_vanished(self._db, self.path, "suppressions")
            self._write_script(_SCHEMA)
            mark_created(self.path)
            version = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: schema version {version} is newer than this mailrelayd")
            self._suppressed: set[str] = set()
            self._generation = -1
            self._data_version = -1
            self._reload()

    # --- helpers ------------------------------------------------------------------------------

    def _key(self, address: str) -> str:
        return normalise(address, case_insensitive_local=self.case_insensitive_local)

    def _write_script(self, script: str) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in script.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _reload(self) -> None:
        """Load the set and the generation (caller holds the lock)."""
        self._data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
        self._generation = self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]
        # Build a new set and swap it in: readers on other threads see the old or the new one.
        self._suppressed = {row[0] for row in self._db.execute("SELECT address FROM suppressions")}

    def _bump(self) -> None:
        """Advance the generation inside the current write transaction (caller holds the lock)."""
        self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
        generation = self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]
        if generation != self._generation + 1:
            self._generation = -1  # another process wrote in between: reload after commit
        else:
            self._generation = generation

    def _transaction(self) -> _Transaction:
        return _Transaction(self)

    @staticmethod
    def _row(row: tuple[object, ...]) -> Suppression:
        address, kind, reason, source, queue_id, first_seen, last_seen, count = row
        return Suppression(
            str(address),
            str(kind),
            str(reason),
            str(source),
            str(queue_id),
            float(first_seen),
            float(last_seen),
            int(count),
        )  # type: ignore[arg-type]

    def _upsert(
        self, key: str, kind: str, reason: str, source: str, queue_id: str, now: float, count: int = 1
    ) -> bool:
        """Insert or update one suppression row (inside a transaction); True if it is new."""
        current = self._db.execute("SELECT kind FROM suppressions WHERE address = ?", (key,)).fetchone()
        if current is None:
            self._db.execute(
                "INSERT INTO suppressions"
                " (address, kind, reason, source, queue_id, first_seen, last_seen, count)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, kind, reason, source, queue_id, now, now, count),
            )
            return True
        if _RANK.get(kind, 0) >= _RANK.get(str(current[0]), 0):
            self._db.execute(
                "UPDATE suppressions SET kind = ?, reason = ?, source = ?, queue_id = ?, last_seen = ?,"
                " count = count + 1 WHERE address = ?",
                (kind, reason, source, queue_id, now, key),
            )
        else:  # a hard bounce after a complaint: keep the stronger kind, note the event
            self._db.execute(
                "UPDATE suppressions SET last_seen = ?, count = count + 1 WHERE address = ?", (now, key)
            )
        return False

    # --- reads ------------------------------------------------------------------------------------

    def is_suppressed(self, address: str) -> bool:
        """True if ``address`` is suppressed. A set lookup: no I/O, no lock, safe on the event loop."""
        try:
            return self._key(address) in self._suppressed
        except ValueError:
            return False

    def __len__(self) -> int:
        return len(self._suppressed)

    def get(self, address: str) -> Suppression | None:
        """The suppression record of ``address``, or ``None``."""
        key = self._key(address)
        with self._lock:
            row = self._db.execute(
                "SELECT address, kind, reason, source, queue_id, first_seen, last_seen, count"
                " FROM suppressions WHERE address = ?",
                (key,),
            ).fetchone()
        return self._row(row) if row else None

    def list(self, kind: str | None = None, since: float | None = None) -> list[Suppression]:
        """Suppressions ordered by address, optionally of one ``kind`` and last seen at or after ``since``."""
        sql = "SELECT address, kind, reason, source, queue_id, first_seen, last_seen, count FROM suppressions"
        where, args = [], []
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if since is not None:
            where.append("last_seen >= ?")
            args.append(since)
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY address", args).fetchall()
        return [self._row(row) for row in rows]

    def counts_by_kind(self) -> dict[str, int]:
        """Suppressed addresses per kind; every kind is present (for a Prometheus gauge)."""
        counts = dict.fromkeys(KINDS, 0)
        with self._lock:
            for kind, count in self._db.execute("SELECT kind, COUNT(*) FROM suppressions GROUP BY kind"):
                counts[str(kind)] = int(count)
        return counts

    def soft_bounce_count(self, address: str, now: float | None = None) -> int:
        """Soft bounces recorded for ``address`` within the window ending at ``now``."""
        now = time.time() if now is None else now
        key = self._key(address)
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM soft_bounces WHERE address = ? AND seen > ?",
                (key, now - self.soft_window),
            ).fetchone()
        return int(row[0])

    # --- writes -----------------------------------------------------------------------------------

    def record(
        self, address: str, kind: str, reason: str, source: str, queue_id: str = "", now: float | None = None
    ) -> bool:
        """Record one bounce or complaint for ``address``; returns True if it is suppressed afterwards.

        ``hard_bounce``, ``complaint`` and ``manual`` suppress immediately. A ``soft_bounce`` is
        stored on its own and suppresses (kind ``soft_bounce``) once ``soft_threshold`` of them
        fall within ``soft_window`` seconds, one per message (``queue_id``) at most. Raises
        ``ValueError`` for an unknown kind or a value that is not an address.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        key = self._key(address)
        now = time.time() if now is None else float(now)
        with self._lock, self._transaction():
            if kind != "soft_bounce":
                if self._upsert(key, kind, reason, source, queue_id, now):
                    self._suppressed.add(key)
                self._bump()
                return True
            if key in self._suppressed:
                self._db.execute(
                    "UPDATE suppressions SET last_seen = ?, count = count + 1 WHERE address = ?", (now, key)
                )
                self._bump()
                return True
            cutoff = now - self.soft_window
            self._db.execute("DELETE FROM soft_bounces WHERE address = ? AND seen <= ?", (key, cutoff))
            if queue_id and self._db.execute(
                    "SELECT 1 FROM soft_bounces WHERE address = ? AND queue_id = ? AND seen > ?",
                    (key, queue_id, cutoff)).fetchone():
                return False  # the same message's failure again (a copy, a retransmission): counted once
            self._db.execute(
                "INSERT INTO soft_bounces (address, reason, source, queue_id, seen) VALUES (?, ?, ?, ?, ?)",
                (key, reason, source, queue_id, now),
            )
            count = self._db.execute(
                "SELECT COUNT(*) FROM soft_bounces WHERE address = ? AND seen > ?", (key, cutoff)
            ).fetchone()[0]
            if count < self.soft_threshold:
                return False
            first = self._db.execute(
                "SELECT MIN(seen) FROM soft_bounces WHERE address = ?", (key,)
            ).fetchone()[0]
            self._db.execute(
                "INSERT INTO suppressions"
                " (address, kind, reason, source, queue_id, first_seen, last_seen, count)"
                " VALUES (?, 'soft_bounce', ?, ?, ?, ?, ?, ?)",
                (key, reason, source, queue_id, first, now, count),
            )
            self._suppressed.add(key)
            self._bump()
            return True

    def add(self, address: str, reason: str, kind: str = "manual", source: str = "manual") -> bool:
        """Suppress ``address`` (CLI ``suppress add``); True if it was not suppressed before."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        key = self._key(address)
        with self._lock, self._transaction():
            new = self._upsert(key, kind, reason, source, "", time.time())
            self._suppressed.add(key)
            self._bump()
        return new

    def remove(self, address: str) -> bool:
        """Lift the suppression of ``address`` and forget its soft bounces; True if it was suppressed."""
        key = self._key(address)
        with self._lock, self._transaction():
            removed = self._db.execute("DELETE FROM suppressions WHERE address = ?", (key,)).rowcount > 0
            self._db.execute("DELETE FROM soft_bounces WHERE address = ?", (key,))
            self._suppressed.discard(key)
            if removed:
                self._bump()
        return removed

    def prune(self, now: float | None = None) -> int:
        """Delete soft-bounce rows that left the window; returns how many. Call now and then."""
        cutoff = (time.time() if now is None else now) - self.soft_window
        with self._lock, self._transaction():
            return self._db.execute("DELETE FROM soft_bounces WHERE seen <= ?", (cutoff,)).rowcount

    def import_csv(self, fileobj: IO[str]) -> int:
        """Import ``address,reason[,kind[,source]]`` rows after a header row (all or nothing).

        Blank lines are skipped; an invalid address or kind raises ``ValueError`` naming the
        line, and nothing is imported. Returns the number of rows imported.
        """
        return self._add_many(parse_import_csv(fileobj, self._key))

    def _add_many(self, rows: Iterable[tuple[str, str, str, str]]) -> int:
        count = 0
        now = time.time()
        with self._lock, self._transaction():
            for key, reason, kind, source in rows:
                self._upsert(key, kind, reason, source, "", now)
                self._suppressed.add(key)
                count += 1
            if count:
                self._bump()
        return count

    def export_csv(self, fileobj: IO[str]) -> None:
        """Write all suppressions with a header row, times in ISO 8601 UTC; :meth:`import_csv` reads it."""
        write_export_csv(fileobj, self.list())

    # --- cross-process freshness ------------------------------------------------------------------

    def refresh(self) -> bool:
        """Reload the in-memory set if another process changed the suppressions.

        Cheap when nothing changed (one ``PRAGMA data_version``, which only moves when another
        connection commits); the daemon calls it every few seconds. Returns True if reloaded.
        """
        with self._lock:
            data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if data_version == self._data_version and self._generation >= 0:
                return False
            self._data_version = data_version
            generation = self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]
            if generation == self._generation:
                return False
            self._reload()
            return True

    def status(self) -> StoreStatus:
        """A local file: always up (a broken file shows up as errors, not as degraded)."""
        return StoreStatus("sqlite", True)

    def close(self) -> None:
        """Close the database connection (the store is unusable afterwards)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> SqliteSuppressionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` / ``ROLLBACK`` (the store's lock is already held)."""

    def __init__(self, store: SqliteSuppressionStore) -> None:
        self._store = store

    def __enter__(self) -> None:
        self._store._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        db = self._store._db
        if exc_type is None:
            db.execute("COMMIT")
            if self._store._generation < 0:
                self._store._reload()  # another process wrote during ours
        else:
            db.execute("ROLLBACK")
            self._store._reload()  # the in-memory set may have been touched


def parse_import_csv(fileobj: IO[str], key: Callable[[str], str]) -> list[tuple[str, str, str, str]]:
    """Rows ``(address key, reason, kind, source)`` of an ``address,reason[,kind[,source]]`` CSV with a
    header row. Blank lines are skipped; an invalid address or kind raises ``ValueError`` naming the
    line (so an import is all or nothing)."""
    reader = csv.DictReader(fileobj)
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    if "address" not in fields:
        raise ValueError("CSV header must name an 'address' column (address,reason[,kind])")
    reader.fieldnames = fields
    rows: list[tuple[str, str, str, str]] = []
    for row in reader:
        address = (row.get("address") or "").strip()
        if not address:
            continue
        kind = (row.get("kind") or "").strip() or "manual"
        source = (row.get("source") or "").strip() or "manual"
        if kind not in KINDS:
            raise ValueError(f"line {reader.line_num}: unknown kind {kind!r}")
        try:
            k = key(address)
            reason = reason_text(row.get("reason") or "")
        except ValueError as exc:
            raise ValueError(f"line {reader.line_num}: {exc}") from None
        rows.append((k, reason, kind, source))
    return rows


def write_export_csv(fileobj: IO[str], rows: Iterable[Suppression]) -> None:
    """Suppressions as CSV with a header row, times in ISO 8601 UTC (:func:`parse_import_csv` reads it)."""
    writer = csv.writer(fileobj)
    writer.writerow(EXPORT_COLUMNS)
    for s in rows:
        writer.writerow([s.address, s.reason, s.kind, s.source, s.queue_id, _iso(s.first_seen), _iso(s.last_seen),
                         s.count])


def open_store(fb: FeedbackConfig, state_dir: Path, *, daemon: bool) -> SuppressionStore:
    """The store the config names. ``daemon``: keep feedback in a local outbox while a shared
    database is unreachable (the CLI gets :class:`StoreUnavailableError` instead).

    Raises ``OSError`` (password file), ``RuntimeError`` (schema newer than this mailrelayd)."""
    if fb.store == "sqlite":
        return SqliteSuppressionStore(state_dir / "suppressions.db",
                                      case_insensitive_local=fb.case_insensitive_local_part,
                                      soft_threshold=fb.soft_bounce_threshold, soft_window=fb.soft_bounce_window)
    from mailrelayd.feedback.pgstore import PostgresSuppressionStore

    return PostgresSuppressionStore.open(fb, state_dir, daemon=daemon)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
