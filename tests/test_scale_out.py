"""Two relays, one truth: two subprocess daemons with separate spools and state, one real PostgreSQL
(tests/support/pg.py), as behind a load balancer. What one node learns, the other enforces at RCPT
within 2 s; with PostgreSQL down both keep accepting and delivering, and what was learned meanwhile
reaches the database when it returns. The AUTH-failure lockout counts across nodes."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_PASSWORD, base_config, deep_merge, mailrelayd_cmd, write_config
from tests.support.proc import DaemonProcess
from tests.support.sink import Sink
from tests.support.smtptalk import SmtpTalk

VERP_SECRET = "scale-out-verp-secret-0123456789"
BOUNCE_DOMAIN = "bounces.test.example"  # a local domain of the base test config


def _node(tmp_path: Path, name: str, tls_files: Any, pg_url: str, password: Path, sink_port: int) -> Path:
    return write_config(tmp_path / name, deep_merge(base_config(tls_files), {
        "feedback": {"bounce_domain": BOUNCE_DOMAIN, "verp_secret": VERP_SECRET, "store": pg_url,
                     "store_password_file": str(password), "store_poll_interval": "500ms",
                     "store_connect_timeout": "2s"},
        "routes": [{"domain": "*", "host": f"127.0.0.1:{sink_port}"}],
        "delivery": {"retry_initial": "1s", "retry_max": "1s"},
    }))


async def _start(*configs: Path) -> list[DaemonProcess]:
    return list(await asyncio.gather(*(asyncio.to_thread(lambda c=c: DaemonProcess(c).wait_ready())
                                       for c in configs)))


async def _submit(port: int, rcpt: str) -> str:
    """A message through the relay listener from a trusted address; returns the queue id."""
    t = await SmtpTalk.connect(port)
    await t.ehlo()
    assert (await t.cmd("MAIL FROM:<app@example.com>"))[0] == 250
    code, text = await t.cmd(f"RCPT TO:<{rcpt}>")
    assert code == 250, text
    assert (await t.cmd("DATA"))[0] == 354
    code, text = await t.cmd(f"From: app@example.com\r\nTo: {rcpt}\r\nSubject: hi\r\n\r\nhello\r\n.")
    await t.close()
    assert code == 250, text
    return text.rsplit(" ", 1)[1]


async def _rcpt(port: int, rcpt: str) -> tuple[int, str]:
    """The reply to RCPT TO for ``rcpt`` (no message is sent)."""
    t = await SmtpTalk.connect(port)
    await t.ehlo()
    assert (await t.cmd("MAIL FROM:<app@example.com>"))[0] == 250
    reply = await t.cmd(f"RCPT TO:<{rcpt}>")
    await t.close()
    return reply


async def _refused_within(port: int, rcpt: str, seconds: float) -> float:
    """Seconds until ``port`` refuses ``rcpt`` at RCPT with 550 5.7.1; fails past ``seconds``."""
    start = time.monotonic()
    while True:
        code, text = await _rcpt(port, rcpt)
        elapsed = time.monotonic() - start
        if code == 550:
            assert text.startswith("5.7.1"), text
            return elapsed
        assert code == 250, text
        assert elapsed < seconds, f"{rcpt} still accepted after {elapsed:.2f}s"
        await asyncio.sleep(0.02)


def _dsn(rcpt: str) -> bytes:
    """A hard-bounce DSN (RFC 3464) from a remote MTA about ``rcpt``."""
    return (
        "From: MAILER-DAEMON@mx.dest.test\r\nTo: bounce\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n"
        "--b\r\nContent-Type: text/plain\r\n\r\nThe mail could not be delivered.\r\n\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.dest.test\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown\r\n\r\n"
        "--b--\r\n"
    ).encode()


async def _bounce(port: int, verp_address: str, rcpt: str) -> None:
    """Deliver a DSN to a node's VERP address, as the remote MTA would (from an untrusted address)."""
    t = await SmtpTalk.connect(port, source="127.0.0.2")
    await t.ehlo("mx.dest.test")
    assert (await t.cmd("MAIL FROM:<>"))[0] == 250
    code, text = await t.cmd(f"RCPT TO:<{verp_address}>")
    assert code == 250, text
    assert (await t.cmd("DATA"))[0] == 354
    code, text = await t.cmd(_dsn(rcpt) + b".")
    await t.close()
    assert code == 250, text


