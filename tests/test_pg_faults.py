"""A relay daemon (subprocess) against a real PostgreSQL (tests/support/pg.py) that misbehaves
without being down: no connection slot left for the pool to grow, a database that does not exist
(yet), a server that stops answering, a server that refuses a write (a privilege revoked, a
read-only primary). The node must neither flap nor flood its log nor stall its HTTP side nor lose
feedback, and must recover without a restart."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import base_config, deep_merge, mailrelayd_cmd, write_config
from tests.support.proc import DaemonProcess
from tests.support.sink import Sink
from tests.support.smtptalk import SmtpTalk, deliver, rcpt_code


def _config(tmp_path: Path, tls_files: Any, pg_url: str, password: Path, connect_timeout: str = "2s",
            sink_port: int = 9) -> Path:
    return write_config(tmp_path / "node", deep_merge(base_config(tls_files), {
        "feedback": {"store": pg_url, "store_password_file": str(password), "store_poll_interval": "500ms",
                     "store_connect_timeout": connect_timeout, "bounce_domain": "bounces.test.example",
                     "verp_secret": "pg-faults-verp-secret-0123456789"},
        "routes": [{"domain": "*", "host": f"127.0.0.1:{sink_port}"}],
    }))


def _ready(node: DaemonProcess) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/ready", timeout=10) as r:
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as e:
        return dict(json.loads(e.read()))


def _scrape(node: DaemonProcess) -> tuple[float, str]:
    """Seconds one /metrics request took, and its body."""
    start = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=30) as r:
        body = r.read().decode()
    return time.monotonic() - start, body


def _events(node: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in list(node.events) if e.get("event") == name]


async def _auth_failure(port: int, source: str) -> int:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    t = await SmtpTalk.connect(port, source=source)
    await t.ehlo()
    await t.starttls(ctx)
    await t.ehlo()
    code, _ = await t.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong password").decode())
    await t.close()
    return code


@pytest.fixture
def password(pg_server: Any, tmp_path: Path) -> Path:
    return pg_server.password_file(tmp_path / "secrets")


async def test_no_slot_to_grow_the_pool_is_no_outage(tmp_path, tls_files, pg_server, pg_url, password) -> None:
    db = pg_url.rsplit("/", 1)[1]
    node = await asyncio.to_thread(lambda: DaemonProcess(_config(tmp_path, tls_files, pg_url, password)).wait_ready())
    await asyncio.sleep(1.0)  # start-up loads done: the pool is back to what it keeps open
    held = int(pg_server.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}'"))
    assert held >= 2  # the pool's first connection and the LISTEN connection
    # The server refuses any further connection to this database (as with max_connections reached).
    pg_server.psql(f"ALTER DATABASE {db} CONNECTION LIMIT {held}")
    # Concurrent AUTH failures from 20 addresses: each is written to the database; the pool would grow.
    codes = await asyncio.gather(*(_auth_failure(node.ports["submission"], f"127.0.0.{10 + i}") for i in range(20)))
    assert set(codes) == {535}
    deadline = time.monotonic() + 15
    while (rows := int(pg_server.psql("SELECT count(*) FROM mailrelayd_auth_failures", db))) < 20:
        assert time.monotonic() < deadline, f"only {rows} of 20 failures written; log:\n" + "\n".join(node.lines[-20:])
        await asyncio.sleep(0.1)
    # Done with the connections it has: never declared down, still not degraded, said why once.
    assert _events(node, "pg.down") == [], _events(node, "pg.down")
    assert not _ready(node).get("degraded"), _ready(node)
    full = _events(node, "pg.pool_full")
    assert len(full) == 1 and "TooManyConnectionsError" in full[0]["error"], full
    assert node.stop() == 0


async def test_a_missing_database_is_one_clear_line_then_picked_up_when_created(tmp_path, tls_files, pg_server,
                                                                               password, cli_env) -> None:
    db = "t" + uuid.uuid4().hex[:16]
    url = f"postgresql://mailrelayd@127.0.0.1:{pg_server.port}/{db}"
    config = _config(tmp_path, tls_files, url, password)
    node = await asyncio.to_thread(lambda: DaemonProcess(config).wait_ready())
    assert f'database "{db}" does not exist' in _ready(node)["checks"]["suppression_store"]
    # The CLI says what is wrong in one line, no traceback.
    r = await asyncio.to_thread(subprocess.run, [*mailrelayd_cmd(), "suppress", "list", "-c", str(config)],
                                capture_output=True, text=True, env=cli_env, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("mailrelayd: feedback.store:"), r.stderr
    assert f'"{db}" does not exist' in r.stderr.strip().splitlines()[-1], r.stderr
    await asyncio.sleep(4)  # several reconnection attempts
    assert "Traceback" not in node.output, node.output[-2000:]
    refused = _events(node, "pg.connect_refused")
    assert len(refused) == 1 and "InvalidCatalogNameError" in refused[0]["error"], refused
    # Created later: the node connects without a restart.
    pg_server.psql(f"CREATE DATABASE {db} OWNER mailrelayd")
    await asyncio.to_thread(node.wait_event, "pg.connected", 20)
    deadline = time.monotonic() + 10
    while _ready(node).get("degraded"):
        assert time.monotonic() < deadline, _ready(node)
        await asyncio.sleep(0.1)
    assert node.stop() == 0


async def test_metrics_answer_within_a_scrape_timeout_when_postgresql_stops_answering(tmp_path, tls_files, pg_server,
                                                                                     pg_url, password) -> None:
    # store_connect_timeout 5s (the default): a call to a silent server gives up after 10 s.
    node = await asyncio.to_thread(
        lambda: DaemonProcess(_config(tmp_path, tls_files, pg_url, password, "5s")).wait_ready())
    seconds, body = await asyncio.to_thread(_scrape, node)
    assert "mailrelayd_suppression_store_up 1.0" in body
    pg_server.pause()
    try:
        seconds, body = await asyncio.to_thread(_scrape, node)  # the first scrape of the stall
        assert seconds < 3, f"/metrics took {seconds:.1f}s while PostgreSQL did not answer"
        assert "mailrelayd_suppressions{" in body
        deadline = time.monotonic() + 30
        while "mailrelayd_suppression_store_up 0.0" not in body:  # noticed once the first call times out
            assert time.monotonic() < deadline, "suppression_store_up never went to 0"
            seconds, body = await asyncio.to_thread(_scrape, node)
            assert seconds < 3, f"/metrics took {seconds:.1f}s while PostgreSQL did not answer"
            await asyncio.sleep(0.5)
    finally:
        pg_server.resume()
    deadline = time.monotonic() + 30
    while "mailrelayd_suppression_store_up 1.0" not in body:
        assert time.monotonic() < deadline, "suppression_store_up never came back to 1"
        await asyncio.sleep(0.5)
        _, body = await asyncio.to_thread(_scrape, node)
    assert node.stop() == 0


async def test_a_write_the_server_refuses_is_kept_enforced_and_written_once_allowed(tmp_path, tls_files, pg_server,
                                                                                   pg_url, password,
                                                                                   cli_env) -> None:
    db = pg_url.rsplit("/", 1)[1]
    sink = await Sink().start()
    try:
        config = _config(tmp_path, tls_files, pg_url, password, sink_port=sink.port)
        node = await asyncio.to_thread(lambda: DaemonProcess(config).wait_ready())
        relay = node.ports["relay"]
        await deliver(relay, "127.0.0.1", "app@example.com", "gone@dest.test",
                      b"From: app@example.com\r\nTo: gone@dest.test\r\nSubject: hi\r\n\r\nhello\r\n")
        verp = (await sink.wait_for(1, timeout=30))[0].mail_from
        # The server stops accepting our writes (as a revoked grant, or a primary fenced read-only).
        pg_server.psql("REVOKE INSERT, UPDATE ON mailrelayd_suppressions FROM mailrelayd", db)
        dsn = ("From: MAILER-DAEMON@mx.dest.test\r\nTo: bounce\r\nSubject: Undelivered\r\nMIME-Version: 1.0\r\n"
               "Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n"
               "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.dest.test\r\n\r\n"
               "Final-Recipient: rfc822; gone@dest.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--b--\r\n")
        await deliver(relay, "127.0.0.2", "", verp, dsn.encode())
        # Kept in the outbox and enforced here at once, as during an outage; the node says why.
        deadline = time.monotonic() + 15
        while await rcpt_code(relay, "gone@dest.test") != 550:
            assert time.monotonic() < deadline, "the bounce is not enforced:\n" + "\n".join(node.lines[-10:])
            await asyncio.sleep(0.1)
        state = _ready(node)["checks"]["suppression_store"]
        assert state.startswith("degraded:") and "permission denied for table mailrelayd_suppressions" in state
        _, body = await asyncio.to_thread(_scrape, node)
        assert "mailrelayd_suppression_outbox_records 1.0" in body
        # The CLI fails cleanly (exit 2, one line), as with a database that is down.
        r = await asyncio.to_thread(subprocess.run, [*mailrelayd_cmd(), "suppress", "add", "x@dest.test",
                                                     "--reason", "test", "-c", str(config)],
                                    capture_output=True, text=True, env=cli_env, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "permission denied" in r.stderr.strip().splitlines()[-1], r.stderr
        await asyncio.sleep(3)  # several reconnection attempts
        assert "Traceback" not in node.output, node.output[-3000:]
        assert len(_events(node, "pg.connect_refused")) == 1, _events(node, "pg.connect_refused")
        # Allowed again: the record reaches the database, the node is healthy again, no restart.
        pg_server.psql("GRANT INSERT, UPDATE ON mailrelayd_suppressions TO mailrelayd", db)
        deadline = time.monotonic() + 20
        while pg_server.psql("SELECT kind FROM mailrelayd_suppressions WHERE address = 'gone@dest.test'", db) \
                != "hard_bounce":
            assert time.monotonic() < deadline, "the kept record never reached PostgreSQL"
            await asyncio.sleep(0.2)
        while _ready(node).get("degraded"):
            assert time.monotonic() < deadline, _ready(node)
            await asyncio.sleep(0.2)
        assert node.stop() == 0
    finally:
        await sink.stop()
