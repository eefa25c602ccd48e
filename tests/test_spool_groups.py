"""Group commit merges the new messages and recipient outcomes queued together into a few
multi-row statements (mailrelayd.spool.store._run_merged). These tests run a group directly on
the spool's database, so which writes share a group is fixed, not left to thread timing."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

from mailrelayd.spool.store import (
    BLOB_IO_MIN,
    BOUNCED,
    DEFERRED,
    DELIVERED,
    NewMessage,
    RecipientUpdate,
    Spool,
    _ApplyUpdates,
    _InsertMessages,
    _run_merged,
)

BODY = b"From: a@example.com\r\nSubject: t\r\n\r\nx\r\n"
EVENTS = frozenset({"accepted", "delivered", "bounced", "deferred"})


def _msg(spool: Spool, rcpts: int = 1, data: bytes = BODY, **kw: Any) -> NewMessage:
    return NewMessage(spool.new_queue_id(), "a@example.com", tuple(f"r{i}@Example.NET" for i in range(rcpts)),
                      data, time.time(), sender_domain="example.com", **kw)


async def _group(path: Path, ops: list[Any]) -> tuple[list[Any], list[str]]:
    """Run ``ops`` as one group in one transaction; return each op's result and the SQL run."""
    loop = asyncio.get_running_loop()
    c = sqlite3.connect(str(path), isolation_level=None)
    statements: list[str] = []
    c.set_trace_callback(statements.append)
    try:
        futs = [loop.create_future() for _ in ops]
        c.execute("BEGIN IMMEDIATE")
        results = _run_merged(c, list(zip(ops, futs, strict=True)))
        c.execute("COMMIT")
    finally:
        c.close()
    by_fut = {id(fut): res for fut, res, err in results if err is None}
    assert len(by_fut) == len(ops)
    return [by_fut[id(f)] for f in futs], statements[1:-1]