async def _sent_and_bounced(sink: Sink, node: DaemonProcess, rcpt: str) -> None:
    """Send to ``rcpt`` through ``node``, then bounce it at the VERP address the message left with."""
    before = len(sink.messages)
    await _submit(node.ports["relay"], rcpt)
    msgs = await sink.wait_for(before + 1, timeout=30)
    out = next(m for m in msgs[before:] if rcpt in m.rcpts)
    assert out.mail_from.startswith("bounces+") and out.mail_from.endswith("@" + BOUNCE_DOMAIN), out.mail_from
    await _bounce(node.ports["relay"], out.mail_from, rcpt)


async def _processed(node: DaemonProcess, rcpt: str) -> None:
    def wait() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for ev in list(node.events):
                if ev.get("event") == "feedback.received" and rcpt in (ev.get("suppressed") or []):
                    return
            time.sleep(0.01)
        raise AssertionError(f"{rcpt} not suppressed; log tail:\n" + "\n".join(node.lines[-20:]))
    await asyncio.to_thread(wait)


def _http(node: DaemonProcess, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def password(pg_server: Any, tmp_path: Path) -> Path:
    return pg_server.password_file(tmp_path / "secrets")


async def test_hard_bounce_on_node_a_is_refused_by_node_b_within_2s(tmp_path, tls_files, pg_url, password) -> None:
    sink = await Sink().start()
    try:
        a, b = await _start(_node(tmp_path, "a", tls_files, pg_url, password, sink.port),
                            _node(tmp_path, "b", tls_files, pg_url, password, sink.port))
        assert (await _rcpt(b.ports["relay"], "gone@dest.test"))[0] == 250
        await _sent_and_bounced(sink, a, "gone@dest.test")
        await _processed(a, "gone@dest.test")
        assert await _refused_within(b.ports["relay"], "gone@dest.test", 2.0) < 2.0
        assert (await _rcpt(a.ports["relay"], "gone@dest.test"))[0] == 550
        assert (await _rcpt(b.ports["relay"], "other@dest.test"))[0] == 250
        # The password never reaches the logs.
        assert "pg-test-secret" not in a.output + b.output
    finally:
        await sink.stop()


async def test_suppress_add_through_node_b_cli_is_enforced_by_node_a(tmp_path, tls_files, pg_url, password,
                                                                     cli_env) -> None:
    sink = await Sink().start()
    try:
        a, b = await _start(_node(tmp_path, "a", tls_files, pg_url, password, sink.port),
                            _node(tmp_path, "b", tls_files, pg_url, password, sink.port))
        r = await asyncio.to_thread(subprocess.run, [*mailrelayd_cmd(), "suppress", "add", "unsub@dest.test",
                                                     "--reason", "asked us", "-c", str(b.config)],
                                    capture_output=True, text=True, env=cli_env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert await _refused_within(a.ports["relay"], "unsub@dest.test", 2.0) < 2.0
        r = await asyncio.to_thread(subprocess.run, [*mailrelayd_cmd(), "suppress", "remove", "unsub@dest.test",
                                                     "-c", str(a.config)],
                                    capture_output=True, text=True, env=cli_env, timeout=60)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 2.0
        while (await _rcpt(b.ports["relay"], "unsub@dest.test"))[0] != 250:
            assert time.monotonic() < deadline, "removal not applied on node B within 2s"
            await asyncio.sleep(0.02)
    finally:
        await sink.stop()


async def test_postgresql_down_both_nodes_keep_flowing_and_catch_up(tmp_path, tls_files, pg_url, password,
                                                                    pg_server) -> None:
    sink = await Sink().start()
    try:
        a, b = await _start(_node(tmp_path, "a", tls_files, pg_url, password, sink.port),
                            _node(tmp_path, "b", tls_files, pg_url, password, sink.port))
        await _sent_and_bounced(sink, a, "before@dest.test")
        await _refused_within(b.ports["relay"], "before@dest.test", 2.0)
        await asyncio.to_thread(pg_server.stop)
        try:
            for node in (a, b):
                deadline = time.monotonic() + 20
                while True:
                    status, body = await asyncio.to_thread(_http, node, "/ready")
                    ready = json.loads(body)
                    if "suppression_store" in ready.get("degraded", []):
                        break
                    assert time.monotonic() < deadline, ready
                    await asyncio.sleep(0.1)
                # Degraded, named, and still ready: a load balancer keeps the node in rotation.
                assert status == 200 and ready["status"] == "ok", ready
                assert ready["checks"]["suppression_store"].startswith("degraded: PostgreSQL at")
                metrics_text = (await asyncio.to_thread(_http, node, "/metrics"))[1].decode()
                assert "mailrelayd_suppression_store_up 0.0" in metrics_text
            # Both accept and deliver; the last known list still applies.
            before = len(sink.messages)
            await _submit(a.ports["relay"], "ok-a@dest.test")
            await _submit(b.ports["relay"], "ok-b@dest.test")
            got = await sink.wait_for(before + 2, timeout=30)
            assert {r for m in got[before:] for r in m.rcpts} == {"ok-a@dest.test", "ok-b@dest.test"}
            assert (await _rcpt(b.ports["relay"], "before@dest.test"))[0] == 550
            # A bounce processed meanwhile is enforced by its node at once and kept in the outbox.
            await _sent_and_bounced(sink, a, "during@dest.test")
            await _processed(a, "during@dest.test")
            assert (await _rcpt(a.ports["relay"], "during@dest.test"))[0] == 550
            metrics_text = (await asyncio.to_thread(_http, a, "/metrics"))[1].decode()
            assert "mailrelayd_suppression_outbox_records 1.0" in metrics_text
        finally:
            await asyncio.to_thread(pg_server.start)
        # Once PostgreSQL is back the record reaches it, and node B enforces it.
        await _refused_within(b.ports["relay"], "during@dest.test", 30.0)
        db = pg_url.rsplit("/", 1)[1]
        row = await asyncio.to_thread(pg_server.psql, "SELECT kind, source FROM mailrelayd_suppressions"
                                      " WHERE address = 'during@dest.test'", db)
        assert row == "hard_bounce|dsn"
        deadline = time.monotonic() + 10
        while json.loads((await asyncio.to_thread(_http, a, "/ready"))[1]).get("degraded"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert a.stop() == 0 and b.stop() == 0
    finally:
        await sink.stop()


async def test_auth_lockout_counts_across_nodes(tmp_path, tls_files, pg_url, password) -> None:
    # base_config: auth.max_failures = 3 within 1m, lockout 1m.
    a, b = await _start(_node(tmp_path, "a", tls_files, pg_url, password, 9),
                        _node(tmp_path, "b", tls_files, pg_url, password, 9))
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    bad = base64.b64encode(b"\0alice\0wrong password").decode()

    async def auth(node: DaemonProcess) -> int:
        t = await SmtpTalk.connect(node.ports["submission"])
        await t.ehlo()
        await t.starttls(ctx)
        await t.ehlo()
        code, _ = await t.cmd(f"AUTH PLAIN {bad}")
        await t.close()
        return code

    assert await auth(a) == 535
    assert await auth(b) == 535
    assert await auth(a) == 535  # the third failure from this IP, over both nodes
    deadline = time.monotonic() + 2.0
    while await auth(b) != 421:  # node B has seen only one failure itself
        assert time.monotonic() < deadline, "node B did not apply the lockout decided with node A's failures"
        await asyncio.sleep(0.05)
    assert await auth(a) == 421


async def test_a_user_limit_of_10_per_hour_across_two_nodes_allows_10_not_20(tmp_path, tls_files, pg_url,
                                                                            password) -> None:
    configs = [write_config(tmp_path / name, deep_merge(base_config(tls_files), {
        "auth": {"default_rate": "10/h"},
        "feedback": {"store": pg_url, "store_password_file": str(password)}})) for name in ("a", "b")]
    a, b = await _start(*configs)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    plain = base64.b64encode(b"\0alice\0" + TEST_PASSWORD.encode()).decode()

    async def session(node: DaemonProcess) -> SmtpTalk:
        t = await SmtpTalk.connect(node.ports["submission"])
        await t.ehlo()
        await t.starttls(ctx)
        await t.ehlo()
        code, text = await t.cmd(f"AUTH PLAIN {plain}")
        assert code == 235, text
        return t

    ta, tb = await session(a), await session(b)
    replies: list[tuple[str, int, str]] = []
    for i in range(20):  # alternate nodes, as a load balancer would
        name, t = ("a", ta) if i % 2 == 0 else ("b", tb)
        code, text = await t.cmd("MAIL FROM:<app@example.com>")
        replies.append((name, code, text))
        assert (await t.cmd("RSET"))[0] == 250
        # Submissions a moment apart (the nodes decide locally and share counts within milliseconds;
        # a simultaneous burst on both nodes may overshoot by what they admit in that time).
        await asyncio.sleep(0.1)
    await ta.close()
    await tb.close()
    accepted = [r for r in replies if r[1] == 250]
    refused = [r for r in replies if r[1] != 250]
    assert len(accepted) == 10, replies
    assert {r[0] for r in accepted} == {"a", "b"}  # both nodes took part
    assert all(code == 451 and text.startswith("4.7.1") for _, code, text in refused), refused
