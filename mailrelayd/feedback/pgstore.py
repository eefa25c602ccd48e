"""The suppression list in PostgreSQL, shared by every relay of a fleet.

Same semantics as :class:`~mailrelayd.feedback.store.SqliteSuppressionStore` (kinds only move
up, soft bounces suppress past a threshold within a window, CSV import/export), plus:

- **RCPT stays a set lookup.** Each node holds the suppressed addresses in memory. Every change
  bumps a generation counter and sends ``NOTIFY mailrelayd_suppressions`` with
  ``{"g": generation, "op": "add"|"remove"|"reload", "a": address}`` in the same transaction;
  nodes apply notifications in generation order (a gap is held back until it fills). The
  supervisor's poll compares the database generation with ours each ``store_poll_interval`` and
  reloads when we stay behind (a lost notification, or a pooler that drops LISTEN).
- **Degraded, never down.** Without the database, ``is_suppressed`` answers from the last known set
  (saved in a local snapshot, so a restart during the outage keeps it), and what the daemon learns
  meanwhile goes to a local SQLite outbox (fsync'd before the feedback message counts as processed),
  is enforced on this node at once, and is written to PostgreSQL, oldest first, when it returns.
  A record whose commit was cut off mid-flight may be replayed once (a count one too high).
- Writes for one address are serialised across nodes (``pg_advisory_xact_lock``), so two nodes
  counting soft bounces for the same address at once cannot both miss the threshold.

Threads: the database work runs on :class:`~mailrelayd.pg.PgClient`'s loop thread; the synchronous
methods below wait for it (the daemon calls them from worker threads, never from its event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mailrelayd.feedback.store import (
    KINDS,
    SUPPRESSING_KINDS,
    StoreStatus,
    StoreUnavailableError,
    Suppression,
    normalise,
    parse_import_csv,
    write_export_csv,
)
from mailrelayd.log import get_logger
from mailrelayd.pg import Conn, PgClient, PgSettings, PgUnavailable, SchemaTooNew

if TYPE_CHECKING:
    from mailrelayd.config import FeedbackConfig

log = get_logger()

CHANNEL = "mailrelayd_suppressions"
_LOCK_CLASS = 1  # pg_advisory_xact_lock(class, hashtext(address)): one writer per address at a time
_COLUMNS = "address, kind, reason, source, queue_id, first_seen, last_seen, count"
_RANKS = "ARRAY['soft_bounce', 'hard_bounce', 'complaint', 'manual']::text[]"
_STRONGER = f"coalesce(array_position({_RANKS}, EXCLUDED.kind), 0) >= coalesce(array_position({_RANKS}, s.kind), 0)"
# Insert, or merge into the existing row: the kind (and its reason/source/queue id) only moves up;
# the times widen; ``count`` adds up (``{flag}`` true = take the larger count instead, for idempotent copies).
_ON_CONFLICT = f"""
ON CONFLICT (address) DO UPDATE SET
    kind = CASE WHEN {_STRONGER} THEN EXCLUDED.kind ELSE s.kind END,
    reason = CASE WHEN {_STRONGER} THEN EXCLUDED.reason ELSE s.reason END,
    source = CASE WHEN {_STRONGER} THEN EXCLUDED.source ELSE s.source END,
    queue_id = CASE WHEN {_STRONGER} THEN EXCLUDED.queue_id ELSE s.queue_id END,
    first_seen = least(s.first_seen, EXCLUDED.first_seen),
    last_seen = greatest(s.last_seen, EXCLUDED.last_seen),
    count = CASE WHEN {{flag}} THEN greatest(s.count, EXCLUDED.count) ELSE s.count + EXCLUDED.count END