async def test_new_messages_of_a_group_are_stored_whole(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    await spool.open()
    msgs = [_msg(spool, rcpts=i % 3 + 1) for i in range(150)]  # more than one statement's rows
    big = _msg(spool, rcpts=2, data=BODY + b"y" * (BLOB_IO_MIN + 10))
    dsn = _msg(spool, is_dsn=True)
    msgs[40:40] = [big, dsn]
    await spool.close()
    ops = [_InsertMessages((m,), EVENTS) for m in msgs]
    _, sql = await _group(spool.path, ops)
    # A few statements per hundred messages (the big body alone through blob I/O), not three or
    # four per message.
    assert len(sql) <= 16, sql
    spool = Spool(tmp_path / "spool")
    await spool.open()
    try:
        for m in msgs:
            rec = await spool.get(m.queue_id)
            assert rec is not None and rec.size == len(m.data) and rec.is_dsn == m.is_dsn
            assert [(r.index, r.address, r.domain, r.state) for r in rec.recipients] == \
                [(i, a, "example.net", "pending") for i, a in enumerate(m.recipients)]
            assert await spool.body(m.queue_id) == m.data
    finally:
        await spool.close()
    c = sqlite3.connect(str(spool.path))
    accepted = c.execute("SELECT qid, recipient FROM events WHERE kind = 'accepted' ORDER BY id").fetchall()
    c.close()
    # One accepted event per recipient, in order, none for the DSN.
    assert accepted == [(m.queue_id, r) for m in msgs if not m.is_dsn for r in m.recipients]


async def test_outcomes_of_a_group_finish_each_message_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    await spool.open()
    two, one, dup, stays = _msg(spool, rcpts=2), _msg(spool), _msg(spool), _msg(spool, rcpts=2)
    for m in (two, one, dup, stays):
        await spool.commit(m)
    await spool.close()
    t1, t2 = time.time() - 10, time.time()

    def upd(m: NewMessage, i: int, state: str, now: float, reply: str = "250 ok") -> _ApplyUpdates:
        return _ApplyUpdates((RecipientUpdate(m.queue_id, i, state, reply, now + 600),), now, frozenset())

    ops: list[Any] = [
        upd(two, 0, DELIVERED, t1),
        upd(one, 0, BOUNCED, t1, "550 no"),
        upd(stays, 0, DELIVERED, t1),
        # Not a merged write: runs in its place, after the three above.
        lambda c: c.execute("UPDATE messages SET warned = 1 WHERE qid = ?", (stays.queue_id,)) and None,
        upd(two, 1, DELIVERED, t2),   # finishes `two`: it is this op's, not the first one's
        upd(dup, 0, DEFERRED, t2, "451 later"),
        upd(dup, 0, DELIVERED, t2),   # the same recipient twice in one group: applied in order
        upd(one, 0, DELIVERED, t2),   # already final: a late duplicate result changes nothing
    ]
    results, _ = await _group(spool.path, ops)
    # The late duplicate finds `one` finished, as it would have run alone (nothing is left to remove).
    assert results == [[], [one.queue_id], [], None, [two.queue_id], [], [dup.queue_id], [one.queue_id]]
    c = sqlite3.connect(str(spool.path))
    hist = {(q, i): (s, round(t), r) for q, i, s, t, r in
            c.execute("SELECT qid, idx, state, done_at, last_reply FROM history")}
    active = c.execute("SELECT qid, idx, state, attempts FROM recipients").fetchall()
    warned = c.execute("SELECT warned FROM messages WHERE qid = ?", (stays.queue_id,)).fetchone()
    left = {q for (q,) in c.execute("SELECT qid FROM messages")} | {q for (q,) in c.execute("SELECT qid FROM bodies")}
    c.close()
    # done_at is the time of the update that finished the message, for all its recipients.
    assert hist == {(two.queue_id, 0): (DELIVERED, round(t2), "250 ok"),
                    (two.queue_id, 1): (DELIVERED, round(t2), "250 ok"),
                    (one.queue_id, 0): (BOUNCED, round(t1), "550 no"),
                    (dup.queue_id, 0): (DELIVERED, round(t2), "250 ok")}
    assert sorted(active) == [(stays.queue_id, 0, DELIVERED, 1), (stays.queue_id, 1, "pending", 0)]
    assert warned == (1,)
    assert left == {stays.queue_id}


async def test_outcomes_with_events_are_recorded_in_order(tmp_path: Path) -> None:
    """With webhooks on, outcomes go row by row so their events keep the order they happened in."""
    spool = Spool(tmp_path / "spool")
    await spool.open()
    msgs = [_msg(spool) for _ in range(4)]
    for m in msgs:
        await spool.commit(m)
    await spool.close()
    now = time.time()
    ops = [_ApplyUpdates((RecipientUpdate(m.queue_id, 0, state, "r", now),), now, EVENTS)
           for m, state in zip(msgs, (DELIVERED, BOUNCED, DEFERRED, DELIVERED), strict=True)]
    results, _ = await _group(spool.path, ops)
    assert results == [[msgs[0].queue_id], [msgs[1].queue_id], [], [msgs[3].queue_id]]
    c = sqlite3.connect(str(spool.path))
    events = c.execute("SELECT kind, qid FROM events WHERE kind != 'accepted' ORDER BY id").fetchall()
    c.close()
    assert events == [("delivered", msgs[0].queue_id), ("bounced", msgs[1].queue_id),
                      ("deferred", msgs[2].queue_id), ("delivered", msgs[3].queue_id)]


async def test_bodies_of_a_group_are_bound_a_few_megabytes_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """SQLite copies each bound blob: one statement binds at most BODY_BYTES_PER_STATEMENT of bodies
    (scaled down here), so a group of near-1 MB messages does not hold a second copy of all of them."""
    from mailrelayd.spool import store

    monkeypatch.setattr(store, "BODY_BYTES_PER_STATEMENT", 10_000)
    spool = Spool(tmp_path / "spool")
    await spool.open()
    msgs = [_msg(spool, data=BODY + bytes([65 + i]) * 3000) for i in range(10)]
    await spool.close()
    _, sql = await _group(spool.path, [_InsertMessages((m,), frozenset()) for m in msgs])
    assert sum(s.startswith("INSERT INTO bodies") for s in sql) == 4  # 3 + 3 + 3 + 1 bodies of ~3 KB
    spool = Spool(tmp_path / "spool")
    await spool.open()
    try:
        for m in msgs:
            assert await spool.body(m.queue_id) == m.data
    finally:
        await spool.close()
