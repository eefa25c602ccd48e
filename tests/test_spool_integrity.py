"""Spool integrity: a damaged spool refuses to start (one line naming the file and the runbook);
a delivery whose outcome cannot be recorded stops deliveries and fails /ready instead of
re-delivering; the CLI's crash paths end in one line."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mailrelayd.errors import SpoolCorruptError, SpoolWriteError
from mailrelayd.spool.store import NewMessage, Spool, _map_error, check_database
from tests.conftest import base_config, deep_merge, mailrelayd_cmd, write_config
from tests.support.proc import DaemonProcess
from tests.support.sink import Sink
from tests.support.smtptalk import SmtpTalk
from tests.test_delivery_e2e import _route, _submit


async def _fill_spool(spool_dir: Path, n: int = 60) -> None:
    spool = Spool(spool_dir)
    await spool.open()
    try:
        for i in range(n):
            await spool.commit(NewMessage(spool.new_queue_id(), "a@example.com", (f"r{i}@dest.test",),
                                          b"Subject: x\r\n\r\n" + os.urandom(3000).hex().encode() + b"\r\n",
                                          time.time()))
    finally:
        await spool.close()  # checkpoints the WAL into spool.db


def _damage(db: Path, pages: range) -> None:
    """Overwrite the middle of some pages with garbage (what a bad sector or a torn copy does)."""
    page_size = 4096
    with open(db, "r+b") as f:
        for p in pages:
            f.seek(p * page_size + 100)
            f.write(b"\xde\xad\xbe\xef" * 500)


def _run(cfg: Path, *args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run([*mailrelayd_cmd(), *args, "-c", str(cfg)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


@pytest.mark.parametrize("damage", ["pages", "header"])
async def test_damaged_spool_refuses_to_start(tmp_path: Path, tls_files, damage: str) -> None:
    cfg = write_config(tmp_path, base_config(tls_files))
    await _fill_spool(tmp_path / "spool")
    db = tmp_path / "spool" / "spool.db"
    assert db.stat().st_size > 20 * 4096
    if damage == "pages":
        _damage(db, range(3, db.stat().st_size // 4096, 4))
    else:
        _damage(db, range(0, 1))
    res = await asyncio.to_thread(_run, cfg, "run", "--log-format", "json")
    assert res.returncode == 1, res
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    assert len(err.splitlines()) == 1, err
    assert str(db) in err and "damaged" in err and "runbooks/MailrelaydSpoolDamaged.md" in err, err
    assert "daemon.ready" not in res.stdout
    # The CLI's offline queue commands say the same in one line.
    q = await asyncio.to_thread(_run, cfg, "queue", "list")
    assert q.returncode == 1 and "Traceback" not in q.stderr and len(q.stderr.strip().splitlines()) == 1, q
    assert str(db) in q.stderr and "damaged" in q.stderr


async def test_healthy_spool_passes_the_check(tmp_path: Path) -> None:
    await _fill_spool(tmp_path / "spool", 5)
    await asyncio.to_thread(check_database, tmp_path / "spool" / "spool.db")
    await asyncio.to_thread(check_database, tmp_path / "nothing-here.db")  # fresh set-up


async def test_corruption_errors_are_recognised_by_code(tmp_path: Path) -> None:
    await _fill_spool(tmp_path / "spool")
    db = tmp_path / "spool" / "spool.db"
    _damage(db, range(2, db.stat().st_size // 4096))
    conn = sqlite3.connect(str(db))
    with pytest.raises(sqlite3.DatabaseError) as ei:
        conn.execute("SELECT count(*), sum(length(data)) FROM bodies").fetchall()
    conn.close()
    err = _map_error(ei.value, db)
    assert isinstance(err, SpoolCorruptError) and str(db) in str(err)
    with pytest.raises(SpoolCorruptError):
        check_database(db)


async def test_unrecordable_outcome_stops_deliveries_and_fails_ready(start_daemon, client_tls,
                                                                    monkeypatch) -> None:
    """The spool refuses to record outcomes (simulated at Spool.update): the message reaches the
    sink once and is not re-delivered, later mail is accepted but not delivered, /ready is 503;
    when the spool takes writes again the outcome is recorded and deliveries resume, each
    message delivered exactly once."""
    sink = await Sink().start()
    try:
        d = await start_daemon(_route(sink))
        sched = d.daemon.scheduler
        sched.record_retry_interval = 0.2
        real_update = d.spool.update
        broken = True

        async def update(*a: Any, **kw: Any) -> Any:
            if broken:
                raise SpoolWriteError("OperationalError: disk I/O error")
            return await real_update(*a, **kw)

        monkeypatch.setattr(d.spool, "update", update)
        first = await _submit(d.port("submission"), client_tls, ["first@dest.test"])
        await sink.wait_for(1)
        for _ in range(200):
            if sched.halted is not None and not sched.inflight:
                break
            await asyncio.sleep(0.05)
        assert sched.halted is not None
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{d.http_port}/ready") as r:
                assert r.status == 503
                body = json.dumps(await r.json())
                assert "delivery" in body and "could not be recorded" in body
            # Mail is still accepted (the commit works) but not delivered while halted.
            late = [await _submit(d.port("submission"), client_tls, [f"late{i}@dest.test"]) for i in range(2)]
            await asyncio.sleep(3.0)  # several retry_initial (1 s) periods and record retries
            assert [m.rcpts for m in sink.messages] == [["first@dest.test"]]
            rec = await d.spool.get(first)  # still active in the spool: a restart would deliver it once more
            assert rec is not None and rec.active_recipients()
            broken = False  # space freed / device back: the outcome goes in, deliveries resume
            await sink.wait_for(3)
            for _ in range(200):
                outcomes = [await d.spool.recipient_outcomes(q) for q in [first, *late]]
                if all(st == "delivered" for o in outcomes for st, _ in o.values()):
                    break
                await asyncio.sleep(0.05)
            assert all(st == "delivered" for o in outcomes for st, _ in o.values()), outcomes
            assert sched.halted is None
            async with http.get(f"http://127.0.0.1:{d.http_port}/ready") as r:
                assert r.status == 200
        await asyncio.sleep(1.5)
        assert sorted(r for m in sink.messages for r in m.rcpts) == ["first@dest.test", "late0@dest.test",
                                                                    "late1@dest.test"]
    finally:
        await sink.stop()


# --- the CLI's crash paths ---------------------------------------------------------------------
async def test_queue_show_bad_id_is_one_line(start_daemon, tmp_path: Path, tls_files) -> None:
    cfg = write_config(tmp_path / "stopped", base_config(tls_files))
    for c in (cfg, (await start_daemon()).config):  # stopped set-up, then through the admin socket
        (tmp_path / "stopped" / "spool").mkdir(exist_ok=True)
        res = await asyncio.to_thread(_run, c, "queue", "show", "a b")
        assert res.returncode != 0 and "Traceback" not in res.stderr, res
        assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "'a b' is not a queue id" in res.stderr


def _limit_file_size() -> None:
    # Every write past 64 bytes fails (EFBIG), as on a full disk; SIGXFSZ would kill instead.
    import signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))


async def test_queue_flush_on_a_full_disk_is_one_line(tmp_path: Path, tls_files) -> None:
    """Stopped daemon, the CLI edits the spool itself and the disk takes no more writes."""
    cfg = write_config(tmp_path, deep_merge(base_config(tls_files), {}))
    await _fill_spool(tmp_path / "spool", 3)
    res = await asyncio.to_thread(_run, cfg, "queue", "flush", preexec_fn=_limit_file_size)
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("mailrelayd: "), res.stderr


async def test_queue_flush_spool_error_through_the_admin_socket(start_daemon, monkeypatch) -> None:
    """Daemon running: a spool that refuses the write (disk full, simulated) is a 503 with the
    reason, printed as one line by the CLI."""
    from mailrelayd.errors import SpoolFullError

    d = await start_daemon()

    async def full(*a: Any, **kw: Any) -> int:
        raise SpoolFullError("database or disk is full")

    monkeypatch.setattr(d.spool, "reschedule", full)
    res = await asyncio.to_thread(_run, d.config, "queue", "flush")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res
    assert res.stderr.strip() == "mailrelayd: spool: database or disk is full"


async def test_damage_found_while_running_stops_writes(tmp_path: Path) -> None:
    """A read that meets a damaged page marks the spool damaged; from then on nothing is written."""
    await _fill_spool(tmp_path / "spool", 60)
    db = tmp_path / "spool" / "spool.db"
    with sqlite3.connect(db) as c:
        qids = [q for (q,) in c.execute("SELECT qid FROM messages")]
    spool = Spool(tmp_path / "spool")
    await spool.open()  # passes quick_check
    try:
        _damage(db, range(2, db.stat().st_size // 4096))
        with pytest.raises(SpoolCorruptError):
            for q in qids:
                await spool.body(q)
        assert spool.corrupt is not None and str(db) in str(spool.corrupt)
        with pytest.raises(SpoolCorruptError):
            await spool.commit(NewMessage(spool.new_queue_id(), "a@example.com", ("b@dest.test",),
                                          b"Subject: x\r\n\r\nx\r\n", time.time()))
    finally:
        await spool.close()


async def test_damaged_spool_while_running_halts_and_refuses_mail(start_daemon, client_tls) -> None:
    """Once the spool is known damaged (as the test above detects it; set directly here), the daemon
    answers 451 to new mail, starts no delivery and /ready names both checks."""
    import aiosmtplib
    from aiosmtplib import SMTPDataError, SMTPResponseException

    from tests.conftest import TEST_PASSWORD

    d = await start_daemon()  # the default route goes nowhere: deferred, retried every second
    queued = await _submit(d.port("submission"), client_tls, ["x@dest.test"])
    sched = d.daemon.scheduler
    d.spool.corrupt = SpoolCorruptError(str(d.spool.path), "database disk image is malformed")
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=d.port("submission"), start_tls=True, tls_context=client_tls,
                        timeout=10)
    await c.connect()
    try:
        await c.login("alice", TEST_PASSWORD)
        with pytest.raises((SMTPDataError, SMTPResponseException)) as ei:
            await c.sendmail("app@example.com", ["y@dest.test"], b"From: app@example.com\r\n\r\nx\r\n")
        assert ei.value.code == 451
    finally:
        await c.quit()
    for _ in range(200):  # the next retry of the queued message finds the spool damaged
        if sched.halted is not None:
            break
        await asyncio.sleep(0.05)
    assert sched.halted is not None and "damaged" in sched.halted
    await asyncio.sleep(0.5)
    assert queued not in sched.inflight
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{d.http_port}/ready") as r:
        assert r.status == 503
        checks = (await r.json())["checks"]
    assert checks["spool_integrity"].startswith("fail:") and "MailrelaydSpoolDamaged" in checks["spool_integrity"]
    assert checks["delivery"].startswith("fail:")


async def test_a_failing_write_fails_alone_in_its_group_commit(tmp_path: Path) -> None:
    """Writes queued together share one transaction; one that fails (here a queue id used twice)
    gets its error, and the others in the same group are still durable."""
    spool = Spool(tmp_path / "spool")
    await spool.open()
    try:
        body = b"Subject: t\r\n\r\nx\r\n"
        first = NewMessage(spool.new_queue_id(), "a@example.com", ("r@example.net",), body, time.time())
        await spool.commit(first)
        group = [NewMessage(spool.new_queue_id(), "a@example.com", ("r@example.net",), body, time.time())
                 for _ in range(5)]
        group.insert(2, first)  # the same queue id again: the insert violates the primary key
        # Queued without an await in between: one group commit.
        waits = [spool.start_commit(m) for m in group]
        results = await asyncio.gather(*waits, return_exceptions=True)
        assert [isinstance(r, SpoolWriteError) for r in results] == [False, False, True, False, False, False]
        for m in group:
            assert await spool.get(m.queue_id) is not None
    finally:
        await spool.close()


@pytest.mark.parametrize("loss", ["truncated", "deleted", "wal_lost"])
async def test_vanished_spool_refuses_to_start_instead_of_emptying_the_queue(tmp_path: Path, tls_files,
                                                                           loss: str) -> None:
    """SQLite opens a zero-length or missing file, or a spool whose tables were only in a lost -wal,
    as a new empty database: the daemon must refuse to start, naming the file, rather than start
    with an empty queue and every accepted message silently gone."""
    cfg = write_config(tmp_path, base_config(tls_files))
    db = tmp_path / "spool" / "spool.db"
    # Accept mail through SMTP; kill -9 so the messages are in the WAL only.
    d = DaemonProcess(cfg).wait_ready()
    for i in range(3):
        t = await SmtpTalk.connect(d.ports["relay"])
        await t.ehlo()
        await t.cmd("MAIL FROM:<a@example.com>")
        await t.cmd(f"RCPT TO:<r{i}@dest.example>")
        await t.cmd("DATA")
        code, _ = await t.cmd(b"From: a@example.com\r\nSubject: s\r\n\r\nbody\r\n.")
        assert code == 250
        await t.close()
    d.kill9()
    if loss == "truncated":
        d = DaemonProcess(cfg).wait_ready()  # a clean restart: everything checkpointed into spool.db
        assert d.stop() == 0
        assert db.stat().st_size > 4096
        os.truncate(db, 0)
    elif loss == "deleted":
        db.unlink()
    else:
        wal = db.with_name("spool.db-wal")
        assert wal.stat().st_size > 0
        wal.unlink()
    res = await asyncio.to_thread(_run, cfg, "run", "--log-format", "json")
    assert res.returncode == 1, res
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr and len(err.splitlines()) == 1, err
    assert str(db) in err and "spool.db.created" in err and "runbooks/MailrelaydSpoolDamaged.md" in err, err
    assert "daemon.ready" not in res.stdout
    q = await asyncio.to_thread(_run, cfg, "queue", "list")
    assert q.returncode == 1 and len(q.stderr.strip().splitlines()) == 1 and str(db) in q.stderr, q
    # The operator who really wants an empty spool removes the marker, as the error says.
    (tmp_path / "spool" / "spool.db.created").unlink()
    d = DaemonProcess(cfg).wait_ready()
    assert d.stop() == 0


async def test_fresh_spool_starts_and_is_marked(tmp_path: Path, tls_files) -> None:
    cfg = write_config(tmp_path, base_config(tls_files))
    for _ in range(2):  # first start creates the spool and its marker; the second finds both
        d = DaemonProcess(cfg).wait_ready()
        assert d.stop() == 0
    assert (tmp_path / "spool" / "spool.db.created").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
async def test_damaged_or_emptied_suppression_list_refuses_to_start(tmp_path: Path, tls_files, damage: str) -> None:
    """An emptied suppressions.db would start with no suppressions (every suppressed address mailed
    again); a damaged one was reported under server.spool_dir. Both refuse, naming the file and
    server.state_dir."""
    cfg = write_config(tmp_path, base_config(tls_files))
    add = await asyncio.to_thread(_run, cfg, "suppress", "add", "gone@example.net", "--reason", "asked")
    assert add.returncode == 0, add
    db = tmp_path / "state" / "suppressions.db"
    assert db.stat().st_size > 0
    if damage == "truncated":
        os.truncate(db, 0)
    else:
        _damage(db, range(0, 1))
    res = await asyncio.to_thread(_run, cfg, "run", "--log-format", "json")
    assert res.returncode == 1, res
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr and len(err.splitlines()) == 1, err
    assert f"server.state_dir: {db}: database is damaged" in err, err
    assert "daemon.ready" not in res.stdout
    listed = await asyncio.to_thread(_run, cfg, "suppress", "list")
    assert listed.returncode == 1 and str(db) in listed.stderr and "Traceback" not in listed.stderr, listed
