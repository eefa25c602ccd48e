"""The durable spool: messages and per-recipient state in SQLite (WAL, synchronous=FULL).

Durability contract: :meth:`Spool.commit` returns only after the message (envelope, recipients
and body) is in a committed, fsynced transaction; only then may the SMTP session say 250. A
crash before the commit leaves no trace of the message (SQLite rolls the transaction back), so a
half-written message is never delivered.

Group commit: every write is queued to one writer thread, which takes everything pending, runs
it in one transaction and commits with a single WAL fsync, then wakes every waiter. Under load,
dozens of sessions share one fsync; at rest a write waits for nobody. The group's new messages
and recipient outcomes are merged into a few multi-row statements, since each statement costs a
GIL round trip against the busy event loop. If any write fails, the group runs again with each
write in its own savepoint, so one bad write cannot sink the others.

Reads run on a separate thread and connection (WAL readers never block the writer). Nothing here
runs SQLite on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mailrelayd import metrics
from mailrelayd.errors import EnvelopeEncodingError, SpoolCorruptError, SpoolError, SpoolFullError, SpoolWriteError
from mailrelayd.spool.queueid import QueueIdGenerator
from mailrelayd.statefiles import check_not_vanished, mark_created, prepare_sqlite, private_dir

T = TypeVar("T")

# Recipient states. Active ones are still to be delivered; the rest are final.
PENDING = "pending"
DEFERRED = "deferred"
DELIVERED = "delivered"
BOUNCED = "bounced"
EXPIRED = "expired"
SUPPRESSED = "suppressed"
DELETED = "deleted"
PROCESSED = "processed"  # feedback queue: parsed and acted on
ACTIVE = (PENDING, DEFERRED)
FINAL = (DELIVERED, BOUNCED, EXPIRED, SUPPRESSED, DELETED, PROCESSED)

OUTBOUND = "outbound"
FEEDBACK = "feedback"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    qid TEXT PRIMARY KEY,
    queue TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    received_at REAL NOT NULL,
    size INTEGER NOT NULL,
    listener TEXT NOT NULL,
    sender_domain TEXT NOT NULL,
    is_dsn INTEGER NOT NULL DEFAULT 0,
    warned INTEGER NOT NULL DEFAULT 0,
    user TEXT NOT NULL DEFAULT '',
    held_at REAL NOT NULL DEFAULT 0,
    held_reason TEXT NOT NULL DEFAULT '',
    hold_credit REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS bodies (
    qid TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS recipients (
    qid TEXT NOT NULL,
    idx INTEGER NOT NULL,
    address TEXT NOT NULL,
    domain TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_reply TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    PRIMARY KEY (qid, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS recipients_active ON recipients(next_attempt) WHERE state IN ('pending', 'deferred');
-- Finished recipients, kept for `feedback.verp_retention` so a late bounce's VERP token still
-- names its recipient after the message has left the queue.
CREATE TABLE IF NOT EXISTS history (
    qid TEXT NOT NULL,
    idx INTEGER NOT NULL,
    address TEXT NOT NULL,
    sender_domain TEXT NOT NULL,
    state TEXT NOT NULL,
    done_at REAL NOT NULL,
    last_reply TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (qid, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_done ON history(done_at);
-- Feedback without a VERP token is acted on only for addresses we sent to (sent_to_since).
CREATE INDEX IF NOT EXISTS history_address ON history(address COLLATE NOCASE);
-- Hold rules (`queue hold --domain/--sender/--user`): they hold matching mail already queued and
-- mail that arrives later, until released or until `until` (0 = no end).
CREATE TABLE IF NOT EXISTS holds (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    until REAL NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    UNIQUE (kind, value)
);
PRAGMA user_version = 1;
"""

