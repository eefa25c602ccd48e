"""Submission (587 STARTTLS + AUTH, 465 implicit TLS) through the real listener with real clients."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import ssl
from email.message import EmailMessage

import aiosmtplib
import pytest

from mailrelayd import metrics
from tests.conftest import TEST_PASSWORD


def _msg(frm: str = "app@example.com", to: str = "someone@example.net", subject: str = "hello") -> EmailMessage:
    m = EmailMessage()
    m["From"] = frm
    m["To"] = to
    m["Subject"] = subject
    m.set_content("hello from the tests\n")
    return m


async def _client(port: int, tls: ssl.SSLContext, implicit: bool = False) -> aiosmtplib.SMTP:
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, use_tls=implicit, start_tls=False, tls_context=tls,
                        timeout=10)
    await c.connect()
    return c


async def test_starttls_auth_submit_and_spool(start_daemon, client_tls) -> None:
    d = await start_daemon()
    c = await _client(d.port("submission"), client_tls)
    _code, ehlo = await c.ehlo()
    assert "STARTTLS" in ehlo and "AUTH" not in ehlo  # AUTH only after TLS
    await c.starttls()
    await c.ehlo()
    assert "PLAIN" in c.esmtp_extensions["auth"] and "LOGIN" in c.esmtp_extensions["auth"]
    assert c.esmtp_extensions["size"] == str(25 * 1024 * 1024)
    for ext in ("8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes"):
        assert ext in c.esmtp_extensions
    assert "starttls" not in c.esmtp_extensions
    await c.login("alice", TEST_PASSWORD)
    errors, reply = await c.send_message(_msg())
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as ")
    qid = reply.rsplit(" ", 1)[1]
    await c.quit()
    rec = await d.spool.get(qid)
    assert rec is not None and [r.address for r in rec.recipients] == ["someone@example.net"]
    body = await d.spool.body(qid)
    assert body is not None
    head = body.split(b"\r\n\r\n", 1)[0].decode()
    assert f"with ESMTPSA id {qid}" in head
    assert "using TLSv1." in head  # Received names the TLS version and cipher
    assert "alice" not in head  # the user name is not disclosed unless configured
    assert "Message-ID: <" in head and "\r\nDate: " in head


async def test_implicit_tls_and_auth_login(start_daemon, client_tls) -> None:
    d = await start_daemon()
    c = await _client(d.port("submissions"), client_tls, implicit=True)
    await c.ehlo()
    assert "starttls" not in c.esmtp_extensions
    await c.auth_login("bob", TEST_PASSWORD)
    _errors, reply = await c.send_message(_msg(frm="bob@example.org"))
    assert reply.startswith("2.0.0 Ok: queued as")
    await c.quit()


async def test_plaintext_on_implicit_port_gets_clean_close(start_daemon) -> None:
    # The loop does the implicit-TLS handshake and tells the protocol nothing of a failure: the
    # failure is counted when the handshake timeout has passed (mailrelayd/smtp/connection.py).
    d = await start_daemon({"limits": {"tls_handshake_timeout": "1s"}})
    before = metrics.TLS_HANDSHAKE_FAILURES.labels("submissions")._value.get()
    r, w = await asyncio.open_connection("127.0.0.1", d.port("submissions"))
    w.write(b"EHLO plaintext.example\r\n")
    await w.drain()
    data = await asyncio.wait_for(r.read(), 10)  # the server closes; no hang
    assert b"250" not in data
    w.close()
    for _ in range(100):
        if metrics.TLS_HANDSHAKE_FAILURES.labels("submissions")._value.get() == before + 1:
            break
        await asyncio.sleep(0.1)
    assert metrics.TLS_HANDSHAKE_FAILURES.labels("submissions")._value.get() == before + 1


async def test_auth_refused_before_starttls_and_mail_before_auth(start_daemon) -> None:
    d = await start_daemon()
    c = await _client(d.port("submission"), ssl.create_default_context())
    await c.ehlo()
    code, text = await c.execute_command(b"AUTH", b"PLAIN", base64.b64encode(b"\0alice\0" + TEST_PASSWORD.encode()))
    assert (code, text) == (530, "5.7.0 Must issue a STARTTLS command first")
    code, text = await c.execute_command(b"MAIL", b"FROM:<app@example.com>")
    assert code == 530 and text.startswith("5.7.0")
    await c.quit()


async def test_mail_before_auth_after_tls(start_daemon, client_tls) -> None:
    d = await start_daemon()
    c = await _client(d.port("submission"), client_tls)
    await c.ehlo()
    await c.starttls()
    await c.ehlo()
    code, text = await c.execute_command(b"MAIL", b"FROM:<app@example.com>")
    assert (code, text) == (530, "5.7.0 Authentication required")
    await c.quit()


async def test_wrong_password_then_throttle(start_daemon, client_tls) -> None:
    d = await start_daemon()  # auth.max_failures = 3 in the test config
    c = await _client(d.port("submissions"), client_tls, implicit=True)
    await c.ehlo()
    for _ in range(3):
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as e:
            await c.auth_plain("alice", "wrong")  # login() would try several mechanisms
        assert e.value.code == 535 and e.value.message.startswith("5.7.8")
    # Locked out now, even with the right password, from this IP.
    code, text = await c.execute_command(b"AUTH", b"PLAIN", base64.b64encode(b"\0alice\0" + TEST_PASSWORD.encode()))
    assert code == 421 and text.startswith("4.7.0")
    assert metrics.AUTH_FAILURES.labels("submissions")._value.get() >= 3


def _plain(user: str, password: str) -> bytes:
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


async def test_guesses_sent_on_many_connections_at_once_are_not_all_checked(start_daemon, client_tls) -> None:
    """Checks in progress count as failures until they end: ten guesses sent at once on ten
    connections get at most auth.max_failures (3) answers of 535; the rest are refused unchecked."""
    d = await start_daemon()
    clients = [await _client(d.port("submissions"), client_tls, implicit=True) for _ in range(10)]
    for c in clients:
        await c.ehlo()
    replies = await asyncio.gather(*(c.execute_command(b"AUTH", b"PLAIN", _plain("alice", f"guess{i}"))
                                     for i, c in enumerate(clients)))
    codes = sorted(code for code, _ in replies)
    assert codes.count(535) == 3 and codes.count(421) == 7, replies
    for c in clients:
        c.close()


async def test_logins_on_many_connections_at_once_all_succeed(start_daemon, client_tls) -> None:
    """An application opening ten connections at once from one IP: its checks wait their turn, and
    none is refused (auth.max_failures is 3 here)."""
    d = await start_daemon()
    clients = [await _client(d.port("submissions"), client_tls, implicit=True) for _ in range(10)]
    for c in clients:
        await c.ehlo()
    replies = await asyncio.gather(*(c.execute_command(b"AUTH", b"PLAIN", _plain("alice", TEST_PASSWORD))
                                     for c in clients))
    assert [code for code, _ in replies] == [235] * 10, replies
    for c in clients:
        c.close()


async def test_a_success_does_not_clear_the_failures_of_the_ip(start_daemon, client_tls) -> None:
    """Otherwise one account's password buys unlimited guesses at the others' from one IP."""
    d = await start_daemon()

    async def attempt(user: str, password: str) -> int:
        c = await _client(d.port("submissions"), client_tls, implicit=True)
        await c.ehlo()
        code, _ = await c.execute_command(b"AUTH", b"PLAIN", _plain(user, password))
        c.close()
        return code

    assert [await attempt("alice", "wrong") for _ in range(2)] == [535, 535]
    assert await attempt("bob", TEST_PASSWORD) == 235
    assert await attempt("alice", "wrong") == 535  # the third failure within the window
    assert await attempt("alice", TEST_PASSWORD) == 421


async def test_unknown_user_fails_like_wrong_password(start_daemon, client_tls) -> None:
    d = await start_daemon()
    c = await _client(d.port("submissions"), client_tls, implicit=True)
    await c.ehlo()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as e:
        await c.login("mallory", TEST_PASSWORD)
    assert e.value.code == 535
    await c.quit()


async def test_auth_plain_as_another_identity_is_refused(start_daemon, client_tls) -> None:
    """RFC 4616 §2: PLAIN carries an authorization identity. bob's own password with "act as
    alice" must not log bob in as alice, nor as bob: it fails like a wrong password."""
    d = await start_daemon()
    c = await _client(d.port("submissions"), client_tls, implicit=True)
    await c.ehlo()
    for authzid in (b"alice", b"alice@example.com"):
        token = base64.b64encode(authzid + b"\0bob\0" + TEST_PASSWORD.encode())
        code, text = await c.execute_command(b"AUTH", b"PLAIN", token)
        assert (code, text[:5]) == (535, "5.7.8"), text
    code, _ = await c.execute_command(b"MAIL", b"FROM:<alice@example.com>")
    assert code == 530  # still not authenticated
    # The same identity twice is no impersonation (some clients send it).
    token = base64.b64encode(b"bob\0bob\0" + TEST_PASSWORD.encode())
    assert (await c.execute_command(b"AUTH", b"PLAIN", token))[0] == 235
    code, _ = await c.execute_command(b"MAIL", b"FROM:<alice@example.com>")
    assert code == 550
    await c.quit()


