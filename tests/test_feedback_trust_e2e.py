"""The feedback trust model over SMTP, sent by an outsider (127.0.0.2, no AUTH, not a trusted
network) to the bounce domain, against a daemon that really delivered mail first (so its delivery
history, and the VERP return paths the remote sink saw, are real). Issue 12 points 1-4."""

from __future__ import annotations

import asyncio
import base64
import ssl
from typing import Any

import aiosmtplib
import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailrelayd import metrics
from mailrelayd.feedback.verp import parse_return_path
from tests.conftest import TEST_PASSWORD
from tests.support.dnsserver import DnsServer
from tests.support.sink import Sink
from tests.test_feedback_e2e import _fixture, _received, _send, _store

SECRET = "t0p-secret-for-the-tests"
BOUNCE_DOMAIN = "bounces.test.example"


def _config(sink: Sink, **feedback: Any) -> dict[str, Any]:
    return {"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
            "feedback": {"bounce_domain": BOUNCE_DOMAIN, "verp_secret": SECRET, **feedback}}


async def _mail(d: Any, tls: ssl.SSLContext, sink: Sink, rcpts: list[str], *, utf8: bool = False) -> dict[str, str]:
    """Submit one message to ``rcpts``, wait until the sink has it and the spool is done with it.
    Returns {recipient as the sink saw it: envelope sender (our VERP return path)}."""
    before = len(sink.messages)
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=d.port("submission"), start_tls=True, tls_context=tls,
                        timeout=10)
    await c.connect()
    await c.login("alice", TEST_PASSWORD)
    data = b"From: app@example.com\r\nTo: list@example.com\r\nSubject: news\r\n\r\nhello\r\n"
    options = ["SMTPUTF8"] if utf8 else []
    errors, reply = await c.sendmail("app@example.com", rcpts, data, mail_options=options)
    await c.quit()
    assert errors == {}
    qid = reply.rsplit(" ", 1)[1]
    for _ in range(750):
        if await d.spool.get(qid) is None and len(sink.messages) >= before + 1:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError(f"message {qid} not delivered to the sink")
    return {r: m.mail_from for m in sink.messages[before:] for r in m.rcpts}


def _reputation(reason: str) -> float:
    return sum(s.value for fam in metrics.REPUTATION_EVENTS.collect() for s in fam.samples
               if s.name.endswith("_total") and s.labels.get("reason") == reason)


async def _suppressed(d: Any, address: str) -> bool:
    return await asyncio.to_thread(_store(d).is_suppressed, address)


def _forged_dsn(address: str) -> bytes:
    return _fixture("dsn-hard.eml").replace(b"Nobody-Here@Example.NET", address.encode()) \
        .replace(b"nobody-here@example.net", address.encode())


def _forged_arf(address: str) -> bytes:
    return _fixture("arf-abuse.eml").replace(b"complainer@example.net", address.encode())


async def test_forged_feedback_from_an_untrusted_host_suppresses_nobody(start_daemon, client_tls) -> None:
    """Point 1: a forged ARF and a forged DSN for addresses never mailed get 250 and change nothing."""
    sink = await Sink().start()
    try:
        d = await start_daemon(_config(sink))
        untrusted = _received("untrusted")
        await _send(d, _forged_arf("ceo@example.net"))
        await _send(d, _forged_dsn("cfo@example.net"))
        assert not await _suppressed(d, "ceo@example.net")
        assert not await _suppressed(d, "cfo@example.net")
        assert await asyncio.to_thread(_store(d).list) == []
        assert _received("untrusted") == untrusted + 2
        kept = list((d.config.parent / "state" / "feedback-untrusted").glob("*.eml"))
        assert len(kept) == 2, "untrusted feedback is kept for inspection"

        # Once we have really sent to them: a DSN without a token counts (require_verp is off),
        # a complaint still does not (its source is not a listed reporter).
        await _mail(d, client_tls, sink, ["ceo@example.net", "cfo@example.net"])
        await _send(d, _forged_dsn("cfo@example.net"))
        await _send(d, _forged_arf("ceo@example.net"))
        assert await _suppressed(d, "cfo@example.net")
        assert not await _suppressed(d, "ceo@example.net")
    finally:
        await sink.stop()