# Added after 0.1: (table, column, definition). Applied with ALTER TABLE to older spools.
_COLUMNS = (
    ("messages", "message_id", "TEXT NOT NULL DEFAULT ''"),
    ("messages", "user", "TEXT NOT NULL DEFAULT ''"),
    ("history", "mail_from", "TEXT NOT NULL DEFAULT ''"),
    ("history", "message_id", "TEXT NOT NULL DEFAULT ''"),
    ("history", "user", "TEXT NOT NULL DEFAULT ''"),
    ("history", "attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("history", "received_at", "REAL NOT NULL DEFAULT 0"),
)

# Delivery events for webhooks (mailrelayd.webhooks), written in the same transaction as the
# outcome they describe. AUTOINCREMENT: ids never go back, so a webhook's position stays valid
# after every event has been pruned.
_SCHEMA_EVENTS = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    time REAL NOT NULL,
    qid TEXT NOT NULL,
    message_id TEXT NOT NULL DEFAULT '',
    sender TEXT NOT NULL DEFAULT '',
    recipient TEXT NOT NULL DEFAULT '',
    user TEXT NOT NULL DEFAULT '',
    reply TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    fb_kind TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS event_cursors (
    name TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS history_message_id ON history(message_id) WHERE message_id != '';
CREATE INDEX IF NOT EXISTS history_address ON history(address);
"""

# Destinations suspended after a throttling reply (delivery.shaping), kept across a restart so the
# relay does not hammer, at start, a provider that has just told it to slow down.
_SCHEMA_SUSPENSIONS = """
CREATE TABLE IF NOT EXISTS suspensions (
    destination TEXT PRIMARY KEY,
    until REAL NOT NULL,
    reply TEXT NOT NULL DEFAULT '',
    since REAL NOT NULL
);
"""

# Recipient state -> event name.
EVENT_OF_STATE = {DELIVERED: "delivered", DEFERRED: "deferred", BOUNCED: "bounced", EXPIRED: "expired",
                  SUPPRESSED: "suppressed"}
_EVENT_COLS = "kind, time, qid, message_id, sender, recipient, user, reply, attempts, fb_kind, reason"


@dataclass(frozen=True, slots=True)
class Event:
    """A delivery event as stored (and sent to webhooks). ``id`` is 0 until stored."""

    kind: str
    time: float
    queue_id: str
    recipient: str
    message_id: str = ""
    sender: str = ""
    user: str = ""
    reply: str = ""
    attempts: int = 0
    fb_kind: str = ""
    reason: str = ""
    id: int = 0


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    message_id: str | None = None
    recipient: str | None = None
    sender: str | None = None
    user: str | None = None
    since: float | None = None
    limit: int = 1000


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    queue_id: str
    message_id: str
    sender: str
    recipient: str
    user: str
    state: str
    last_reply: str
    attempts: int
    time: float
    received_at: float


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to make durable. ``data`` is exactly what will be delivered (CRLF, signed)."""

    queue_id: str
    mail_from: str
    recipients: Sequence[str]
    data: bytes
    received_at: float
    queue: str = OUTBOUND
    listener: str = ""
    sender_domain: str = ""
    is_dsn: bool = False
    message_id: str = ""
    """The Message-ID header value (with its angle brackets), for history and events."""
    user: str = ""
    """The authenticated (SASL) user who submitted it, "" for relayed mail (``queue hold --user``)."""


@dataclass(frozen=True, slots=True)
class RecipientRecord:
    index: int
    address: str
    domain: str
    state: str
    attempts: int
    next_attempt: float
    last_reply: str
    updated_at: float

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


@dataclass(frozen=True, slots=True)
class MessageRecord:
    queue_id: str
    queue: str
    mail_from: str
    received_at: float
    size: int
    listener: str
    sender_domain: str
    is_dsn: bool
    warned: bool
    recipients: tuple[RecipientRecord, ...]
    user: str = ""
    held_at: float = 0.0
    """When the whole message was put on hold (by queue id or age); 0 = not held that way."""
    held_reason: str = ""
    hold_credit: float = 0.0
    """Seconds spent on hold so far: they do not count towards the queue lifetime."""

    def active_recipients(self) -> list[RecipientRecord]:
        return [r for r in self.recipients if r.state in ACTIVE]


HOLD_KINDS = ("domain", "sender", "user")


@dataclass(frozen=True, slots=True)
class HoldRule:
    """A persistent hold: every active recipient at ``domain`` / every message from ``sender`` (an
    address, or "@domain" for a whole sending domain) / submitted by ``user``, now and later."""

    kind: str
    value: str
    until: float = 0.0
    """Automatic release time (Unix time); 0 = until released by hand."""
    reason: str = ""
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class QueueFilter:
    """Which queued mail a bulk action applies to (all given criteria must match; none = all).

    ``domain`` selects recipients at that domain only; the other criteria select whole messages.
    Values are normalised by :meth:`normalized` (lower case, no trailing dot).
    """

    domain: str | None = None
    sender: str | None = None
    user: str | None = None
    older_than: float | None = None
    queue_ids: tuple[str, ...] = ()

    def normalized(self) -> QueueFilter:
        return QueueFilter(
            domain=self.domain.strip().rstrip(".").lower() if self.domain else None,
            sender=self.sender.strip().lower() if self.sender is not None else None,
            user=self.user.strip() if self.user else None,
            older_than=self.older_than,
            queue_ids=tuple(q.strip().upper() for q in self.queue_ids),
        )

    @property
    def empty(self) -> bool:
        return not (self.domain or self.sender is not None or self.user or self.older_than is not None
                    or self.queue_ids)

    def rules(self) -> list[tuple[str, str]]:
        """The persistent part of a hold: (kind, value) for domain, sender and user. A filter with
        queue ids or an age selects only mail queued now, so it makes no rule."""
        if self.queue_ids or self.older_than is not None:
            return []
        out = []
        if self.domain:
            out.append(("domain", self.domain))
        if self.sender is not None:
            out.append(("sender", self.sender))
        if self.user:
            out.append(("user", self.user))
        return out

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in (("domain", self.domain), ("sender", self.sender), ("user", self.user),
                                  ("older_than", self.older_than), ("queue_ids", list(self.queue_ids)))
                if v not in (None, [])}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QueueFilter:
        older = data.get("older_than")
        return cls(domain=data.get("domain"), sender=data.get("sender"), user=data.get("user"),
                   older_than=float(older) if older is not None else None,
                   queue_ids=tuple(str(q) for q in data.get("queue_ids") or ())).normalized()


def sender_matches(pattern: str, mail_from: str) -> bool:
    """``--sender`` semantics: a whole address, or "@domain" for every address at that domain."""
    s = mail_from.lower()
    if pattern.startswith("@"):
        return s.endswith(pattern)
    return s == pattern


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    """A new state for one recipient. Only active recipients change: a recipient recorded as
    delivered (or otherwise final) is never touched again, so a late duplicate result is harmless."""

    queue_id: str
    index: int
    state: str
    last_reply: str = ""
    next_attempt: float = 0.0
    attempted: bool = True


@dataclass(frozen=True, slots=True)
class SpoolStats:
    messages: int
    recipients: dict[str, int]
    oldest_received_at: float | None
    held: dict[str, int] = field(default_factory=dict)
    """Of ``recipients``, those held (by their spool state, pending or deferred): held mail is
    neither waiting for an attempt nor for a retry (``queue_recipients{state="held"}``)."""


@dataclass(frozen=True, slots=True)
class Suspension:
    """A destination (recipient domain or ``[[shaping]]`` MX group) that nothing is sent to until
    ``until`` (Unix time), because it answered ``reply`` (a throttling reply)."""

    destination: str
    until: float
    reply: str = ""
    since: float = 0.0


class Spool:
    """The message store. Create, then ``await open()``; ``await close()`` on shutdown."""

    def __init__(self, directory: Path, *, min_free_space: int = 0, batch_max: int = 256) -> None:
        self.directory = directory
        self.path = directory / "spool.db"
        self.min_free_space = min_free_space
        self._batch_max = batch_max
        self._ids = QueueIdGenerator()
        self._writer: _Writer | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        self._free_checked = 0.0
        self._free = 0
        self._event_kinds: frozenset[str] = frozenset()
        self.corrupt: SpoolCorruptError | None = None
        """Set once the database reported damage: from then on nothing is written to it."""

    # --- lifecycle ----------------------------------------------------------------------
    async def open(self) -> None:
        """Create the directory and schema and start the writer. Committed data survives any
        crash; an uncommitted transaction from a crash is rolled back by SQLite here."""
        private_dir(self.directory)
        loop = asyncio.get_running_loop()
        self._writer = _Writer(self.path, loop, self._batch_max)
        self._writer.start()
        await loop.run_in_executor(None, self._writer.wait_open)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-read")
        self.free_bytes(force=True)

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._writer.stop)
            self._writer = None
        if self._reader is not None:
            def _close_reader() -> None:
                conn = getattr(self._reader_local, "conn", None)
                if conn is not None:
                    conn.close()
            await asyncio.get_running_loop().run_in_executor(self._reader, _close_reader)
            self._reader.shutdown(wait=True)
            self._reader = None

    # --- space --------------------------------------------------------------------------
    def new_queue_id(self) -> str:
        return self._ids.new()

    def free_bytes(self, force: bool = False) -> int:
        """Free bytes on the spool file system (statvfs at most once a second)."""
        now = time.monotonic()
        if force or now - self._free_checked > 1.0:
            try:
                self._free = shutil.disk_usage(self.directory).free
            except OSError:
                self._free = 0
            self._free_checked = now
            metrics.SPOOL_FREE_BYTES.set(self._free)
        return self._free

    def check_space(self, incoming: int = 0) -> None:
        """Raise :class:`SpoolFullError` if accepting ``incoming`` more bytes would leave less than
        ``min_free_space`` free."""
        if self.free_bytes() - incoming < self.min_free_space:
            raise SpoolFullError(f"spool free space below {self.min_free_space} bytes")

    # --- events -------------------------------------------------------------------------
    def record_events(self, kinds: frozenset[str]) -> None:
        """Which event kinds to store from now on (those some webhook wants; none: no cost)."""
        self._event_kinds = frozenset(kinds)

    # --- writes (group-committed) -------------------------------------------------------
    async def commit(self, msg: NewMessage) -> None:
        """Make ``msg`` durable. Returns only after the fsync; raises SpoolError otherwise
        (EnvelopeEncodingError, before any write, for an address that is not valid UTF-8)."""
        await self.start_commit(msg)

    def start_commit(self, msg: NewMessage) -> Awaitable[None]:
        """:meth:`commit` with the write queued now, before the caller's next await; await the
        result. Writes are committed in groups, and one queued an event-loop turn later can miss the
        group being written and wait a whole fsync more (the SMTP edge calls this from a callback)."""
        _check_envelope(msg)
        self.check_space(len(msg.data))
        # The accepted events go into the same transaction (no extra fsync).
        return self._await_write(self._submit_write(_InsertMessages((msg,), self._event_kinds)))

    async def update(self, updates: Sequence[RecipientUpdate], new_messages: Sequence[NewMessage] = (),
                     events: Sequence[Event] = ()) -> list[str]:
        """Record recipient outcomes (and, atomically with them, new messages such as the DSN
        that reports them, and events such as a complaint about an earlier message). Returns the
        queue ids that are now finished and removed."""
        if not updates and not new_messages and not events:
            return []
        for m in new_messages:
            _check_envelope(m)
        now = time.time()
        kinds = self._event_kinds
        if not new_messages and not events:
            return await self._write(_ApplyUpdates(tuple(updates), now, kinds))

        def op(c: sqlite3.Connection) -> list[str]:
            _insert_many(c, new_messages, kinds)
            for e in events:
                if e.kind in kinds:
                    _insert_event(c, e)
            return _apply_updates(c, [(u, now) for u in updates], kinds)

        return await self._write(op)

    async def mark_warned(self, qid: str) -> None:
        await self._write(lambda c: c.execute("UPDATE messages SET warned = 1 WHERE qid = ?", (qid,)) and None)

    async def reschedule(self, qid: str | None, when: float) -> int:
        """Make active recipients (of one message, or all) due at ``when`` (queue flush)."""
        def op(c: sqlite3.Connection) -> int:
            if qid is None:
                cur = c.execute("UPDATE recipients SET next_attempt = ? WHERE state IN ('pending','deferred')",
                                (when,))
            else:
                cur = c.execute("UPDATE recipients SET next_attempt = ? WHERE qid = ? AND "
                                "state IN ('pending','deferred')", (when, qid))
            return cur.rowcount
        return await self._write(op)

    async def prune_history(self, before: float) -> int:
        return await self._write(lambda c: c.execute("DELETE FROM history WHERE done_at < ?", (before,)).rowcount)

    async def sync_event_cursors(self, names: Sequence[str]) -> None:
        """One delivery position per webhook: new ones start at the next event, removed ones are
        forgotten (so they hold no events back)."""
        def op(c: sqlite3.Connection) -> None:
            row = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
            top = row[0] if row else 0
            c.executemany("INSERT OR IGNORE INTO event_cursors (name, last_id) VALUES (?, ?)",
                          [(n, top) for n in names])
            have = [r[0] for r in c.execute("SELECT name FROM event_cursors")]
            c.executemany("DELETE FROM event_cursors WHERE name = ?", [(n,) for n in have if n not in names])
        await self._write(op)

    async def ack_events(self, name: str, last_id: int) -> None:
        await self._write(lambda c: c.execute(
            "UPDATE event_cursors SET last_id = MAX(last_id, ?) WHERE name = ?", (last_id, name)) and None)

    async def prune_events(self, max_backlog: int) -> int:
        """Delete events every webhook has received; then, past ``max_backlog``, the oldest ones.
        Returns how many were dropped undelivered."""
        def op(c: sqlite3.Connection) -> int:
            (low,) = c.execute("SELECT MIN(last_id) FROM event_cursors").fetchone()
            if low is None:
                c.execute("DELETE FROM events")
                return 0
            c.execute("DELETE FROM events WHERE id <= ?", (low,))
            lo, hi = c.execute("SELECT MIN(id), MAX(id) FROM events").fetchone()
            if lo is None or hi - lo + 1 <= max_backlog:  # ids are dense: only the oldest are ever deleted
                return 0
            return c.execute("DELETE FROM events WHERE id <= ?", (hi - max_backlog,)).rowcount
        return await self._write(op)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._await_write(self._submit_write(fn))

    def _submit_write(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._writer is None:
            raise SpoolWriteError("spool is closed")
        if self.corrupt is not None:
            # Writing more into a damaged b-tree can only spread the damage.
            metrics.SPOOL_WRITE_ERRORS.inc()
            raise self.corrupt
        return self._writer.submit(fn)

    async def _await_write(self, fut: asyncio.Future[T]) -> T:
        try:
            return await fut
        except SpoolCorruptError as e:
            self.corrupt = e
            metrics.SPOOL_WRITE_ERRORS.inc()
            raise
        except SpoolError:
            metrics.SPOOL_WRITE_ERRORS.inc()
            raise

    # --- reads --------------------------------------------------------------------------
    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._reader is None:
            raise SpoolError("spool is closed")

        def run() -> T:
            conn = getattr(self._reader_local, "conn", None)
            if conn is None:
                conn = _connect(self.path, readonly=True)
                self._reader_local.conn = conn
            # One snapshot for all the statements of a read (a message and its recipients): in
            # autocommit each SELECT would see the latest commit, and a message finished between
            # two of them would come back with no recipients.
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                if conn.in_transaction:  # nothing to keep: ending a read, ROLLBACK is COMMIT
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")

        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader, run)
        except sqlite3.DatabaseError as e:
            err = _map_error(e, self.path)
            if isinstance(err, SpoolCorruptError):
                self.corrupt = err
            raise err from None

    async def get(self, qid: str) -> MessageRecord | None:
        return await self._read(lambda c: _get(c, qid))

    async def get_many(self, qids: Sequence[str]) -> list[MessageRecord]:
        return await self._read(lambda c: [m for q in qids if (m := _get(c, q)) is not None])

    async def body(self, qid: str) -> bytes | None:
        return await self._read(lambda c: _read_body(c, qid))

    async def active_schedule(self) -> list[tuple[float, str]]:
        """(next attempt, queue id) of every message with active recipients: the scheduler's
        start-up load. One indexed scan, no bodies."""
        return await self._read(lambda c: c.execute(
            "SELECT MIN(next_attempt), qid FROM recipients WHERE state IN ('pending','deferred') GROUP BY qid"
        ).fetchall())

    async def active_schedule_domains(self) -> list[tuple[float, str, str]]:
        """:meth:`active_schedule` with the recipient domain of each message whose active
        recipients all share one ("" otherwise): the scheduler defers mail for a suspended
        destination without reading it."""
        return await self._read(lambda c: c.execute(
            "SELECT MIN(next_attempt), qid, CASE WHEN MIN(domain) = MAX(domain) THEN MIN(domain) ELSE '' END "
            "FROM recipients WHERE state IN ('pending','deferred') GROUP BY qid"
        ).fetchall())

    async def list_messages(self, limit: int = 1000, queue_name: str | None = None) -> list[MessageRecord]:
        def fn(c: sqlite3.Connection) -> list[MessageRecord]:
            if queue_name is None:
                rows = c.execute("SELECT qid FROM messages ORDER BY received_at LIMIT ?", (limit,)).fetchall()
            else:
                rows = c.execute("SELECT qid FROM messages WHERE queue = ? ORDER BY received_at LIMIT ?",
                                 (queue_name, limit)).fetchall()
            return [m for (q,) in rows if (m := _get(c, q)) is not None]
        return await self._read(fn)

    async def stats(self) -> SpoolStats:
        def fn(c: sqlite3.Connection) -> SpoolStats:
            # MAX(held_at) rides on the same scan (a second one costs ~35 ms at 100,000 messages).
            (n, oldest, held_at) = c.execute("SELECT COUNT(*), MIN(received_at), MAX(held_at) FROM messages").fetchone()
            by_state = dict(c.execute(
                "SELECT state, COUNT(*) FROM recipients WHERE state IN ('pending','deferred') GROUP BY state"
            ).fetchall())
            return SpoolStats(n, by_state, oldest, _held_by_state(c, bool(held_at and held_at > 0)))
        return await self._read(fn)

    async def read_events(self, name: str, kinds: Sequence[str], limit: int
                          ) -> tuple[list[Event], int, int] | None:
        """The next events (of ``kinds``) for webhook ``name`` in order, the id up to which the
        events were looked at (the position to acknowledge once these are delivered, so events
        of other kinds never hold it back), and the current position. None if the webhook has
        no position."""
        marks = ",".join("?" * len(kinds))

        def fn(c: sqlite3.Connection) -> tuple[list[Event], int, int] | None:
            # (_read gives both reads one snapshot)
            row = c.execute("SELECT last_id FROM event_cursors WHERE name = ?", (name,)).fetchone()
            if row is None:
                return None
            rows = c.execute(f"SELECT {_EVENT_COLS}, id FROM events WHERE id > ? AND kind IN ({marks}) "
                             "ORDER BY id LIMIT ?", (row[0], *kinds, limit)).fetchall()
            evs = [Event(r[0], r[1], r[2], r[5], r[3], r[4], r[6], r[7], r[8], r[9], r[10], r[11])
                   for r in rows]
            if len(evs) == limit:
                return evs, evs[-1].id, row[0]
            (top,) = c.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()
            return evs, max(top, row[0]), row[0]
        return await self._read(fn)

    async def event_backlog(self, name: str, kinds: Sequence[str]) -> int:
        marks = ",".join("?" * len(kinds))
        return await self._read(lambda c: c.execute(
            f"SELECT COUNT(*) FROM events WHERE kind IN ({marks}) AND id > "
            "COALESCE((SELECT last_id FROM event_cursors WHERE name = ?), 0)", (*kinds, name)).fetchone()[0])

    async def history(self, q: HistoryQuery) -> list[HistoryRecord]:
        """One record per recipient, queued or finished (within the history retention), newest first."""
        def fn(c: sqlite3.Connection) -> list[HistoryRecord]:
            out: list[HistoryRecord] = []
            for live in (True, False):
                where, args = [], []
                col = {"message_id": "m.message_id" if live else "h.message_id",
                       "recipient": "r.address" if live else "h.address",
                       "sender": "m.mail_from" if live else "h.mail_from",
                       "user": "m.user" if live else "h.user",
                       "time": "r.updated_at" if live else "h.done_at"}
                if q.message_id:
                    mid = q.message_id.strip()
                    where.append(f"{col['message_id']} IN (?, ?)")
                    args += [mid, f"<{mid.strip('<>')}>"]
                for k in ("recipient", "sender"):
                    v = getattr(q, k)
                    if v:
                        where.append(f"{col[k]} = ? COLLATE NOCASE")
                        args.append(v.strip().strip("<>"))
                if q.user:
                    where.append(f"{col['user']} = ?")
                    args.append(q.user)
                if q.since is not None:
                    where.append(f"{col['time']} >= ?")
                    args.append(q.since)
                cond = (" AND " + " AND ".join(where)) if where else ""
                if live:
                    sql = ("SELECT r.qid, m.message_id, m.mail_from, r.address, m.user, r.state, r.last_reply, "
                           "r.attempts, r.updated_at, m.received_at FROM recipients r JOIN messages m ON "
                           f"m.qid = r.qid WHERE m.queue = 'outbound'{cond} "
                           "ORDER BY r.updated_at DESC LIMIT ?")
                else:
                    sql = ("SELECT h.qid, h.message_id, h.mail_from, h.address, h.user, h.state, h.last_reply, "
                           f"h.attempts, h.done_at, h.received_at FROM history h WHERE 1 = 1{cond} "
                           "ORDER BY h.done_at DESC LIMIT ?")
                for r in c.execute(sql, (*args, q.limit)):
                    state = "queued" if r[5] == PENDING else r[5]
                    out.append(HistoryRecord(r[0], r[1], r[2], r[3], r[4], state, r[6] or "", r[7], r[8], r[9]))
            out.sort(key=lambda h: h.time, reverse=True)
            return out[:q.limit]
        return await self._read(fn)

    async def lookup_recipient(self, qid: str, index: int) -> tuple[str, str] | None:
        """(address, sender domain) of recipient ``index`` of message ``qid``, whether it is still
        queued or finished within the history retention. For VERP."""
        def fn(c: sqlite3.Connection) -> tuple[str, str] | None:
            row = c.execute("SELECT r.address, m.sender_domain FROM recipients r JOIN messages m ON m.qid = r.qid "
                            "WHERE r.qid = ? AND r.idx = ?", (qid, index)).fetchone()
            if row is None:
                row = c.execute("SELECT address, sender_domain FROM history WHERE qid = ? AND idx = ?",
                                (qid, index)).fetchone()
            return (row[0], row[1]) if row else None
        return await self._read(fn)

    async def sent_count_by_sender_domain(self, since: float) -> dict[str, int]:
        """{sending domain: recipients delivered or bounced at or after ``since``} from the history
        (the circuit breaker's denominator)."""
        def fn(c: sqlite3.Connection) -> dict[str, int]:
            rows = c.execute("SELECT lower(sender_domain), COUNT(*) FROM history WHERE done_at >= ? "
                             "AND state IN ('delivered', 'bounced') GROUP BY lower(sender_domain)", (since,))
            return {str(d): int(n) for d, n in rows if d}
        return await self._read(fn)

    async def sent_to_since(self, addresses: Sequence[str], since: float) -> dict[str, str]:
        """Which of ``addresses`` (compared case-insensitively) we attempted delivery to at or
        after ``since``: finished recipients in the history, and queued ones with an attempt.
        Returns {matching address of the argument, lowercased: the address as we sent to it}: what a
        report names may differ in case from what we sent, and only the latter is ours to suppress.
        For feedback that carries no VERP token (a DSN to the plain bounce address, an ARF report)."""
        wanted = sorted({a.lower() for a in addresses if a})[:100]

        def fn(c: sqlite3.Connection) -> dict[str, str]:
            found: dict[str, str] = {}
            for address in wanted:
                row = c.execute("SELECT address FROM history WHERE address = ? COLLATE NOCASE AND done_at >= ? "
                                "AND state IN ('delivered', 'bounced', 'expired') ORDER BY done_at DESC LIMIT 1",
                                (address, since)).fetchone()
                if row is None:
                    row = c.execute("SELECT r.address FROM recipients r JOIN messages m ON m.qid = r.qid "
                                    "WHERE r.address = ? COLLATE NOCASE AND m.queue = 'outbound' "
                                    "AND r.attempts > 0 AND r.updated_at >= ? LIMIT 1",
                                    (address, since)).fetchone()
                if row is not None:
                    found[address] = str(row[0])
            return found
        return await self._read(fn) if wanted else {}

    async def sent_message(self, message_id: str, addresses: Sequence[str], since: float) -> str | None:
        """The queue id of the message with Message-ID ``message_id`` (with or without its angle
        brackets) that we attempted to one of ``addresses`` (case-insensitively) at or after ``since``,
        or None. What a report without a VERP token quotes of the message it is about: its copies
        (a DSN sent twice, an NDR per hop) then count once, as those with a token do."""
        mid = message_id.strip().strip("<>")
        wanted = sorted({a.lower() for a in addresses if a})[:100]
        if not mid or not wanted:
            return None
        ids = (f"<{mid}>", mid)

        def fn(c: sqlite3.Connection) -> str | None:
            for address in wanted:
                row = c.execute("SELECT qid FROM history WHERE message_id IN (?, ?) AND message_id != '' "
                                "AND address = ? COLLATE NOCASE AND done_at >= ? ORDER BY done_at DESC LIMIT 1",
                                (*ids, address, since)).fetchone()
                if row is None:
                    row = c.execute("SELECT m.qid FROM messages m JOIN recipients r ON r.qid = m.qid "
                                    "WHERE m.message_id IN (?, ?) AND r.address = ? COLLATE NOCASE "
                                    "AND m.queue = 'outbound' AND r.attempts > 0 AND r.updated_at >= ? LIMIT 1",
                                    (*ids, address, since)).fetchone()
                if row is not None:
                    return str(row[0])
            return None
        return await self._read(fn)

    async def recipient_outcomes(self, qid: str) -> dict[str, tuple[str, str]]:
        """{address: (state, last reply)} for message ``qid``, queued or finished (history)."""
        def fn(c: sqlite3.Connection) -> dict[str, tuple[str, str]]:
            rows = c.execute("SELECT address, state, last_reply FROM recipients WHERE qid = ? ORDER BY idx",
                             (qid,)).fetchall()
            if not rows:
                rows = c.execute("SELECT address, state, last_reply FROM history WHERE qid = ? ORDER BY idx",
                                 (qid,)).fetchall()
            return {a: (st, lr or "") for a, st, lr in rows}
        return await self._read(fn)

    # --- holds and bulk selection (queue manager) ---------------------------------------
    async def select(self, f: QueueFilter, now: float | None = None, *, only_held: bool = False
                     ) -> list[tuple[str, int]]:
        """Active recipients matching a filter, as (queue id, recipient index)."""
        t = time.time() if now is None else now
        return await self._read(lambda c: _select(c, f, t, only_held))

    async def reschedule_many(self, qids: Sequence[str], when: float) -> int:
        """Make the active recipients of these messages due at ``when``, in one transaction."""
        def op(c: sqlite3.Connection) -> int:
            return sum(c.execute("UPDATE recipients SET next_attempt = ? WHERE qid = ? AND "
                                 "state IN ('pending','deferred')", (when, q)).rowcount for q in qids)
        return await self._write(op)

    async def hold_rules(self) -> list[HoldRule]:
        return await self._read(lambda c: [HoldRule(*r) for r in c.execute(
            "SELECT kind, value, until, reason, created_at FROM holds ORDER BY id").fetchall()])

    async def add_hold_rule(self, rule: HoldRule) -> HoldRule:
        """Store a hold rule; one rule per (kind, value): a second hold updates until/reason and
        keeps the original start (the lifetime credit counts from it)."""
        def op(c: sqlite3.Connection) -> HoldRule:
            c.execute("INSERT INTO holds (kind, value, until, reason, created_at) VALUES (?, ?, ?, ?, ?) "
                      "ON CONFLICT (kind, value) DO UPDATE SET until = excluded.until, reason = excluded.reason",
                      (rule.kind, rule.value, rule.until, rule.reason, rule.created_at))
            row = c.execute("SELECT kind, value, until, reason, created_at FROM holds WHERE kind = ? AND value = ?",
                            (rule.kind, rule.value)).fetchone()
            return HoldRule(*row)
        return await self._write(op)

    async def remove_hold_rule(self, rule: HoldRule, qids: Sequence[str], now: float) -> bool:
        """Delete a rule and, in the same transaction, credit the messages it held (``qids``) with
        the time they spent held, so it does not count towards their queue lifetime."""
        def op(c: sqlite3.Connection) -> bool:
            n = c.execute("DELETE FROM holds WHERE kind = ? AND value = ?", (rule.kind, rule.value)).rowcount
            c.executemany("UPDATE messages SET hold_credit = hold_credit + MAX(0, ? - MAX(?, received_at)) "
                          "WHERE qid = ?", [(now, rule.created_at, q) for q in qids])
            return n > 0
        return await self._write(op)

    async def set_held(self, qids: Sequence[str], held_at: float, reason: str) -> int:
        """Hold whole messages (by queue id or age); a message already held keeps its start."""
        def op(c: sqlite3.Connection) -> int:
            n = 0
            for q in qids:
                n += c.execute("UPDATE messages SET held_at = ?, held_reason = ? WHERE qid = ? AND held_at = 0",
                               (held_at, reason, q)).rowcount
            return n
        return await self._write(op)

    async def clear_held(self, qids: Sequence[str], now: float) -> int:
        """Release whole-message holds, crediting the time held against the queue lifetime."""
        def op(c: sqlite3.Connection) -> int:
            n = 0
            for q in qids:
                n += c.execute("UPDATE messages SET hold_credit = hold_credit + MAX(0, ? - MAX(held_at, received_at)), "
                               "held_at = 0, held_reason = '' WHERE qid = ? AND held_at > 0", (now, q)).rowcount
            return n
        return await self._write(op)

    # --- destination suspensions (delivery loop; queue flush lifts them) ----------------------
    async def suspensions(self, now: float) -> list[Suspension]:
        """Suspensions still in force at ``now`` (ended ones are ignored: see prune_suspensions)."""
        return await self._read(lambda c: [Suspension(*r) for r in c.execute(
            "SELECT destination, until, reply, since FROM suspensions WHERE until > ? ORDER BY destination",
            (now,)).fetchall()])

    async def save_suspension(self, s: Suspension) -> None:
        """Store (or extend) a destination's suspension. A suspension still in force keeps its start."""
        def op(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO suspensions (destination, until, reply, since) VALUES (?, ?, ?, ?) "
                      "ON CONFLICT (destination) DO UPDATE SET until = excluded.until, reply = excluded.reply, "
                      "since = CASE WHEN suspensions.until > excluded.since THEN suspensions.since "
                      "ELSE excluded.since END", (s.destination, s.until, s.reply[:1000], s.since))
        await self._write(op)

    async def end_suspensions(self, names: Sequence[str] | None, ended_by: float | None = None) -> int:
        """Forget suspensions: of ``names`` (None: all); with ``ended_by``, only those that end by
        then (a suspension extended meanwhile stays)."""
        def op(c: sqlite3.Connection) -> int:
            cond, args = ("until <= ?", [ended_by]) if ended_by is not None else ("1 = 1", [])
            if names is None:
                return c.execute(f"DELETE FROM suspensions WHERE {cond}", args).rowcount
            return sum(c.execute(f"DELETE FROM suspensions WHERE destination = ? AND {cond}", [n, *args]).rowcount
                       for n in names)
        return await self._write(op)


