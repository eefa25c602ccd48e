"""``mailrelayd backup DIR`` while the daemon accepts a burst of submissions, then
``mailrelayd restore DIR`` into a fresh set-up: every message acknowledged before the backup
began and every suppression is there."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib

from tests.conftest import TEST_PASSWORD, base_config, mailrelayd_cmd, write_config
from tests.test_spool_integrity import _damage, _fill_spool


async def _cli(cfg: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*mailrelayd_cmd(), *args, "-c", str(cfg),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _msg(i: int) -> EmailMessage:
    m = EmailMessage()
    m["From"] = "app@example.com"
    m["To"] = f"r{i}@dest.test"
    m["Subject"] = f"burst {i}"
    m.set_content("x" * 2000)
    return m


async def test_backup_during_a_burst_then_restore(start_daemon, client_tls, tmp_path: Path, tls_files) -> None:
    d = await start_daemon()  # the default route goes nowhere: everything stays queued
    for i in range(20):
        d.daemon.suppressions.add(f"gone{i}@dest.test", "test suppression")
    acked: list[tuple[str, float]] = []
    stop = asyncio.Event()

    async def submitter(k: int) -> None:
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=d.port("submission"), start_tls=True,
                            tls_context=client_tls, timeout=30)
        await c.connect()
        await c.login("alice", TEST_PASSWORD)
        i = 0
        while not stop.is_set():
            i += 1
            errors, reply = await c.send_message(_msg(k * 100000 + i))
            assert errors == {}
            acked.append((reply.rsplit(" ", 1)[1], time.time()))  # after the 250: durable
        await c.quit()

    tasks = [asyncio.create_task(submitter(k)) for k in range(4)]
    try:
        while len(acked) < 40:
            await asyncio.sleep(0.05)
        backup_dir = tmp_path / "backup"
        began = time.time()
        rc, out, err = await _cli(d.config, "backup", str(backup_dir))
        during = len([1 for _, t in acked if t >= began])
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert rc == 0, err
    assert "backed up" in out
    assert during > 0, "the burst was not running during the backup"
    before = {q for q, t in acked if t < began}
    assert len(before) >= 40
    manifest = json.loads((backup_dir / "manifest.json").read_text())
    assert manifest["messages"] >= len(before)
    assert (backup_dir / "spool.db").stat().st_mode & 0o077 == 0  # message bodies: owner only

    # A fresh set-up, never started: restore, then look at it from outside.
    fresh = write_config(tmp_path / "fresh", base_config(tls_files))
    rc, out, err = await _cli(fresh, "restore", str(backup_dir))
    assert rc == 0, err
    conn = sqlite3.connect(tmp_path / "fresh" / "spool" / "spool.db")
    try:
        restored = {q for (q,) in conn.execute("SELECT qid FROM messages")}
        bodies = {q for (q,) in conn.execute("SELECT qid FROM bodies")}
        active = {q for (q,) in conn.execute("SELECT qid FROM recipients WHERE state IN ('pending','deferred')")}
    finally:
        conn.close()
    missing = before - restored
    assert not missing, f"{len(missing)} acknowledged messages missing from the restored spool"
    assert before <= bodies and before <= active
    rc, out, err = await _cli(fresh, "suppress", "list", "--json")
    assert rc == 0, err
    assert {r["address"] for r in json.loads(out)} >= {f"gone{i}@dest.test" for i in range(20)}
    # The restored queue is what a daemon on the fresh set-up loads.
    rc, out, err = await _cli(fresh, "queue", "list", "--json")
    assert rc == 0, err
    listed = {m["queue_id"] for m in json.loads(out)}
    assert len(listed) == min(1000, len(restored))


async def test_restore_refuses_while_a_daemon_owns_the_spool(start_daemon, tmp_path: Path, tls_files) -> None:
    src = write_config(tmp_path / "src", base_config(tls_files))
    await _fill_spool(tmp_path / "src" / "spool", 3)
    rc, _, err = await _cli(src, "backup", str(tmp_path / "b"))
    assert rc == 0, err
    d = await start_daemon()
    rc, out, err = await _cli(d.config, "restore", "--force", str(tmp_path / "b"))
    assert rc == 1 and "Traceback" not in err
    assert "in use by another mailrelayd process" in err and "stop the daemon" in err, err
    assert out == ""


async def test_restore_checks_the_backup_and_never_deletes(tmp_path: Path, tls_files) -> None:
    src = write_config(tmp_path / "src", base_config(tls_files))
    await _fill_spool(tmp_path / "src" / "spool", 40)
    rc, _, err = await _cli(src, "backup", str(tmp_path / "b"))
    assert rc == 0, err
    rc, _, err = await _cli(src, "backup", str(tmp_path / "b"))
    assert rc == 1 and "not empty" in err  # never overwrites a backup

    # Over a set-up that holds data: refused without --force, moved aside with it.
    other = write_config(tmp_path / "other", base_config(tls_files))
    await _fill_spool(tmp_path / "other" / "spool", 2)
    rc, _, err = await _cli(other, "restore", str(tmp_path / "b"))
    assert rc == 1 and "--force" in err, err
    rc, out, err = await _cli(other, "restore", "--force", str(tmp_path / "b"))
    assert rc == 0, err
    aside = list((tmp_path / "other" / "spool").glob("spool.db.before-restore-*"))
    assert len(aside) == 1 and "previous file kept" in out
    with sqlite3.connect(aside[0]) as c:
        assert c.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 2
    with sqlite3.connect(tmp_path / "other" / "spool" / "spool.db") as c:
        assert c.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 40

    # A damaged backup is refused with one line naming the file; nothing is installed.
    db = tmp_path / "b" / "spool.db"
    _damage(db, range(3, db.stat().st_size // 4096, 3))
    fresh = write_config(tmp_path / "fresh", base_config(tls_files))
    rc, _, err = await _cli(fresh, "restore", str(tmp_path / "b"))
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(db) in err and "damaged" in err
    assert not (tmp_path / "fresh" / "spool" / "spool.db").exists()
    rc, _, err = await _cli(fresh, "restore", str(tmp_path / "nothing"))
    assert rc == 1 and "manifest.json: missing" in err