async def test_complaints_from_listed_reporters(start_daemon, client_tls) -> None:
    """An ARF is acted on when its source is listed: by network, or by a verifying DKIM signature."""
    sink = await Sink().start()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    public = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    try:
        with DnsServer() as dns_srv:
            record = f"v=DKIM1; k=rsa; p={public}"
            chunks = " ".join(f'"{record[i:i + 200]}"' for i in range(0, len(record), 200))  # 255-octet strings
            dns_srv.add("fbl1._domainkey.fbl.example.net.", "TXT", chunks)
            d = await start_daemon({**_config(sink, trusted_reporters=["fbl.example.net", "192.0.2.0/24"]),
                                    "dns": {"nameservers": [f"127.0.0.1:{dns_srv.port}"]}})
            await _mail(d, client_tls, sink, ["signed@example.net", "unsigned@example.net", "tampered@example.net"])
            raw = _forged_arf("signed@example.net").replace(b"\n", b"\r\n")
            signed = dkim.sign(raw, b"fbl1", b"fbl.example.net", pem, include_headers=[b"from", b"to", b"subject"])
            await _send(d, signed + raw)
            assert await _suppressed(d, "signed@example.net")
            assert dns_srv.query_count("fbl1._domainkey.fbl.example.net.") >= 1

            # Not signed, and 127.0.0.2 is not in 192.0.2.0/24: not acted on.
            await _send(d, _forged_arf("unsigned@example.net"))
            assert not await _suppressed(d, "unsigned@example.net")
            # A signature of a listed domain that does not verify (body changed after signing).
            raw = _forged_arf("tampered@example.net").replace(b"\n", b"\r\n")
            signed = dkim.sign(raw, b"fbl1", b"fbl.example.net", pem, include_headers=[b"from", b"to", b"subject"])
            await _send(d, signed + raw.replace(b"Everything must go!", b"Everything must stay!"))
            assert not await _suppressed(d, "tampered@example.net")

        d2 = await start_daemon({**_config(sink, trusted_reporters=["127.0.0.2/32"])})
        await _mail(d2, client_tls, sink, ["netlisted@example.net"])
        await _send(d2, _forged_arf("netlisted@example.net"))
        assert await _suppressed(d2, "netlisted@example.net")
    finally:
        await sink.stop()


async def test_delay_warnings_never_count_as_bounces(start_daemon, client_tls) -> None:
    """Point 2: three delay DSNs for a recipient we sent to suppress nothing and record no soft bounce."""
    sink = await Sink().start()
    try:
        d = await start_daemon(_config(sink, soft_bounce_threshold=2))
        paths = await _mail(d, client_tls, sink, ["slow@example.org"])
        delayed = _received("delayed")
        for rcpt in ("fbl@" + BOUNCE_DOMAIN, paths["slow@example.org"], "fbl@" + BOUNCE_DOMAIN):
            await _send(d, _fixture("dsn-delayed.eml"), rcpt=rcpt)
        assert not await _suppressed(d, "slow@example.org")
        assert await asyncio.to_thread(_store(d).soft_bounce_count, "slow@example.org") == 0
        assert _received("delayed") == delayed + 3
    finally:
        await sink.stop()