def _check_envelope(m: NewMessage) -> None:
    # Addresses are TEXT: a lone surrogate (a non-UTF-8 byte decoded with surrogateescape) would fail
    # inside the writer and count as a spool write error (a paging alert) for what is bad input.
    for a in (m.mail_from, *m.recipients):
        if not a.isascii():
            try:
                a.encode("utf-8")
            except UnicodeEncodeError:
                raise EnvelopeEncodingError(f"{m.queue_id}: envelope address is not valid UTF-8") from None


# --- SQL helpers (run on the writer or reader thread) -------------------------------------
_MESSAGE_COLUMNS_ADDED = (("user", "TEXT NOT NULL DEFAULT ''"), ("held_at", "REAL NOT NULL DEFAULT 0"),
                          ("held_reason", "TEXT NOT NULL DEFAULT ''"), ("hold_credit", "REAL NOT NULL DEFAULT 0"))


# An active recipient held as the queue manager sees it (QueueManager.is_held): its message held as
# a whole, or a hold rule for its domain, its message's SASL user, its sender's address or "@domain".
_HELD_RECIPIENT = (
    "m.held_at > 0 OR EXISTS (SELECT 1 FROM holds h WHERE (h.kind = 'domain' AND h.value = r.domain) OR "
    "(h.kind = 'user' AND m.user != '' AND h.value = m.user) OR (h.kind = 'sender' AND "
    "(h.value = lower(m.mail_from) OR (substr(h.value, 1, 1) = '@' AND "
    "substr(lower(m.mail_from), -length(h.value)) = h.value))))")


