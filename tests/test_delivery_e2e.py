"""Submission to final outcome through the real daemon: delivery, retries, DSNs, suppression, VERP
feedback; remote MTAs are scriptable loopback SMTP servers and MX answers come from a loopback DNS
responder."""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
from email.message import EmailMessage
from typing import Any

import aiosmtplib

from mailrelayd.delivery.dsn import DsnRecipient, build_dsn
from tests.conftest import TEST_PASSWORD
from tests.support.dnsserver import DnsServer
from tests.support.sink import Sink
from tests.support.smtptalk import SmtpTalk


def _msg(to: list[str], frm: str = "app@example.com") -> EmailMessage:
    m = EmailMessage()
    m["From"] = frm
    m["To"] = ", ".join(to)
    m["Subject"] = "delivery test"
    m.set_content("hello\n.line starting with a dot\n")
    return m


async def _submit(port: int, tls: ssl.SSLContext, to: list[str], frm: str = "app@example.com") -> str:
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, tls_context=tls, timeout=10)
    await c.connect()
    await c.login("alice", TEST_PASSWORD)
    errors, reply = await c.send_message(_msg(to, frm), sender=frm, recipients=to)
    await c.quit()
    assert errors == {}
    return reply.rsplit(" ", 1)[1]


def _route(sink: Sink, **delivery: Any) -> dict[str, Any]:
    return {"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
            "delivery": {"retry_initial": "1s", "retry_max": "1s", "retry_jitter": 0.0, **delivery}}


async def _states(d: Any, qid: str) -> dict[str, str]:
    return {a: st for a, (st, _) in (await d.spool.recipient_outcomes(qid)).items()}


async def _wait_states(d: Any, qid: str, want: dict[str, str], timeout: float = 15) -> None:
    async def poll() -> None:
        while await _states(d, qid) != want:
            await asyncio.sleep(0.05)
    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"states {await _states(d, qid)} != {want}") from None


def _dsn_in(sink: Sink) -> list[email.message.EmailMessage]:
    out = []
    for m in sink.messages:
        if m.mail_from in ("", "<>"):
            out.append(email.message_from_bytes(m.data, policy=email.policy.default))
    return out


async def test_submitted_message_is_delivered(start_daemon, client_tls) -> None:
    sink = await Sink().start()
    try:
        d = await start_daemon(_route(sink))
        qid = await _submit(d.port("submission"), client_tls, ["a@dest.test", "b@dest.test", "c@other.test"])
        msgs = await sink.wait_for(2)
        await _wait_states(d, qid, {"a@dest.test": "delivered", "b@dest.test": "delivered",
                                    "c@other.test": "delivered"})
        # Same-domain recipients share one transaction.
        assert sorted(len(m.rcpts) for m in msgs) == [1, 2]
        parsed = email.message_from_bytes(msgs[0].data, policy=email.policy.default)
        assert parsed["Subject"] == "delivery test"
        assert f"id {qid}" in str(parsed["Received"])
        assert ".line starting with a dot" in parsed.get_content()
    finally:
        await sink.stop()


async def test_deferred_then_delivered_on_retry(start_daemon, client_tls) -> None:
    sink = await Sink().start()
    try:
        sink.rcpt_replies["later@dest.test"] = "451 4.7.1 Greylisted, try again"
        d = await start_daemon(_route(sink))
        qid = await _submit(d.port("submission"), client_tls, ["later@dest.test"])
        await _wait_states(d, qid, {"later@dest.test": "deferred"})
        rec = await d.spool.get(qid)
        assert "4.7.1" in rec.recipients[0].last_reply
        del sink.rcpt_replies["later@dest.test"]
        await _wait_states(d, qid, {"later@dest.test": "delivered"})
        assert len(sink.messages) == 1
        assert sink.rcpt_seen.count("later@dest.test") >= 2
    finally:
        await sink.stop()


async def test_permanent_failure_sends_one_dsn_for_the_failed_recipients(start_daemon, client_tls) -> None:
    sink = await Sink().start()
    try:
        sink.rcpt_replies["gone@dest.test"] = "550 5.1.1 <gone@dest.test>: No such user"
        sink.rcpt_replies["closed@dest.test"] = "554 5.2.1 Mailbox disabled"
        d = await start_daemon(_route(sink))
        qid = await _submit(d.port("submission"), client_tls, ["ok@dest.test", "gone@dest.test",
                                                               "closed@dest.test"])
        await _wait_states(d, qid, {"ok@dest.test": "delivered", "gone@dest.test": "bounced",
                                    "closed@dest.test": "bounced"})
        await sink.wait_for(2)
        dsns = _dsn_in(sink)
        assert len(dsns) == 1
        dsn = dsns[0]
        assert dsn.get_content_type() == "multipart/report"
        assert dsn.get_param("report-type") == "delivery-status"
        assert [m.rcpts for m in sink.messages if m.mail_from in ("", "<>")] == [["app@example.com"]]
        raw = next(m.data for m in sink.messages if m.mail_from in ("", "<>")).decode("utf-8", "replace")
        assert "Final-Recipient: rfc822; gone@dest.test" in raw
        assert "Final-Recipient: rfc822; closed@dest.test" in raw
        assert "Final-Recipient: rfc822; ok@dest.test" not in raw
        assert "Status: 5.1.1" in raw and "Status: 5.2.1" in raw
        assert "Subject: delivery test" in raw  # the original headers are returned
    finally:
        await sink.stop()