async def test_sender_spoofing_refused(start_daemon, client_tls) -> None:
    d = await start_daemon()
    c = await _client(d.port("submissions"), client_tls, implicit=True)
    await c.ehlo()
    await c.login("bob", TEST_PASSWORD)  # bob may send only as bob@example.org
    code, text = await c.execute_command(b"MAIL", b"FROM:<ceo@example.com>")
    assert (code, text[:5]) == (550, "5.7.1")
    # Envelope OK but header From belongs to someone else.
    await c.mail("bob@example.org")
    await c.rcpt("x@example.net")
    with pytest.raises(aiosmtplib.SMTPDataError) as e:
        await c.data(_msg(frm="alice@example.com").as_bytes())
    assert e.value.code == 550 and e.value.message.startswith("5.7.1 From header")
    # Two From fields (the DKIM replay trick) are refused too.
    await c.mail("bob@example.org")
    await c.rcpt("x@example.net")
    raw = b"From: bob@example.org\r\nFrom: alice@example.com\r\nSubject: x\r\n\r\nbody\r\n"
    with pytest.raises(aiosmtplib.SMTPDataError) as e:
        await c.data(raw)
    assert e.value.code == 550
    await c.quit()


async def test_auth_plain_with_smtplib_and_missing_headers_added(start_daemon) -> None:
    d = await start_daemon()
    port = d.port("submissions")

    def send() -> str:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=10) as s:
            s.login("alice", TEST_PASSWORD)
            s.mail("a@example.com")
            s.rcpt("b@example.net")
            code, msg = s.data(b"Subject: no from, no date, no id\r\n\r\nbody\r\n")
            assert code == 250
            return msg.decode().rsplit(" ", 1)[1]

    qid = await asyncio.to_thread(send)
    body = await d.spool.body(qid)
    assert body is not None
    head = body.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nFrom: <a@example.com>\r\n" in head
    assert b"\r\nMessage-ID: <" in head and b"\r\nDate: " in head