def _held_by_state(c: sqlite3.Connection, messages_held: bool) -> dict[str, int]:
    """{spool state: held active recipients}. The join only runs when something is held at all
    (``messages_held``: a message is held as a whole; or a hold rule exists)."""
    if not messages_held and c.execute("SELECT 1 FROM holds LIMIT 1").fetchone() is None:
        return {}
    return dict(c.execute(
        "SELECT r.state, COUNT(*) FROM recipients r JOIN messages m ON m.qid = r.qid "
        f"WHERE r.state IN ('pending','deferred') AND ({_HELD_RECIPIENT}) GROUP BY r.state").fetchall())


def _select(c: sqlite3.Connection, f: QueueFilter, now: float, only_held: bool = False) -> list[tuple[str, int]]:
    """(queue id, recipient index) of every active recipient matching ``f`` (of messages held
    as a whole, with ``only_held``)."""
    where = ["r.state IN ('pending','deferred')"]
    if only_held:
        where.append("m.held_at > 0")
    args: list[Any] = []
    if f.domain:
        where.append("r.domain = ?")
        args.append(f.domain)
    if f.sender is not None:
        if f.sender.startswith("@"):
            where.append("lower(m.mail_from) LIKE ? ESCAPE '\\'")
            args.append("%" + f.sender.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_"))
        else:
            where.append("lower(m.mail_from) = ?")
            args.append(f.sender)
    if f.user:
        where.append("m.user = ?")
        args.append(f.user)
    if f.older_than is not None:
        where.append("m.received_at <= ?")
        args.append(now - f.older_than)
    rows: list[tuple[str, int]] = []
    base = ("SELECT r.qid, r.idx FROM recipients r JOIN messages m ON m.qid = r.qid WHERE "
            + " AND ".join(where))
    if f.queue_ids:
        for i in range(0, len(f.queue_ids), 500):
            chunk = f.queue_ids[i:i + 500]
            rows += c.execute(base + f" AND r.qid IN ({','.join('?' * len(chunk))}) ORDER BY r.qid, r.idx",
                              [*args, *chunk]).fetchall()
    else:
        rows = c.execute(base + " ORDER BY r.qid, r.idx", args).fetchall()
    return [(q, i) for q, i in rows]


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    # The group commit's multi-row statements differ by row count: keep them all prepared.
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30,
                           cached_statements=1024)
    conn.execute("PRAGMA busy_timeout = 30000")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: the WAL is fsynced at every commit, so a 250 survives power loss, not just kill -9.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA wal_autocheckpoint = 4000")
        conn.execute("PRAGMA journal_size_limit = 67108864")
    return conn