async def test_reputation_failures_never_suppress_recipients(start_daemon, client_tls) -> None:
    """Point 3: blocklist, IPv6 PTR and DMARC 5.7.26 failures, asynchronous (DSN, even at a valid VERP
    address) or synchronous (our own delivery's 5xx), are counted per sending domain, never against
    the recipient."""
    sink = await Sink().start()
    try:
        sink.rcpt_replies["listed@dest.test"] = (
            "554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using zen.spamhaus.org")
        d = await start_daemon(_config(sink, soft_bounce_threshold=2))
        blocked, auth = _reputation("blocked"), _reputation("authfailure")
        paths = await _mail(d, client_tls, sink, ["reader@example.net", "reader@gmail.example"])
        for _ in range(2):
            await _send(d, _fixture("dsn-blocklist.eml"))
            await _send(d, _fixture("dsn-gmail-ptr.eml"), rcpt=paths["reader@gmail.example"])
            await _send(d, _fixture("dsn-dmarc-5.7.26.eml"))
        for address in ("reader@example.net", "reader@gmail.example"):
            assert not await _suppressed(d, address)
            assert await asyncio.to_thread(_store(d).soft_bounce_count, address) == 0
        assert _reputation("blocked") >= blocked + 4
        assert _reputation("authfailure") >= auth + 2

        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=d.port("submission"), start_tls=True,
                            tls_context=client_tls, timeout=10)
        await c.connect()
        await c.login("alice", TEST_PASSWORD)
        await c.sendmail("app@example.com", ["listed@dest.test"], b"From: app@example.com\r\nSubject: s\r\n\r\nx\r\n")
        await c.quit()
        for _ in range(500):
            if _reputation("blocked") >= blocked + 5:
                break
            await asyncio.sleep(0.02)
        assert _reputation("blocked") >= blocked + 5
        assert await asyncio.to_thread(_store(d).get, "listed@dest.test") is None
        assert await asyncio.to_thread(_store(d).soft_bounce_count, "listed@dest.test") == 0
    finally:
        await sink.stop()


async def test_utf8_recipient_and_verp_token_win(start_daemon, client_tls) -> None:
    """Point 4: RFC 6533 global DSN for a UTF-8 recipient at its VERP address suppresses it; a bounce
    whose body names nobody (or cannot be parsed) is still a bounce for the VERP recipient."""
    sink = await Sink().start()
    try:
        d = await start_daemon(_config(sink))
        paths = await _mail(d, client_tls, sink, ["josé@exämple.net", "ghost@example.org", "odd@example.org"],
                            utf8=True)
        jose = next(p for r, p in paths.items() if r.startswith("jos"))
        assert parse_return_path(jose, BOUNCE_DOMAIN, [SECRET.encode()]) is not None
        await _send(d, _fixture("dsn-global-utf8.eml"), rcpt=jose)
        assert await _suppressed(d, "josé@exämple.net")
        assert await _suppressed(d, "josé@xn--exmple-cua.net")  # the key compares as RCPT TO does

        # The body names nobody, but the token does: classified from the text's own status.
        await _send(d, _fixture("bounce-no-recipient.eml"), rcpt=paths["ghost@example.org"])
        ghost = await asyncio.to_thread(_store(d).get, "ghost@example.org")
        assert ghost is not None and ghost.kind == "hard_bounce"
        # Sent to the plain bounce address, the same message suppresses nobody.
        before = await asyncio.to_thread(_store(d).list)
        await _send(d, _fixture("bounce-no-recipient.eml"))
        assert await asyncio.to_thread(_store(d).list) == before
        # A delivery report we cannot read at a VERP address: a soft bounce for that recipient, kept.
        unparsable = _received("unparsable")
        broken = (b"From: MAILER-DAEMON@mx.example.net\r\nSubject: Undelivered Mail\r\nMIME-Version: 1.0\r\n"
                  b'Content-Type: multipart/report; report-type=delivery-status; boundary="z"\r\n\r\n--z\r\n'
                  b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; \xff\xff\r\n\r\n"
                  b"Final-Recipient: rfc822; <<<>>>\r\nAction: failed\r\nStatus: 9.9.9\r\n\r\n--z--\r\n")
        await _send(d, broken, rcpt=paths["odd@example.org"])
        assert await asyncio.to_thread(_store(d).soft_bounce_count, "odd@example.org") == 1
        assert not await _suppressed(d, "odd@example.org")
        assert _received("unparsable") == unparsable + 1
    finally:
        await sink.stop()