"""
_UPSERT = (f"INSERT INTO mailrelayd_suppressions AS s ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
           + _ON_CONFLICT.format(flag="$9") + " RETURNING (xmax = 0) AS inserted")
# Bulk (import, migrate): COPY into a temporary table, then one merge.
_UPSERT_BULK = (f"INSERT INTO mailrelayd_suppressions AS s ({_COLUMNS}) SELECT {_COLUMNS} FROM mailrelayd_bulk"
                + _ON_CONFLICT.format(flag="$1"))
_RANK = {"soft_bounce": 1, "hard_bounce": 2, "complaint": 3, "manual": 4}


def _bulk_timeout(rows: int) -> float:
    """Imports and migrations run for as long as they need: a minute plus a second per 2,000 rows."""
    return 60.0 + rows / 2000


def _merge_rows(rows: Iterable[tuple[Any, ...]], idempotent: bool) -> list[tuple[Any, ...]]:
    """One row per address (a single INSERT ... ON CONFLICT may not touch a row twice), merged by
    the same rules as the upsert, in order."""
    merged: dict[str, tuple[Any, ...]] = {}
    for row in rows:
        old = merged.get(row[0])
        if old is None:
            merged[row[0]] = row
            continue
        top = row if _RANK.get(row[1], 0) >= _RANK.get(old[1], 0) else old
        count = max(old[7], row[7]) if idempotent else old[7] + row[7]
        merged[row[0]] = (*top[:5], min(old[5], row[5]), max(old[6], row[6]), count)
    return list(merged.values())


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    op: str  # record | add | remove
    address: str
    kind: str
    reason: str
    source: str
    queue_id: str
    at: float


class Outbox:
    """Local SQLite file (``<state_dir>/suppressions-outbox.db``): feedback learned while the shared
    database was unreachable, and a snapshot of the last known list for a restart during an outage.

    The outbox is written with ``synchronous = FULL``: a feedback message is marked processed in the
    spool only after its record is durable here or in PostgreSQL."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), timeout=5.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        for sql in (
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY, op TEXT NOT NULL, address TEXT NOT NULL,"
            " kind TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '', source TEXT NOT NULL DEFAULT '',"
            " queue_id TEXT NOT NULL DEFAULT '', at REAL NOT NULL)",
            "CREATE TABLE IF NOT EXISTS snapshot (address TEXT PRIMARY KEY)",
        ):
            self._db.execute(sql)
        self.count = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def add(self, op: str, address: str, kind: str = "", reason: str = "", source: str = "", queue_id: str = "",
            at: float | None = None) -> None:
        with self._lock:
            self._db.execute("INSERT INTO outbox (op, address, kind, reason, source, queue_id, at)"
                             " VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (op, address, kind, reason, source, queue_id, time.time() if at is None else at))
            self.count += 1

    def pending(self, limit: int = 500) -> list[OutboxEntry]:
        with self._lock:
            rows = self._db.execute("SELECT id, op, address, kind, reason, source, queue_id, at FROM outbox"
                                    " ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [OutboxEntry(*row) for row in rows]

    def done(self, entry_id: int) -> None:
        with self._lock:
            if self._db.execute("DELETE FROM outbox WHERE id = ?", (entry_id,)).rowcount:
                self.count -= 1

    def suppressing(self) -> set[str]:
        """Addresses the outbox suppresses (to keep enforcing them across a reload or a restart)."""
        marks = ",".join("?" * len(SUPPRESSING_KINDS))
        with self._lock:
            rows = self._db.execute(f"SELECT address FROM outbox WHERE op IN ('record', 'add') AND kind IN ({marks})",
                                    SUPPRESSING_KINDS).fetchall()
        return {r[0] for r in rows}

    def snapshot(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT address FROM snapshot")}

    def save_snapshot(self, addresses: Iterable[str]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM snapshot")
                self._db.executemany("INSERT OR IGNORE INTO snapshot (address) VALUES (?)", ((a,) for a in addresses))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def snapshot_apply(self, op: str, address: str) -> None:
        with self._lock:
            if op == "add":
                self._db.execute("INSERT OR IGNORE INTO snapshot (address) VALUES (?)", (address,))
            elif op == "remove":
                self._db.execute("DELETE FROM snapshot WHERE address = ?", (address,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresSuppressionStore:
    """:class:`~mailrelayd.feedback.store.SuppressionStore` on PostgreSQL (see the module docstring)."""

    def __init__(self, client: PgClient, *, outbox: Outbox | None = None, case_insensitive_local: bool = False,
                 soft_threshold: int = 3, soft_window: float = 7 * 86400) -> None:
        if soft_threshold < 1 or soft_window <= 0:
            raise ValueError("soft_threshold must be >= 1 and soft_window > 0")
        self.client = client
        self.case_insensitive_local = case_insensitive_local
        self.soft_threshold = soft_threshold
        self.soft_window = soft_window
        self._outbox = outbox
        # The last known list: from the snapshot until the first load from PostgreSQL.
        self._suppressed: set[str] = (outbox.snapshot() | outbox.suppressing()) if outbox else set()
        self._generation = -1
        self._pending: dict[int, tuple[str, str]] = {}
        self._reloading = False
        self._behind_at: int | None = None  # our generation when a poll last found us behind
        self._flushing = False
        # Snapshot writes, in order, off the database loop.
        self._local = ThreadPoolExecutor(max_workers=1, thread_name_prefix="suppress-local")
        client.listen(CHANNEL, self._notified)
        client.on_connect(self._reload)
        client.on_connect(self._flush)
        client.on_poll(self._poll)

    @classmethod
    def open(cls, fb: FeedbackConfig, state_dir: Path, *, daemon: bool) -> PostgresSuppressionStore:
        """Connect (waiting up to ``store_connect_timeout`` for the first attempt). The daemon carries
        on degraded when the database is down; the CLI raises :class:`StoreUnavailableError`."""
        settings = PgSettings(fb.store, fb.store_password_file, fb.store_poll_interval, fb.store_connect_timeout)
        client = PgClient(settings, name="suppress-pg")
        outbox = Outbox(state_dir / "suppressions-outbox.db") if daemon else None
        store = cls(client, outbox=outbox, case_insensitive_local=fb.case_insensitive_local_part,
                    soft_threshold=fb.soft_bounce_threshold, soft_window=fb.soft_bounce_window)
        try:
            up = client.start(wait=fb.store_connect_timeout * 2 + 1)
        except SchemaTooNew as e:
            store.close()
            raise RuntimeError(f"{settings.where}: {e}") from None
        if not up:
            if not daemon:
                error = client.last_error
                store.close()
                raise StoreUnavailableError(f"PostgreSQL at {settings.where} is unreachable: {error}")
            log.warning("suppressions.degraded", store=settings.where, error=client.last_error,
                        known=len(store._suppressed), outbox=outbox.count if outbox else 0)
        return store

    # --- helpers ---------------------------------------------------------------------------------
    def _key(self, address: str) -> str:
        return normalise(address, case_insensitive_local=self.case_insensitive_local)

    def _call(self, fn: Any, timeout: float | None = None) -> Any:
        try:
            return self.client.call(fn, timeout)
        except PgUnavailable as e:
            raise StoreUnavailableError(f"PostgreSQL at {self.client.settings.where} is unreachable: {e}") from None

    @staticmethod
    def _row(row: Any) -> Suppression:
        return Suppression(str(row[0]), str(row[1]), str(row[2]), str(row[3]), str(row[4]), float(row[5]),
                           float(row[6]), int(row[7]))

    async def _bump(self, conn: Conn, op: str, key: str) -> int:
        """Next generation + NOTIFY, inside the caller's transaction (delivered at commit, in order)."""
        g = int(await conn.fetchval("UPDATE mailrelayd_meta SET value = value + 1 WHERE key = 'generation'"
                                    " RETURNING value"))
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, json.dumps({"g": g, "op": op, "a": key}))
        return g

    # --- the in-memory set (all on the database loop) -------------------------------------------
    def _notified(self, payload: str) -> None:
        try:
            data = json.loads(payload)
            g, op, key = int(data["g"]), str(data["op"]), str(data.get("a", ""))
        except (ValueError, KeyError, TypeError):
            log.warning("suppressions.bad_notification", payload=payload[:200])
            return
        self._apply(g, op, key)

    def _apply(self, g: int, op: str, key: str) -> None:
        if g <= self._generation:
            return  # already in what we loaded
        self._pending[g] = (op, key)
        if self._reloading:
            return
        while self._generation + 1 in self._pending:
            self._generation += 1
            op, key = self._pending.pop(self._generation)
            if op == "add":
                self._suppressed.add(key)
            elif op == "remove" and (self._outbox is None or key not in self._outbox_suppressing()):
                self._suppressed.discard(key)
            elif op == "reload":
                self.client.submit(lambda: self.client.acall(self._reload))
                return
            if self._outbox is not None and op in ("add", "remove"):
                self._local.submit(self._outbox.snapshot_apply, op, key)

    def _outbox_suppressing(self) -> set[str]:
        # Only consulted on a remove while records wait in the outbox (rare): the outbox wins until flushed.
        return self._outbox.suppressing() if self._outbox is not None and self._outbox.count else set()

    async def _reload(self, conn: Conn) -> None:
        """Load the whole list and its generation in one snapshot; apply notifications that came meanwhile."""
        self._reloading = True
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                g = int(await conn.fetchval("SELECT value FROM mailrelayd_meta WHERE key = 'generation'"))
                rows = await conn.fetch("SELECT address FROM mailrelayd_suppressions")
            loaded = {r[0] for r in rows}
            local = self._outbox_suppressing()
            self._suppressed = loaded | local  # swapped as a whole: readers see the old or the new set
            self._generation = g
            for stale in [k for k in self._pending if k <= g]:
                del self._pending[stale]
            self._behind_at = None
        finally:
            self._reloading = False
        if self._pending:
            first = min(self._pending)
            self._apply(first, *self._pending.pop(first))
        if self._outbox is not None:
            await asyncio.get_running_loop().run_in_executor(self._local, self._outbox.save_snapshot, loaded)
        log.info("suppressions.loaded", addresses=len(loaded), generation=g)

    async def _poll(self, conn: Conn) -> None:
        g = int(await conn.fetchval("SELECT value FROM mailrelayd_meta WHERE key = 'generation'"))
        if g > self._generation:
            if self._behind_at == self._generation:  # no progress since the last poll: notifications lost
                log.info("suppressions.resync", ours=self._generation, theirs=g)
                await self._reload(conn)
            else:
                self._behind_at = self._generation
        else:
            self._behind_at = None
        if self._outbox is not None and self._outbox.count:
            await self._flush(conn)

    async def _flush(self, conn: Conn) -> None:
        """Write the outbox to PostgreSQL, oldest first; each entry leaves the outbox after its commit."""
        if self._outbox is None or not self._outbox.count or self._flushing:
            return
        self._flushing = True
        loop = asyncio.get_running_loop()
        written = 0
        try:
            while True:
                entries = await loop.run_in_executor(self._local, self._outbox.pending)
                if not entries:
                    break
                for e in entries:
                    if e.op == "remove":
                        await self._remove_db(conn, e.address)
                    elif e.op == "add":
                        await self._add_db(conn, e.address, e.kind, e.reason, e.source, e.at)
                    else:
                        await self._record_db(conn, e.address, e.kind, e.reason, e.source, e.queue_id, e.at)
                    await loop.run_in_executor(self._local, self._outbox.done, e.id)
                    written += 1
        finally:
            self._flushing = False
            if written:
                log.info("suppressions.outbox_flushed", records=written, left=self._outbox.count)

    # --- database operations (on the database loop) ---------------------------------------------
    async def _lock(self, conn: Conn, key: str) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _LOCK_CLASS, key)

    async def _record_db(self, conn: Conn, key: str, kind: str, reason: str, source: str, queue_id: str,
                         now: float) -> bool:
        g = None
        async with conn.transaction():
            await self._lock(conn, key)
            if kind != "soft_bounce":
                await conn.fetchval(_UPSERT, key, kind, reason, source, queue_id, now, now, 1, False)
                g = await self._bump(conn, "add", key)
                result = True
            elif await conn.fetchval("SELECT 1 FROM mailrelayd_suppressions WHERE address = $1", key):
                await conn.execute("UPDATE mailrelayd_suppressions SET last_seen = greatest(last_seen, $2),"
                                   " count = count + 1 WHERE address = $1", key, now)
                g = await self._bump(conn, "add", key)
                result = True
            else:
                cutoff = now - self.soft_window
                await conn.execute("DELETE FROM mailrelayd_soft_bounces WHERE address = $1 AND seen <= $2",
                                   key, cutoff)
                if queue_id and await conn.fetchval(
                        "SELECT 1 FROM mailrelayd_soft_bounces WHERE address = $1 AND queue_id = $2 AND seen > $3",
                        key, queue_id, cutoff):
                    return False  # the same message's failure again: counted once (as the SQLite store)
                await conn.execute("INSERT INTO mailrelayd_soft_bounces (address, reason, source, queue_id, seen)"
                                   " VALUES ($1, $2, $3, $4, $5)", key, reason, source, queue_id, now)
                count, first = await conn.fetchrow("SELECT count(*), min(seen) FROM mailrelayd_soft_bounces"
                                                   " WHERE address = $1 AND seen > $2", key, cutoff)
                result = count >= self.soft_threshold
                if result:
                    await conn.fetchval(_UPSERT, key, "soft_bounce", reason, source, queue_id, first, now, count,
                                        True)
                    g = await self._bump(conn, "add", key)
        if g is not None:
            self._apply(g, "add", key)
        return result

    async def _add_db(self, conn: Conn, key: str, kind: str, reason: str, source: str, now: float) -> bool:
        async with conn.transaction():
            await self._lock(conn, key)
            new = bool(await conn.fetchval(_UPSERT, key, kind, reason, source, "", now, now, 1, False))
            g = await self._bump(conn, "add", key)
        self._apply(g, "add", key)
        return new

    async def _remove_db(self, conn: Conn, key: str) -> bool:
        g = None
        async with conn.transaction():
            await self._lock(conn, key)
            removed = await conn.fetchval("DELETE FROM mailrelayd_suppressions WHERE address = $1 RETURNING 1", key)
            await conn.execute("DELETE FROM mailrelayd_soft_bounces WHERE address = $1", key)
            if removed:
                g = await self._bump(conn, "remove", key)
        if g is not None:
            self._apply(g, "remove", key)
        return bool(removed)

    async def _merge_many(self, conn: Conn, rows: list[tuple[Any, ...]], idempotent: bool) -> int:
        """Upsert many full rows in one transaction, then tell every node to reload."""
        rows = _merge_rows(rows, idempotent)
        timeout = _bulk_timeout(len(rows))
        async with conn.transaction():
            await conn.execute("CREATE TEMPORARY TABLE mailrelayd_bulk (LIKE mailrelayd_suppressions)"
                               " ON COMMIT DROP")
            await conn.copy_records_to_table("mailrelayd_bulk", records=rows, columns=_COLUMNS.split(", "),
                                             timeout=timeout)
            await conn.execute(_UPSERT_BULK, idempotent, timeout=timeout)
            g = await self._bump(conn, "reload", "") if rows else None
        if g is not None:
            self._apply(g, "reload", "")
        return len(rows)

    # --- SuppressionStore ------------------------------------------------------------------------
    def is_suppressed(self, address: str) -> bool:
        """True if ``address`` is suppressed. A set lookup: no I/O, no lock, safe on the event loop."""
        try:
            return self._key(address) in self._suppressed
        except ValueError:
            return False

    def __len__(self) -> int:
        return len(self._suppressed)

    def record(self, address: str, kind: str, reason: str, source: str, queue_id: str = "",
               now: float | None = None) -> bool:
        """As :meth:`SqliteSuppressionStore.record`. While PostgreSQL is unreachable (daemon only) the
        record is kept in the outbox and a suppressing kind is enforced on this node at once."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        key = self._key(address)
        now = time.time() if now is None else float(now)
        try:
            return bool(self.client.call(lambda c: self._record_db(c, key, kind, reason, source, queue_id, now)))
        except PgUnavailable as e:
            if self._outbox is None:
                raise StoreUnavailableError(f"PostgreSQL at {self.client.settings.where} is unreachable: {e}") \
                    from None
        self._outbox.add("record", key, kind, reason, source, queue_id, now)
        log.info("suppressions.outbox_kept", kind=kind, outbox=self._outbox.count)
        if kind in SUPPRESSING_KINDS:
            self._suppressed.add(key)
            return True
        return key in self._suppressed

    def add(self, address: str, reason: str, kind: str = "manual", source: str = "manual") -> bool:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        key = self._key(address)
        return bool(self._call(lambda c: self._add_db(c, key, kind, reason, source, time.time())))

    def remove(self, address: str) -> bool:
        key = self._key(address)
        return bool(self._call(lambda c: self._remove_db(c, key)))

    def get(self, address: str) -> Suppression | None:
        key = self._key(address)
        row = self._call(lambda c: c.fetchrow(f"SELECT {_COLUMNS} FROM mailrelayd_suppressions WHERE address = $1",
                                              key))
        return self._row(row) if row else None

    def list(self, kind: str | None = None, since: float | None = None) -> list[Suppression]:
        sql = f"SELECT {_COLUMNS} FROM mailrelayd_suppressions WHERE ($1::text IS NULL OR kind = $1)" \
              " AND ($2::float8 IS NULL OR last_seen >= $2) ORDER BY address"
        rows = self._call(lambda c: c.fetch(sql, kind, since))
        return [self._row(r) for r in rows]

    def counts_by_kind(self) -> dict[str, int]:
        counts = dict.fromkeys(KINDS, 0)
        rows = self._call(lambda c: c.fetch("SELECT kind, count(*) FROM mailrelayd_suppressions GROUP BY kind"))
        for kind, n in rows:
            counts[str(kind)] = int(n)
        return counts

    def soft_bounce_count(self, address: str, now: float | None = None) -> int:
        now = time.time() if now is None else now
        key = self._key(address)
        return int(self._call(lambda c: c.fetchval(
            "SELECT count(*) FROM mailrelayd_soft_bounces WHERE address = $1 AND seen > $2",
            key, now - self.soft_window)))

    def prune(self, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - self.soft_window
        result = self._call(lambda c: c.execute("DELETE FROM mailrelayd_soft_bounces WHERE seen <= $1", cutoff))
        return int(str(result).rpartition(" ")[2] or 0)

    def import_csv(self, fileobj: IO[str]) -> int:
        now = time.time()
        rows = [(key, kind, reason, source, "", now, now, 1) for key, reason, kind, source
                in parse_import_csv(fileobj, self._key)]
        return int(self._call(lambda c: self._merge_many(c, rows, False), _bulk_timeout(len(rows))))

    def export_csv(self, fileobj: IO[str]) -> None:
        write_export_csv(fileobj, self.list())

    def copy_from(self, suppressions: Iterable[Suppression], soft_bounces: Iterable[tuple[str, str, str, str, float]]
                  ) -> int:
        """``suppress migrate``: merge another store's rows as they are (times, counts, kinds) and its
        soft bounces. Idempotent: running it twice changes nothing."""
        rows = [(s.address, s.kind, s.reason, s.source, s.queue_id, s.first_seen, s.last_seen, s.count)
                for s in suppressions]
        soft = list(soft_bounces)

        async def go(conn: Conn) -> int:
            async with conn.transaction():
                await conn.executemany(  # soft bounces inside the window: a few per address at most
                    "INSERT INTO mailrelayd_soft_bounces (address, reason, source, queue_id, seen)"
                    " SELECT $1, $2, $3, $4, $5 WHERE NOT EXISTS (SELECT 1 FROM mailrelayd_soft_bounces"
                    " WHERE address = $1 AND seen = $5)", soft, timeout=_bulk_timeout(len(soft)))
                return await self._merge_many(conn, rows, True)

        return int(self._call(go, _bulk_timeout(len(rows) + len(soft))))

    def refresh(self) -> bool:
        """Nothing to do: LISTEN/NOTIFY and the poll keep the set current."""
        return False

    def status(self) -> StoreStatus:
        c = self.client
        outbox = self._outbox.count if self._outbox is not None else 0
        detail = "" if c.up else f"PostgreSQL at {c.settings.where} unreachable ({c.last_error}); " \
            f"using the last known list of {len(self._suppressed)} addresses"
        return StoreStatus("postgresql", c.up, detail, outbox)

    def close(self) -> None:
        self.client.close()
        self._local.shutdown(wait=True)
        if self._outbox is not None:
            with contextlib.suppress(sqlite3.Error):
                self._outbox.close()

    def __enter__(self) -> PostgresSuppressionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