async def test_no_dsn_for_null_sender(start_daemon) -> None:
    sink = await Sink().start()
    try:
        sink.rcpt_replies["gone@dest.test"] = "550 5.1.1 No such user"
        d = await start_daemon(_route(sink))
        t = await SmtpTalk.connect(d.port("relay"))  # trusted network may relay
        await t.ehlo()
        assert (await t.cmd("MAIL FROM:<>"))[0] == 250
        assert (await t.cmd("RCPT TO:<gone@dest.test>"))[0] == 250
        assert (await t.cmd("DATA"))[0] == 354
        code, text = await t.cmd(b"From: MAILER-DAEMON@x.test\r\nSubject: bounce\r\n\r\nx\r\n.")
        assert code == 250
        qid = text.rsplit(" ", 1)[1]
        await t.close()
        await _wait_states(d, qid, {"gone@dest.test": "bounced"})
        await asyncio.sleep(0.5)
        assert sink.messages == []  # no bounce of a bounce
    finally:
        await sink.stop()


async def test_expiry_bounces_with_last_reply(start_daemon, client_tls) -> None:
    sink = await Sink().start()
    try:
        sink.rcpt_replies["slow@dest.test"] = "452 4.2.2 Mailbox full"
        d = await start_daemon(_route(sink, max_queue_lifetime="2s"))
        qid = await _submit(d.port("submission"), client_tls, ["slow@dest.test"])
        await _wait_states(d, qid, {"slow@dest.test": "expired"})
        await sink.wait_for(1)
        raw = sink.messages[0].data.decode()
        assert sink.messages[0].rcpts == ["app@example.com"]
        assert "Action: failed" in raw and "Status: 4.2.2" in raw
    finally:
        await sink.stop()


async def test_drop_after_data_is_retried(start_daemon, client_tls) -> None:
    sink = await Sink().start()
    try:
        sink.data_action = "drop"
        d = await start_daemon(_route(sink))
        qid = await _submit(d.port("submission"), client_tls, ["x@dest.test"])
        await _wait_states(d, qid, {"x@dest.test": "deferred"})
        assert sink.dropped >= 1
        sink.data_action = "ok"
        await _wait_states(d, qid, {"x@dest.test": "delivered"})
        assert len(sink.messages) == 1
    finally:
        await sink.stop()


async def test_mx_delivery_via_dns(start_daemon, client_tls) -> None:
    sink = await Sink().start()
    try:
        with DnsServer() as dns_srv:
            dns_srv.add("mx-dest.test.", "MX", "10 mx.mx-dest.test.")
            dns_srv.add("mx.mx-dest.test.", "A", "127.0.0.1")
            dns_srv.add("nullmx.test.", "MX", "0 .")
            d = await start_daemon({"routes": [], "dns": {"nameservers": [f"127.0.0.1:{dns_srv.port}"]},
                                    "delivery": {"port": sink.port}})
            qid = await _submit(d.port("submission"), client_tls, ["a@mx-dest.test", "b@nullmx.test"])
            await _wait_states(d, qid, {"a@mx-dest.test": "delivered", "b@nullmx.test": "bounced"})
            assert "5.1.10" in (await d.spool.recipient_outcomes(qid))["b@nullmx.test"][1]
    finally:
        await sink.stop()


async def test_suppressed_after_queueing_is_skipped_and_reported(start_daemon, client_tls) -> None:
    sink = await Sink().start()
    try:
        sink.rcpt_replies["held@dest.test"] = "451 4.3.0 try later"
        d = await start_daemon(_route(sink))
        qid = await _submit(d.port("submission"), client_tls, ["held@dest.test"])
        await _wait_states(d, qid, {"held@dest.test": "deferred"})
        await asyncio.to_thread(d.daemon.suppressions.add, "held@dest.test", reason="test", kind="manual")
        await _wait_states(d, qid, {"held@dest.test": "suppressed"})
        dsns = _dsn_in(sink)
        await sink.wait_for(1)
        dsns = _dsn_in(sink)
        assert len(dsns) == 1 and "held@dest.test" in sink.messages[-1].data.decode()
        # and new submissions to it are refused at RCPT
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=d.port("submission"), start_tls=True, tls_context=client_tls)
        await c.connect()
        await c.login("alice", TEST_PASSWORD)
        await c.mail("app@example.com")
        try:
            await c.rcpt("held@dest.test")
            raise AssertionError("suppressed recipient accepted")
        except aiosmtplib.SMTPRecipientRefused as e:
            assert e.code == 550 and "5.7.1" in e.message
        await c.quit()
    finally:
        await sink.stop()