_ROWS_PER_STATEMENT = 100  # multi-row statements: far below SQLite's 32766 bound parameters


def _chunks(items: Sequence[T], n: int = _ROWS_PER_STATEMENT) -> list[Sequence[T]]:
    return [items[i:i + n] for i in range(0, len(items), n)]


@functools.lru_cache(maxsize=1024)
def _rows(n: int, width: int) -> str:
    """``(?, ?), (?, ?)``: n rows of width placeholders, for a multi-row VALUES."""
    row = "(" + ", ".join("?" * width) + ")"
    return ", ".join([row] * n)


BODY_BYTES_PER_STATEMENT = 4 << 20


def _insert_bodies(c: sqlite3.Connection, msgs: Sequence[NewMessage]) -> None:
    c.execute(f"INSERT INTO bodies (qid, data) VALUES {_rows(len(msgs), 2)}",
              [v for m in msgs for v in (m.queue_id, m.data)])


def _insert_many(c: sqlite3.Connection, msgs: Sequence[NewMessage], kinds: frozenset[str]) -> None:
    """Insert messages, bodies, recipients (and the accepted events) with a few multi-row
    statements, not a few per message: the group commit's cost is mostly the GIL round trip each
    statement makes against the busy event loop (sqlite3 releases the GIL for every step)."""
    for chunk in _chunks(msgs):
        c.execute(
            "INSERT INTO messages (qid, queue, mail_from, received_at, size, listener, sender_domain, is_dsn, "
            f"message_id, user) VALUES {_rows(len(chunk), 10)}",
            [v for m in chunk for v in (m.queue_id, m.queue, m.mail_from, m.received_at, len(m.data), m.listener,
                                        m.sender_domain, int(m.is_dsn), m.message_id, m.user)],
        )
        # SQLite copies every bound blob: a statement's bodies stay under BODY_BYTES_PER_STATEMENT.
        small: list[NewMessage] = []
        size = 0
        for m in chunk:
            if len(m.data) >= BLOB_IO_MIN:
                _insert_body(c, m.queue_id, m.data)
                continue
            if small and size + len(m.data) > BODY_BYTES_PER_STATEMENT:
                _insert_bodies(c, small)
                small, size = [], 0
            small.append(m)
            size += len(m.data)
        if small:
            _insert_bodies(c, small)
    rcpts = [(m.queue_id, i, r, _rcpt_domain(r), m.received_at, m.received_at)
             for m in msgs for i, r in enumerate(m.recipients)]
    for rows in _chunks(rcpts):
        c.execute("INSERT INTO recipients (qid, idx, address, domain, next_attempt, updated_at, state) "
                  f"SELECT *, 'pending' FROM (VALUES {_rows(len(rows), 6)})", [v for r in rows for v in r])
    if "accepted" in kinds:
        # One accepted event per recipient, in the transaction that makes the message durable.
        evs = [(m.received_at, m.queue_id, m.message_id, m.mail_from, r, m.user)
               for m in msgs if m.queue == OUTBOUND and not m.is_dsn for r in m.recipients]
        for rows in _chunks(evs):
            c.execute(f"INSERT INTO events ({_EVENT_COLS}) SELECT 'accepted', *, '', 0, '', '' "
                      f"FROM (VALUES {_rows(len(rows), 6)})", [v for r in rows for v in r])


