"""Feedback that reaches a node other than the one that sent the message (two subprocess daemons,
one real PostgreSQL, one bounce domain behind a balancer): a listed reporter's complaint is acted on
by whichever node receives it; a bounce or an unlisted complaint is not, and says why
(``verp_not_here``)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import base_config, deep_merge, write_config
from tests.support.proc import DaemonProcess
from tests.support.sink import Sink
from tests.support.smtptalk import deliver, rcpt_code

VERP_SECRET = "scale-out-verp-secret-0123456789"
BOUNCE_DOMAIN = "bounces.test.example"  # a local domain of the base test config
REPORTER = "127.0.0.2"  # in feedback.trusted_reporters
STRANGER = "127.0.0.3"


def _node(tmp_path: Path, name: str, tls_files: Any, pg_url: str, password: Path, sink_port: int) -> Path:
    return write_config(tmp_path / name, deep_merge(base_config(tls_files), {
        "feedback": {"bounce_domain": BOUNCE_DOMAIN, "verp_secret": VERP_SECRET, "store": pg_url,
                     "store_password_file": str(password), "store_poll_interval": "500ms",
                     "store_connect_timeout": "2s", "trusted_reporters": [f"{REPORTER}/32"]},
        "routes": [{"domain": "*", "host": f"127.0.0.1:{sink_port}"}],
    }))


def _arf(rcpt: str, verp: str) -> bytes:
    """An abuse report (RFC 5965) quoting our VERP return path."""
    return (
        "From: Feedback Loop <fbl@isp.example.net>\r\nTo: postmaster@bounces.test.example\r\n"
        "Subject: Abuse report\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=feedback-report; boundary=\"b\"\r\n\r\n"
        "--b\r\nContent-Type: text/plain\r\n\r\nAn abuse report.\r\n\r\n"
        "--b\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\nUser-Agent: FBL/1\r\n"
        f"Version: 1\r\nOriginal-Mail-From: <{verp}>\r\nOriginal-Rcpt-To: <{rcpt}>\r\n\r\n"
        "--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Return-Path: <{verp}>\r\nFrom: app@example.com\r\nTo: {rcpt}\r\nSubject: hi\r\n\r\n--b--\r\n"
    ).encode()


def _dsn(rcpt: str) -> bytes:
    return (
        "From: MAILER-DAEMON@mx.dest.test\r\nTo: bounce\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.dest.test\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: User unknown\r\n\r\n--b--\r\n"
    ).encode()


async def _sent_by(sink: Sink, node: DaemonProcess, rcpt: str) -> str:
    """Send to ``rcpt`` through ``node``; the VERP return path the message left with."""
    before = len(sink.messages)
    await deliver(node.ports["relay"], "127.0.0.1", "app@example.com", rcpt,
                  f"From: app@example.com\r\nTo: {rcpt}\r\nSubject: hi\r\n\r\nhello\r\n".encode(),
                  helo="mx.example.net")
    msgs = await sink.wait_for(before + 1, timeout=30)
    return next(m for m in msgs[before:] if rcpt in m.rcpts).mail_from


async def _feedback_event(node: DaemonProcess, rcpt: str) -> dict[str, Any]:
    def wait() -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for ev in list(node.events):
                if ev.get("event") == "feedback.received" and rcpt in str(ev):
                    return ev
            time.sleep(0.02)
        raise AssertionError(f"no feedback.received for {rcpt}:\n" + "\n".join(node.lines[-20:]))
    return await asyncio.to_thread(wait)


@pytest.fixture
async def fleet(tmp_path: Path, tls_files: Any, pg_server: Any, pg_url: str) -> Any:
    password = pg_server.password_file(tmp_path / "secrets")
    sink = await Sink().start()
    try:
        nodes = await asyncio.gather(*(asyncio.to_thread(
            lambda n=n: DaemonProcess(_node(tmp_path, n, tls_files, pg_url, password, sink.port)).wait_ready())
            for n in ("a", "b")))
        yield sink, nodes[0], nodes[1]
    finally:
        await sink.stop()


async def test_a_listed_reporters_complaint_at_another_node_is_suppressed_fleet_wide(fleet) -> None:
    sink, a, b = fleet
    verp = await _sent_by(sink, a, "reader@dest.test")
    await deliver(b.ports["relay"], REPORTER, "fbl@isp.example.net", f"postmaster@{BOUNCE_DOMAIN}",
                  _arf("reader@dest.test", verp), helo="mx.example.net")
    ev = await _feedback_event(b, "reader@dest.test")
    assert ev["kind"] == "complaint" and ev["suppressed"] == ["reader@dest.test"], ev
    assert ev["verp_not_here"] == verp.split("+", 1)[1].split("-", 1)[0].upper(), ev
    deadline = time.monotonic() + 2
    while await rcpt_code(a.ports["relay"], "reader@dest.test") != 550:
        assert time.monotonic() < deadline, "the complaint received by node B is not enforced by node A"
        await asyncio.sleep(0.02)


async def test_an_unlisted_complaint_or_a_bounce_at_another_node_is_not_acted_on_and_says_why(fleet) -> None:
    sink, a, b = fleet
    verp = await _sent_by(sink, a, "reader@dest.test")
    await deliver(b.ports["relay"], STRANGER, "fbl@isp.example.net", f"postmaster@{BOUNCE_DOMAIN}",
                  _arf("reader@dest.test", verp), helo="mx.example.net")
    ev = await _feedback_event(b, "reader@dest.test")
    assert ev["kind"] == "untrusted" and not ev["suppressed"] and ev["verp_not_here"], ev
    verp = await _sent_by(sink, a, "gone@dest.test")
    await deliver(b.ports["relay"], STRANGER, "", verp, _dsn("gone@dest.test"), helo="mx.example.net")
    ev = await _feedback_event(b, "gone@dest.test")
    assert ev["kind"] == "untrusted" and not ev["suppressed"] and ev["verp_not_here"], ev
    assert await rcpt_code(a.ports["relay"], "reader@dest.test") == 250
    assert await rcpt_code(b.ports["relay"], "gone@dest.test") == 250
