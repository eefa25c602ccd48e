"""Bounces and complaints arriving over SMTP on the relay listener, into the suppression list; and
synchronous 5xx results from our own deliveries. Fixtures are our own (tests/fixtures/feedback)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiosmtplib

from mailrelayd import metrics
from tests.conftest import TEST_PASSWORD
from tests.support.sink import Sink
from tests.support.smtptalk import SmtpTalk

FIXTURES = Path(__file__).parent / "fixtures" / "feedback"
BOUNCE_BOX = "fbl@bounces.test.example"  # a local (bounce) domain in the base test config


async def _send(d: Any, raw: bytes, rcpt: str = BOUNCE_BOX) -> str:
    """Deliver ``raw`` to the relay listener from an untrusted address, as a remote MTA would."""
    t = await SmtpTalk.connect(d.port("relay"), source="127.0.0.2")
    await t.ehlo("mx.remote.example")
    assert (await t.cmd("MAIL FROM:<>"))[0] == 250
    code, text = await t.cmd(f"RCPT TO:<{rcpt}>")
    assert code == 250, text
    assert (await t.cmd("DATA"))[0] == 354
    wire = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    wire = b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in wire.split(b"\r\n"))
    code, text = await t.cmd(wire.rstrip(b"\r\n") + b"\r\n.", timeout=30)
    await t.close()
    assert code == 250, text
    qid = text.rsplit(" ", 1)[1]
    for _ in range(600):  # processed feedback leaves the queue
        if await d.spool.get(qid) is None:
            return qid
        await asyncio.sleep(0.02)
    raise AssertionError(f"feedback message {qid} not processed")


def _fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def _received(kind: str) -> float:
    """mailrelayd_feedback_received_total{kind}, summed over sender domains."""
    return sum(smp.value for fam in metrics.FEEDBACK_RECEIVED.collect() for smp in fam.samples
               if smp.name.endswith("_total") and smp.labels.get("kind") == kind)


def _store(d: Any) -> Any:
    return d.daemon.suppressions


async def _deliver_to(d: Any, client_tls: Any, sink: Sink, rcpts: list[str]) -> None:
    """Really send one message to ``rcpts`` (feedback without a VERP token is acted on only for
    addresses we sent to) and wait until the spool is done with it."""
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=d.port("submission"), start_tls=True, tls_context=client_tls)
    await c.connect()
    await c.login("alice", TEST_PASSWORD)
    _errors, reply = await c.sendmail("app@example.com", rcpts, b"From: app@example.com\r\nSubject: s\r\n\r\nx\r\n")
    await c.quit()
    qid = reply.rsplit(" ", 1)[1]
    for _ in range(750):
        if await d.spool.get(qid) is None:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"message {qid} not delivered")


async def test_dsn_arf_and_non_feedback_over_smtp(start_daemon, client_tls) -> None:
    sink = await Sink().start()
    try:
        d = await start_daemon({"feedback": {"soft_bounce_threshold": 2, "trusted_reporters": ["127.0.0.2/32"]},
                                "routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}]})
        await _deliver_to(d, client_tls, sink, ["Nobody-Here@example.net", "complainer@example.net",
                                                "full-box@example.org"])
        complaints = _received("complaint")

        await _send(d, _fixture("dsn-hard.eml"))
        hard = await asyncio.to_thread(_store(d).get, "Nobody-Here@example.net")
        assert hard is not None and hard.kind == "hard_bounce" and hard.source == "dsn"
        assert await asyncio.to_thread(_store(d).is_suppressed, "Nobody-Here@example.net")

        await _send(d, _fixture("arf-abuse.eml"))
        c = await asyncio.to_thread(_store(d).get, "complainer@example.net")
        assert c is not None and c.kind == "complaint" and c.source == "arf"
        assert _received("complaint") == complaints + 1

        # One soft bounce is recorded, not suppressed; the threshold's worth suppresses.
        await _send(d, _fixture("dsn-soft.eml"))
        assert not await asyncio.to_thread(_store(d).is_suppressed, "full-box@example.org")
        await _send(d, _fixture("dsn-soft.eml"))
        soft = await asyncio.to_thread(_store(d).get, "full-box@example.org")
        assert soft is not None and soft.kind == "soft_bounce"

        # Auto-replies and ordinary mail to the bounce domain change nothing.
        before = {s.address for s in await asyncio.to_thread(_store(d).list)}
        await _send(d, _fixture("autoreply.eml"))
        await _send(d, _fixture("ordinary.eml"))
        await _send(d, _fixture("mdn.eml"))
        assert {s.address for s in await asyncio.to_thread(_store(d).list)} == before
    finally:
        await sink.stop()


async def test_require_verp_ignores_unauthenticated_bounces(start_daemon, client_tls) -> None:
    sink = await Sink().start()
    try:
        d = await start_daemon({"feedback": {"bounce_domain": "bounces.test.example",
                                             "verp_secret": "t0p-secret-for-the-tests", "require_verp": True,
                                             "trusted_reporters": ["127.0.0.2/32"]},
                                "routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}]})
        await _deliver_to(d, client_tls, sink, ["Nobody-Here@example.net", "complainer@example.net"])
        # Even for an address we sent to, a bounce without a token is not acted on.
        await _send(d, _fixture("dsn-hard.eml"), rcpt="postmaster@bounces.test.example")
        assert not await asyncio.to_thread(_store(d).is_suppressed, "Nobody-Here@example.net")
        # A forged VERP token is no better than none.
        await _send(d, _fixture("dsn-hard.eml"), rcpt="bounces+06h0tmxxecqy7-0-2yxt6kv08g@bounces.test.example")
        assert not await asyncio.to_thread(_store(d).is_suppressed, "Nobody-Here@example.net")
        # Complaints from a listed reporter about an address we sent to still count.
        await _send(d, _fixture("arf-abuse.eml"), rcpt="fbl@bounces.test.example")
        assert await asyncio.to_thread(_store(d).is_suppressed, "complainer@example.net")
    finally:
        await sink.stop()


async def test_hostile_messages_never_crash_and_unparsable_is_kept(start_daemon) -> None:
    d = await start_daemon({"limits": {"max_message_size": "20MB"}})
    nested = b"From: x@remote.example\r\nMIME-Version: 1.0\r\n"
    for i in range(300):
        nested += f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode()
    nested += b"Content-Type: text/plain; charset=no-such-charset\r\n\r\n\xff\xfe bogus\r\n"
    big = (b"From: x@remote.example\r\nSubject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/report; report-type=delivery-status; boundary="z"\r\n\r\n--z\r\n'
           b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; \xff\xff\r\n\r\n"
           b"Final-Recipient: rfc822; <<<>>>\r\nAction: failed\r\nStatus: 9.9.9\r\n\r\n--z\r\n"
           b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + (b"QUFB" * 19 + b"\r\n") * 40000 + b"--z--\r\n")
    garbage = b"\r\n".join([bytes(x for x in range(256) if x not in (10, 13, 46))] * 40)  # binary, no headers
    before = _received("unparsable")
    for raw in (nested, big, _fixture("broken-mime.eml"), garbage):
        await _send(d, raw)
    assert _received("unparsable") >= before + 1
    kept = list((d.config.parent / "state" / "feedback-unparsable").glob("*.eml"))
    assert kept, "an unparsable feedback message is kept for inspection"
    assert await asyncio.to_thread(_store(d).list) == []
    assert d.daemon.readiness()["spool"] == "ok"  # still serving
    t = await SmtpTalk.connect(d.port("relay"))
    assert (await t.ehlo())[0] == 250
    await t.close()


async def test_synchronous_5xx_feeds_the_suppression_list(start_daemon, client_tls) -> None:
    sink = await Sink().start()
    try:
        sink.rcpt_replies["gone@dest.test"] = "550 5.1.1 <gone@dest.test>: Recipient address rejected"
        sink.rcpt_replies["full@dest.test"] = "552 5.2.2 Mailbox full"
        d = await start_daemon({"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}]})
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=d.port("submission"), start_tls=True, tls_context=client_tls)
        await c.connect()
        await c.login("alice", TEST_PASSWORD)
        await c.sendmail("app@example.com", ["gone@dest.test", "full@dest.test"],
                         b"From: app@example.com\r\nSubject: s\r\n\r\nx\r\n")
        await c.quit()

        async def recorded() -> None:
            while await asyncio.to_thread(_store(d).get, "gone@dest.test") is None:
                await asyncio.sleep(0.05)
        await asyncio.wait_for(recorded(), 15)
        gone = await asyncio.to_thread(_store(d).get, "gone@dest.test")
        assert gone.kind == "hard_bounce" and gone.source == "smtp"
        # A full mailbox is a soft bounce even when the remote says 5xx: one is not enough.
        assert not await asyncio.to_thread(_store(d).is_suppressed, "full@dest.test")
    finally:
        await sink.stop()