BLOB_IO_MIN = 1 << 20
"""Bodies from this size on are written and read with incremental blob I/O. A bound parameter is
copied by sqlite (SQLITE_TRANSIENT) and again into the row record, and a selected one is read into
sqlite's memory before Python copies it: two more copies of a 25 MB message each way."""


def _insert_body(c: sqlite3.Connection, qid: str, data: bytes) -> None:
    if len(data) < BLOB_IO_MIN:
        c.execute("INSERT INTO bodies (qid, data) VALUES (?, ?)", (qid, data))
        return
    rowid = c.execute("INSERT INTO bodies (qid, data) VALUES (?, zeroblob(?))", (qid, len(data))).lastrowid
    assert rowid is not None
    with c.blobopen("bodies", "data", rowid) as blob, memoryview(data) as view:
        for i in range(0, len(data), BLOB_IO_MIN):
            blob.write(view[i:i + BLOB_IO_MIN])


def _read_body(c: sqlite3.Connection, qid: str) -> bytes | None:
    # Inside _read's read transaction: the rowid still names this body when the blob is opened.
    row = c.execute("SELECT rowid, CASE WHEN length(data) < ? THEN data END FROM bodies WHERE qid = ?",
                    (BLOB_IO_MIN, qid)).fetchone()
    if row is None:
        return None
    if row[1] is not None:
        return bytes(row[1])
    with c.blobopen("bodies", "data", row[0], readonly=True) as blob:
        return blob.read()  # sqlite3_blob_read straight into the bytes object


def _rcpt_domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def record_of_new(m: NewMessage) -> MessageRecord:
    """The record :func:`_insert` writes for ``m``, without reading it back (the scheduler's first
    attempt of a message it has just been handed)."""
    rcpts = tuple(RecipientRecord(i, r, _rcpt_domain(r), PENDING, 0, m.received_at, "", m.received_at)
                  for i, r in enumerate(m.recipients))
    return MessageRecord(m.queue_id, m.queue, m.mail_from, m.received_at, len(m.data), m.listener, m.sender_domain,
                         m.is_dsn, False, rcpts, m.user)


def _insert_event(c: sqlite3.Connection, e: Event) -> None:
    msg_id, sender, user = e.message_id, e.sender, e.user
    if not (msg_id or sender or user):  # about an earlier message (a complaint): name it as it was sent
        row = c.execute("SELECT message_id, mail_from, user FROM messages WHERE qid = ?", (e.queue_id,)).fetchone() \
            or c.execute("SELECT message_id, mail_from, user FROM history WHERE qid = ? LIMIT 1",
                         (e.queue_id,)).fetchone()
        if row is not None:
            msg_id, sender, user = row
    c.execute(f"INSERT INTO events ({_EVENT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
              (e.kind, e.time, e.queue_id, msg_id, sender, e.recipient, user, e.reply[:1000], e.attempts,
               e.fb_kind, e.reason[:1000]))


