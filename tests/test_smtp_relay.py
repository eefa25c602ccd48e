"""The relay/MX listener: mail for our own domains from anyone, relaying only for trusted
networks (or authenticated clients), and the classic open-relay tricks."""

from __future__ import annotations

import asyncio

import pytest

from mailrelayd import metrics
from tests.conftest import TEST_PASSWORD
from tests.support.smtptalk import SmtpTalk

UNTRUSTED = "127.0.0.2"  # the test config trusts only 127.0.0.1/32


async def _untrusted(port: int) -> SmtpTalk:
    t = await SmtpTalk.connect(port, source=UNTRUSTED)
    assert (await t.ehlo())[0] == 250
    assert (await t.cmd("MAIL FROM:<someone@elsewhere.example>"))[0] == 250
    return t


@pytest.mark.parametrize("rcpt", [
    "victim@other.example",
    "user%other.example@other2.example",
    "user%bounces.test.example@other.example",          # percent hack toward us: still foreign
    "@bounces.test.example:user@other.example",          # source route through us
    "@bounces.test.example,@a.example:user@other.example",
    '"user@bounces.test.example"@other.example',          # quoted local part naming our domain
    "user@other.example.",                                # trailing dot
    "user@bounces.test.example.other.example",            # our domain as a prefix
    "user@OTHER.EXAMPLE",
])
async def test_open_relay_attempts_are_denied(start_daemon, rcpt: str) -> None:
    d = await start_daemon()
    t = await _untrusted(d.port("relay"))
    code, text = await t.cmd(f"RCPT TO:<{rcpt}>")
    assert (code, text) == (554, "5.7.1 Relaying denied")
    await t.close()


def _feedback_received() -> float:
    return sum(smp.value for fam in metrics.FEEDBACK_RECEIVED.collect() for smp in fam.samples
               if smp.name.endswith("_total"))


@pytest.mark.parametrize("rcpt", [
    "bounces+abc@bounces.test.example",
    "USER@BOUNCES.TEST.EXAMPLE",
    "user@bounces.test.example.",
    "user%other.example@bounces.test.example",  # accepted for us; % is never a routing hint
    '"user@other.example"@bounces.test.example',
])
async def test_mail_for_local_domains_accepted_from_anyone(start_daemon, rcpt: str) -> None:
    d = await start_daemon()
    t = await _untrusted(d.port("relay"))
    before = _feedback_received()
    assert (await t.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250
    assert (await t.cmd("DATA"))[0] == 354
    code, text = await t.cmd(b"From: MAILER-DAEMON@other.example\r\nSubject: bounce\r\n\r\nbody\r\n.")
    assert code == 250, text
    qid = text.rsplit(" ", 1)[1]
    # Local mail goes to the feedback pipeline, never out again: nothing here can be relayed. The
    # pipeline may already have processed it (then it has left the queue, and was counted there).
    rec = await d.spool.get(qid)
    if rec is not None:
        assert rec.queue == "feedback" and rec.recipients[0].domain == "bounces.test.example"
    for _ in range(500):
        if _feedback_received() > before:
            break
        await asyncio.sleep(0.02)
    assert _feedback_received() == before + 1
    await t.close()


async def test_address_literals_and_malformed(start_daemon) -> None:
    d = await start_daemon()
    t = await _untrusted(d.port("relay"))
    assert await t.cmd("RCPT TO:<user@[127.0.0.1]>") == (550, "5.1.2 Address literals are not accepted as recipients")
    code, text = await t.cmd("RCPT TO:<user@other.example@bounces.test.example>")
    assert code == 553 and text.startswith("5.1.3")
    code, _ = await t.cmd("RCPT TO:<>")
    assert code == 553
    code, _ = await t.cmd("RCPT TO:<user name@bounces.test.example>")
    assert code == 553
    await t.close()


async def test_trusted_network_may_relay(start_daemon) -> None:
    d = await start_daemon()
    t = await SmtpTalk.connect(d.port("relay"))  # from 127.0.0.1: trusted
    await t.ehlo()
    assert (await t.cmd("MAIL FROM:<app@example.com>"))[0] == 250
    assert (await t.cmd("RCPT TO:<customer@other.example>")) == (250, "2.1.5 Ok")
    await t.close()


async def test_relay_listener_with_auth_lets_users_relay(start_daemon, client_tls) -> None:
    d = await start_daemon({"listeners": [
        {"name": "relay", "address": "127.0.0.1:0", "mode": "relay", "tls": "starttls", "auth": True}]})
    t = await SmtpTalk.connect(d.port("relay"), source=UNTRUSTED)
    await t.ehlo()
    await t.starttls(client_tls)
    code, _ = await t.ehlo()
    assert code == 250
    import base64

    cred = base64.b64encode(b"\0alice\0" + TEST_PASSWORD.encode()).decode()
    assert (await t.cmd(f"AUTH PLAIN {cred}"))[0] == 235
    assert (await t.cmd("MAIL FROM:<app@example.com>"))[0] == 250
    assert (await t.cmd("RCPT TO:<customer@other.example>"))[0] == 250
    await t.close()


async def test_submission_port_never_accepts_unauthenticated_local_mail(start_daemon) -> None:
    """The bounce domain is reachable on the MX port only; submission always needs AUTH."""
    d = await start_daemon()
    t = await SmtpTalk.connect(d.port("submission"), source=UNTRUSTED)
    await t.ehlo()
    code, _ = await t.cmd("MAIL FROM:<x@other.example>")
    assert code == 530
    await t.close()