def _unsubscribe(address: str) -> bytes:
    """Apple Mail's "Unsubscribe": a message of the recipient's own to our List-Unsubscribe mailto."""
    return (f"From: Reader <{address}>\r\nTo: unsubscribe@{BOUNCE_DOMAIN}\r\nSubject: unsubscribe\r\n"
            "Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <unsub-1@mail.example>\r\n"
            "X-Apple-Unsubscribe: true\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
            "This message was automatically generated by Mail to unsubscribe from a mailing list.\r\n").encode()


async def test_an_unsubscribe_mail_counts_only_with_its_senders_own_signature(start_daemon, client_tls) -> None:
    """An unsubscribe mail names its complainer in its own From, so nobody else can vouch for it:
    a DKIM signature of the complainer's (listed) domain counts; a listed network, or a signature of
    another listed domain, does not. Sent from 127.0.0.2, which is listed here."""
    sink = await Sink().start()
    keys = {}
    try:
        with DnsServer() as dns_srv:
            for domain in ("icloud.example", "fbl.example.net"):
                key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
                keys[domain] = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption())
                public = base64.b64encode(key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
                record = f"v=DKIM1; k=rsa; p={public}"
                dns_srv.add(f"s1._domainkey.{domain}.", "TXT",
                            " ".join(f'"{record[i:i + 200]}"' for i in range(0, len(record), 200)))
            d = await start_daemon({
                **_config(sink, trusted_reporters=["icloud.example", "fbl.example.net", "127.0.0.2/32"]),
                "dns": {"nameservers": [f"127.0.0.1:{dns_srv.port}"]}})
            readers = ["own@icloud.example", "other@icloud.example", "bare@icloud.example"]
            await _mail(d, client_tls, sink, readers)

            def signed(address: str, domain: str) -> bytes:
                raw = _unsubscribe(address)
                return dkim.sign(raw, b"s1", domain.encode(), keys[domain],
                                 include_headers=[b"from", b"to", b"subject"]) + raw

            await _send(d, signed("other@icloud.example", "fbl.example.net"))  # a listed domain, not theirs
            await _send(d, _unsubscribe("bare@icloud.example"))  # unsigned, from a listed network
            assert not await _suppressed(d, "other@icloud.example")
            assert not await _suppressed(d, "bare@icloud.example")
            await _send(d, signed("own@icloud.example", "icloud.example"))
            assert await _suppressed(d, "own@icloud.example")
    finally:
        await sink.stop()


async def test_copies_of_a_soft_bounce_without_a_token_count_once(start_daemon, client_tls) -> None:
    """A DSN to the plain bounce address, sent twice (or an NDR from every hop), is one soft bounce of
    the message it quotes (by Message-ID), as copies of one at a VERP address are; a report about
    another message we sent to the same recipient still counts."""
    sink = await Sink().start()
    try:
        d = await start_daemon(_config(sink, soft_bounce_threshold=3))
        for mid in ("order-77@example.com", "order-78@example.com"):
            c = aiosmtplib.SMTP(hostname="127.0.0.1", port=d.port("submission"), start_tls=True,
                                tls_context=client_tls, timeout=10)
            await c.connect()
            await c.login("alice", TEST_PASSWORD)
            data = f"From: app@example.com\r\nTo: full-box@example.org\r\nMessage-ID: <{mid}>\r\n\r\nhi\r\n"
            await c.sendmail("app@example.com", ["full-box@example.org"], data.encode())
            await c.quit()
        for _ in range(500):
            if len(sink.messages) == 2 and not await d.spool.list_messages():
                break
            await asyncio.sleep(0.02)
        dsn = _fixture("dsn-soft.eml")
        count = _store(d).soft_bounce_count
        for _ in range(3):
            await _send(d, dsn, rcpt="fbl@" + BOUNCE_DOMAIN)
        assert await asyncio.to_thread(count, "full-box@example.org") == 1
        await _send(d, dsn.replace(b"order-77@", b"order-78@"), rcpt="fbl@" + BOUNCE_DOMAIN)
        assert await asyncio.to_thread(count, "full-box@example.org") == 2
        assert not await _suppressed(d, "full-box@example.org")
    finally:
        await sink.stop()