async def test_verp_bounce_comes_back_and_suppresses(start_daemon, client_tls) -> None:
    sink = await Sink().start()
    try:
        d = await start_daemon({**_route(sink), "feedback": {"bounce_domain": "bounces.test.example",
                                                             "verp_secret": "s3cret-for-tests"}})
        qid = await _submit(d.port("submission"), client_tls, ["nouser@dest.test"])
        await sink.wait_for(1)
        await _wait_states(d, qid, {"nouser@dest.test": "delivered"})
        rp = sink.messages[0].mail_from
        assert rp.lower().startswith("bounces+") and rp.lower().endswith("@bounces.test.example")
        # The remote MTA bounces later, to the VERP address, from an untrusted source.
        dsn = build_dsn(reporting_mta="mx.dest.test", to=rp, original=sink.messages[0].data, queue_id="REMOTE1",
                        arrival_date=0.0, action="failed", now=1.0,
                        recipients=[DsnRecipient("nouser@dest.test", "5.1.1", "550 5.1.1 User unknown",
                                                 "mx.dest.test", 1.0)])
        t = await SmtpTalk.connect(d.port("relay"), source="127.0.0.2")
        await t.ehlo("mx.dest.test")
        assert (await t.cmd("MAIL FROM:<>"))[0] == 250
        assert (await t.cmd(f"RCPT TO:<{rp.lower()}>"))[0] == 250  # remote MTAs may lowercase
        assert (await t.cmd("DATA"))[0] == 354
        assert (await t.cmd(dsn.rstrip(b"\r\n") + b"\r\n."))[0] == 250
        await t.close()

        async def suppressed() -> None:
            while not await asyncio.to_thread(d.daemon.suppressions.is_suppressed, "nouser@dest.test"):
                await asyncio.sleep(0.05)
        await asyncio.wait_for(suppressed(), 15)
        entry = await asyncio.to_thread(d.daemon.suppressions.get, "nouser@dest.test")
        assert entry is not None and entry.kind == "hard_bounce" and entry.source == "dsn"
        assert entry.queue_id == qid  # the VERP token named our message
        # Forged token: ignored, never trusted.
        t = await SmtpTalk.connect(d.port("relay"), source="127.0.0.2")
        await t.ehlo("mx.dest.test")
        await t.cmd("MAIL FROM:<>")
        code, _ = await t.cmd("RCPT TO:<bounces+zzzzzzzzzzzzzzzzzz@bounces.test.example>")
        await t.close()
        assert code in (250, 550)
    finally:
        await sink.stop()


async def test_servfail_defers_then_delivers(start_daemon, client_tls) -> None:
    import dns.rcode
    sink = await Sink().start()
    try:
        with DnsServer() as dns_srv:
            dns_srv.set_rcode("flaky.test.", dns.rcode.SERVFAIL)
            d = await start_daemon({"routes": [], "dns": {"nameservers": [f"127.0.0.1:{dns_srv.port}"],
                                                          "timeout": "2s"},
                                    "delivery": {"port": sink.port, "retry_initial": "1s", "retry_max": "1s"}})
            qid = await _submit(d.port("submission"), client_tls, ["a@flaky.test"])
            await _wait_states(d, qid, {"a@flaky.test": "deferred"})
            assert "4.4.3" in (await d.spool.recipient_outcomes(qid))["a@flaky.test"][1]
            assert sink.messages == []
            dns_srv.set_rcode("flaky.test.", None)  # the domain's DNS recovers
            dns_srv.add("flaky.test.", "MX", "10 mx.flaky.test.")
            dns_srv.add("mx.flaky.test.", "A", "127.0.0.1")
            await _wait_states(d, qid, {"a@flaky.test": "delivered"})
            assert len(sink.messages) == 1
    finally:
        await sink.stop()


async def test_delay_warning_sent_once(start_daemon, client_tls) -> None:
    sink = await Sink().start()
    try:
        sink.rcpt_replies["slow@dest.test"] = "451 4.4.1 try later"
        d = await start_daemon(_route(sink, delay_warning="1s"))
        qid = await _submit(d.port("submission"), client_tls, ["slow@dest.test"])
        await sink.wait_for(1)
        await asyncio.sleep(3)  # several more retries: still one warning
        warnings = [m for m in sink.messages if m.mail_from in ("", "<>")]
        assert len(warnings) == 1 and warnings[0].rcpts == ["app@example.com"]
        raw = warnings[0].data.decode()
        assert "Action: delayed" in raw and "Final-Recipient: rfc822; slow@dest.test" in raw
        assert (await _states(d, qid)) == {"slow@dest.test": "deferred"}  # still being retried
    finally:
        await sink.stop()