def _apply_updates(c: sqlite3.Connection, updates: Sequence[tuple[RecipientUpdate, float]],
                   kinds: frozenset[str] = frozenset()) -> list[str]:
    """Apply (update, time) pairs in order; finish and remove the messages left with no active
    recipient, and return their queue ids (in the order the updates first name them).

    Set-based (one UPDATE per hundred recipients, one statement per step of finishing) unless an
    event is recorded for these states or a recipient is updated twice: then row by row, in order.
    """
    keys = {(u.queue_id, u.index) for u, _ in updates}
    if len(keys) < len(updates) or any(EVENT_OF_STATE.get(u.state) in kinds for u, _ in updates):
        for u, now in updates:
            cur = c.execute(
                "UPDATE recipients SET state = ?, attempts = attempts + ?, next_attempt = ?, last_reply = ?, "
                "updated_at = ? WHERE qid = ? AND idx = ? AND state IN ('pending','deferred')",
                (u.state, int(u.attempted), u.next_attempt, u.last_reply[:1000], now, u.queue_id, u.index),
            )
            kind = EVENT_OF_STATE.get(u.state)
            if kind in kinds and cur.rowcount:
                c.execute(
                    f"INSERT INTO events ({_EVENT_COLS}) SELECT ?, ?, r.qid, m.message_id, m.mail_from, r.address, "
                    "m.user, r.last_reply, r.attempts, '', '' FROM recipients r JOIN messages m ON m.qid = r.qid "
                    "WHERE r.qid = ? AND r.idx = ? AND m.queue = 'outbound' AND m.is_dsn = 0",
                    (kind, now, u.queue_id, u.index))
    else:
        for rows in _chunks(updates):
            # Only active recipients change (RecipientUpdate): a final state is never overwritten.
            c.execute(
                f"WITH u(qid, idx, state, attempted, next_attempt, last_reply, now) AS (VALUES "
                f"{_rows(len(rows), 7)}) UPDATE recipients SET state = u.state, "
                "attempts = attempts + u.attempted, next_attempt = u.next_attempt, last_reply = u.last_reply, "
                "updated_at = u.now FROM u WHERE recipients.qid = u.qid AND recipients.idx = u.idx "
                "AND recipients.state IN ('pending','deferred')",
                [v for u, now in rows for v in (u.queue_id, u.index, u.state, int(u.attempted), u.next_attempt,
                                                u.last_reply[:1000], now)],
            )
    # A message is finished at the time of the last update that names it.
    finished_at: dict[str, float] = {}
    for u, now in updates:
        finished_at.pop(u.queue_id, None)
        finished_at[u.queue_id] = now
    order = {qid: i for i, qid in enumerate(dict.fromkeys(u.queue_id for u, _ in updates))}
    done: list[tuple[str, float]] = []
    for chunk in _chunks(list(finished_at)):
        # One row, not one per finished message: each row fetched is another GIL round trip
        # against the busy event loop (the sqlite3 module releases the GIL for every step).
        (found,) = c.execute(
            f"WITH t(qid) AS (VALUES {_rows(len(chunk), 1)}) SELECT json_group_array(qid) FROM t WHERE NOT "
            "EXISTS (SELECT 1 FROM recipients r WHERE r.qid = t.qid AND r.state IN ('pending','deferred'))",
            chunk).fetchone()
        done += [(qid, finished_at[qid]) for qid in json.loads(found)]
    if done:
        _finish(c, done)
    return sorted((qid for qid, _ in done), key=order.__getitem__)


def _finish(c: sqlite3.Connection, done: Sequence[tuple[str, float]]) -> None:
    """Move finished messages' recipients to history (outbound mail only) and delete them."""
    for chunk in _chunks(done):
        values = [v for item in chunk for v in item]
        qids = [qid for qid, _ in chunk]
        marks = ", ".join("?" * len(qids))
        c.execute(
            "INSERT OR REPLACE INTO history (qid, idx, address, sender_domain, state, done_at, last_reply, "
            "mail_from, message_id, user, attempts, received_at) "
            f"WITH t(qid, now) AS (VALUES {_rows(len(chunk), 2)}) "
            "SELECT r.qid, r.idx, r.address, m.sender_domain, r.state, t.now, r.last_reply, m.mail_from, "
            "m.message_id, m.user, r.attempts, m.received_at FROM t JOIN recipients r ON r.qid = t.qid "
            "JOIN messages m ON m.qid = r.qid WHERE m.queue = 'outbound'",
            values,
        )
        c.execute(f"DELETE FROM recipients WHERE qid IN ({marks})", qids)
        c.execute(f"DELETE FROM bodies WHERE qid IN ({marks})", qids)
        c.execute(f"DELETE FROM messages WHERE qid IN ({marks})", qids)


def _get(c: sqlite3.Connection, qid: str) -> MessageRecord | None:
    row = c.execute(
        "SELECT qid, queue, mail_from, received_at, size, listener, sender_domain, is_dsn, warned, "
        "user, held_at, held_reason, hold_credit FROM messages WHERE qid = ?", (qid,)).fetchone()
    if row is None:
        return None
    rcpts = tuple(RecipientRecord(*r) for r in c.execute(
        "SELECT idx, address, domain, state, attempts, next_attempt, last_reply, updated_at "
        "FROM recipients WHERE qid = ? ORDER BY idx", (qid,)))
    return MessageRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]), bool(row[8]), rcpts,
                         row[9], row[10], row[11], row[12])


# SQLite primary result codes (the low byte of an extended code), https://sqlite.org/rescode.html
_CORRUPT_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _map_error(e: BaseException, path: Path | None = None) -> SpoolError:
    if isinstance(e, SpoolError):
        return e
    text = str(e)
    code = getattr(e, "sqlite_errorcode", None)
    if isinstance(e, sqlite3.DatabaseError) and code is not None and (code & 0xFF) in _CORRUPT_CODES:
        return SpoolCorruptError(str(path or "spool.db"), text)
    if code is not None and (code & 0xFF) == sqlite3.SQLITE_FULL:
        return SpoolFullError(text)
    if isinstance(e, sqlite3.OperationalError) and "full" in text.lower():
        return SpoolFullError(text)
    if isinstance(e, OSError) and e.errno in (28, 122):  # ENOSPC, EDQUOT
        return SpoolFullError(text)
    where = f"{path}: " if path is not None else ""
    return SpoolWriteError(f"{where}{type(e).__name__}: {text}")


@dataclass(frozen=True)
class _InsertMessages:
    """A write that the writer merges with the others of its kind in a group (see _Writer)."""

    messages: tuple[NewMessage, ...]
    kinds: frozenset[str]

    def __call__(self, c: sqlite3.Connection) -> None:
        _insert_many(c, self.messages, self.kinds)


@dataclass(frozen=True)
class _ApplyUpdates:
    """Recipient outcomes; merged like :class:`_InsertMessages`. Runs to the finished queue ids."""

    updates: tuple[RecipientUpdate, ...]
    now: float
    kinds: frozenset[str]

    def __call__(self, c: sqlite3.Connection) -> list[str]:
        return _apply_updates(c, [(u, self.now) for u in self.updates], self.kinds)


_Op = Callable[[sqlite3.Connection], Any]
_Result = tuple[asyncio.Future[Any], Any, BaseException | None]