async def test_auth_abort_and_garbage_base64(start_daemon, client_tls) -> None:
    d = await start_daemon()
    c = await _client(d.port("submissions"), client_tls, implicit=True)
    await c.ehlo()
    code, text = await c.execute_command(b"AUTH", b"PLAIN", b"%%%notbase64")
    assert code == 501 and text.startswith("5.5.2")
    code, _ = await c.execute_command(b"AUTH", b"LOGIN")
    assert code == 334
    code, text = await c.execute_command(b"*")
    assert (code, text) == (501, "5.7.0 Authentication aborted")
    code, text = await c.execute_command(b"AUTH", b"CRAM-MD5")
    assert (code, text) == (504, "5.5.4 Unrecognized authentication type")
    await c.quit()


async def test_starttls_plaintext_injection_is_discarded(start_daemon, client_tls) -> None:
    """CVE-2011-0411: commands pipelined with STARTTLS must not run inside the TLS session."""
    d = await start_daemon({"relay": {"trusted_networks": ["127.0.0.1/32"]}})
    r, w = await asyncio.open_connection("127.0.0.1", d.port("relay"))
    await r.readuntil(b"\r\n")
    w.write(b"EHLO x.example\r\n")
    await w.drain()
    while not (await r.readuntil(b"\r\n")).startswith(b"250 "):
        pass
    w.write(b"STARTTLS\r\nRSET\r\n")
    await w.drain()
    assert (await r.readuntil(b"\r\n")).startswith(b"220 2.0.0")
    await w.start_tls(client_tls)
    w.write(b"NOOP\r\n")
    await w.drain()
    # The only reply is to our NOOP: the injected RSET was dropped with the plaintext buffer.
    line = await asyncio.wait_for(r.readuntil(b"\r\n"), 5)
    assert line.startswith(b"250 2.0.0")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(r.readuntil(b"\r\n"), 0.3)
    w.close()


async def test_suppressed_recipient_refused_at_rcpt(start_daemon, client_tls) -> None:
    d = await start_daemon()
    await asyncio.to_thread(d.daemon.suppressions.add, "gone@example.net", "test")
    c = await _client(d.port("submissions"), client_tls, implicit=True)
    await c.ehlo()
    await c.login("alice", TEST_PASSWORD)
    await c.mail("app@example.com")
    code, text = await c.execute_command(b"RCPT", b"TO:<gone@example.net>")
    assert code == 550 and text.startswith("5.7.1 Recipient suppressed")
    await c.quit()