def _run_merged(c: sqlite3.Connection, batch: Sequence[tuple[_Op, asyncio.Future[Any]]]) -> list[_Result]:
    """Run a group's writes, the mergeable ones as one insert and one update.

    Reordering is safe: a message's queue id reaches nobody before its insert is committed, so no
    other write of the same group can name it; and updates keep their order among themselves
    (an operation that is neither, e.g. an administrative hold, still runs in its place between
    them, ending the run of merged writes before it).
    """
    results: list[_Result] = []
    inserts: list[tuple[_InsertMessages, asyncio.Future[Any]]] = []
    updates: list[tuple[_ApplyUpdates, asyncio.Future[Any]]] = []

    def flush() -> None:
        by_kinds: dict[frozenset[str], list[NewMessage]] = {}
        for op, _ in inserts:
            by_kinds.setdefault(op.kinds, []).extend(op.messages)
        for kinds, msgs in by_kinds.items():
            _insert_many(c, msgs, kinds)
        results.extend((fut, None, None) for _, fut in inserts)
        if len({op.kinds for op, _ in updates}) > 1:  # only across a reload that changed webhooks
            results.extend((fut, op(c), None) for op, fut in updates)
        elif updates:
            done = _apply_updates(c, [(u, op.now) for op, _ in updates for u in op.updates], updates[0][0].kinds)
            # Each finished message goes to the last update that names it: the one that, run alone
            # after the others, would have found it finished.
            last = {u.queue_id: i for i, (op, _) in enumerate(updates) for u in op.updates}
            mine: list[list[str]] = [[] for _ in updates]
            for qid in done:
                mine[last[qid]].append(qid)
            results.extend((fut, mine[i], None) for i, (_, fut) in enumerate(updates))
        inserts.clear()
        updates.clear()

    for fn, fut in batch:
        if isinstance(fn, _InsertMessages):
            inserts.append((fn, fut))
        elif isinstance(fn, _ApplyUpdates):
            updates.append((fn, fut))
        else:
            flush()
            results.append((fut, fn(c), None))
    flush()
    return results


class _Writer(threading.Thread):
    """The single writer: group commit of everything queued (see module docstring)."""

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop, batch_max: int) -> None:
        super().__init__(name="spool-writer", daemon=True)
        self._path = path
        self._loop = loop
        self._batch_max = batch_max
        self._q: queue.SimpleQueue[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]] | None] = \
            queue.SimpleQueue()
        self._conn: sqlite3.Connection | None = None
        self._open_error: BaseException | None = None
        self._opened = threading.Event()

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        fut: asyncio.Future[T] = self._loop.create_future()
        self._q.put((fn, fut))
        return fut

    def stop(self) -> None:
        self._q.put(None)
        self.join()

    def wait_open(self) -> None:
        """Block until the database is open, checked and migrated; raise SpoolError if it cannot be."""
        self._opened.wait()
        if self._open_error is not None:
            raise _map_error(self._open_error, self._path)

    def run(self) -> None:
        try:
            prepare_sqlite(self._path)  # spool.db and its -wal/-shm: 0600 whatever the umask
            self._conn = _connect(self._path)
            quick_check(self._conn, self._path)
            check_not_vanished(self._conn, self._path, "messages")
            self._conn.executescript(_SCHEMA)
            cols = {r[1] for r in self._conn.execute("PRAGMA table_info(history)")}
            if "last_reply" not in cols:  # spools from 0.1 pre-releases
                self._conn.execute("ALTER TABLE history ADD COLUMN last_reply TEXT NOT NULL DEFAULT ''")
            mcols = {r[1] for r in self._conn.execute("PRAGMA table_info(messages)")}
            for col, decl in _MESSAGE_COLUMNS_ADDED:  # spools from before queue holds
                if col not in mcols:
                    self._conn.execute(f"ALTER TABLE messages ADD COLUMN {col} {decl}")
            for table, col, decl in _COLUMNS:
                if col not in {r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")}:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
            self._conn.executescript(_SCHEMA_EVENTS)
            self._conn.executescript(_SCHEMA_SUSPENSIONS)
            mark_created(self._path)
        except BaseException as e:  # surfaced by wait_open() and to every waiter
            self._open_error = e
            self._conn = None
        finally:
            self._opened.set()
        stopping = False
        while not stopping:
            item = self._q.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < self._batch_max:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            results = self._run_batch(batch)
            self._loop.call_soon_threadsafe(_resolve, results)
        if self._conn is not None:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._conn.close()

    def _run_batch(self, batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]]
                   ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        if self._conn is None:
            err = _map_error(self._open_error or RuntimeError("spool not open"), self._path)
            return [(fut, None, err) for _, fut in batch]
        c = self._conn
        t0 = time.perf_counter()
        try:
            results = self._batch_at_once(c, batch)
        except Exception:  # one write failed: run them again one by one, so it fails alone
            try:
                c.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            results = self._batch_one_by_one(c, batch)
        metrics.SPOOL_COMMIT_BATCH.observe(len(batch))
        metrics.SPOOL_COMMIT_SECONDS.observe(time.perf_counter() - t0)
        return results

    @staticmethod
    def _batch_at_once(c: sqlite3.Connection, batch: list[tuple[Callable[[sqlite3.Connection], Any],
                                                                 asyncio.Future[Any]]]
                       ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """The common case: every write succeeds, one transaction, no savepoints, and the messages and
        outcomes of the group merged into a few statements (each statement costs a GIL round trip
        against the busy event loop). Raises if any write or the commit fails."""
        c.execute("BEGIN IMMEDIATE")
        results = _run_merged(c, batch)
        c.execute("COMMIT")
        return results

    def _batch_one_by_one(self, c: sqlite3.Connection,
                          batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]]
                          ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """After a failure: each write in its own savepoint, so one bad write cannot sink the others."""
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            c.execute("BEGIN IMMEDIATE")
            for fn, fut in batch:
                c.execute("SAVEPOINT op")
                try:
                    res = fn(c)
                except Exception as e:  # this write fails alone; the batch goes on
                    c.execute("ROLLBACK TO op")
                    c.execute("RELEASE op")
                    results.append((fut, None, _map_error(e, self._path)))
                else:
                    c.execute("RELEASE op")
                    results.append((fut, res, None))
            c.execute("COMMIT")
        except Exception as e:  # the commit (the fsync) failed: nothing in this batch is durable
            try:
                c.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            err = _map_error(e, self._path)
            results = [(fut, None, err) for _, fut in batch]
        return results


def _resolve(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, res, err in results:
        if fut.done():
            continue
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(res)


def quick_check(conn: sqlite3.Connection, path: Path) -> None:
    """``PRAGMA quick_check`` (https://sqlite.org/pragma.html#pragma_quick_check): every page and
    b-tree readable and well formed, without the slower index cross-check of integrity_check.
    Raises :class:`SpoolCorruptError` naming the first problem. Reads every page once: about a
    second per few hundred MB of spool, paid at start-up only."""
    try:
        rows = conn.execute("PRAGMA quick_check(5)").fetchall()
    except sqlite3.DatabaseError as e:
        err = _map_error(e, path)
        raise (err if isinstance(err, SpoolCorruptError) else SpoolCorruptError(str(path), str(e))) from None
    lines = [ln.strip() for r in rows for ln in str(r[0]).splitlines()]
    if lines != ["ok"]:
        problems = [ln for ln in lines if ln and not ln.startswith("***")]  # "*** in database main ***"
        raise SpoolCorruptError(str(path), f"quick_check: {'; '.join(problems[:2])[:200]}")


def check_database(path: Path) -> None:
    """:func:`quick_check` of any of our SQLite files (the spool, the suppression list) if it
    exists; a fresh set-up has nothing to check."""
    if not path.exists():
        return
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=30)
    except sqlite3.Error as e:
        raise _map_error(e, path) from None
    try:
        quick_check(conn, path)
    finally:
        conn.close()


def spool_size_on_disk(directory: Path) -> int:
    """Bytes used by the spool database files (for `doctor` and docs)."""
    total = 0
    for name in ("spool.db", "spool.db-wal", "spool.db-shm"):
        try:
            total += os.stat(directory / name).st_size
        except FileNotFoundError:
            pass
    return total
