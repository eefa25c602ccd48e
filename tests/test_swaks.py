"""The listeners driven by other people's clients: swaks (Perl) and the standard library's smtplib."""

from __future__ import annotations

import asyncio
import email.policy
import shutil
import smtplib
import ssl
from email.message import EmailMessage

import pytest

from tests.conftest import TEST_PASSWORD

SWAKS = shutil.which("swaks")
needs_swaks = pytest.mark.skipif(SWAKS is None, reason="swaks not installed (apt-get install -y swaks)")


async def _swaks(*args: str) -> tuple[int, str]:
    assert SWAKS is not None
    p = await asyncio.create_subprocess_exec(SWAKS, "--server", "127.0.0.1", "--timeout", "10", *args,
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(p.communicate(), 60)
    assert p.returncode is not None
    return p.returncode, out.decode("utf-8", "replace")


@needs_swaks
async def test_swaks_starttls_auth_submission(start_daemon) -> None:
    d = await start_daemon()
    code, out = await _swaks("--port", str(d.port("submission")), "--tls", "--auth", "PLAIN",
                             "--auth-user", "alice", "--auth-password", TEST_PASSWORD,
                             "--from", "app@example.com", "--to", "someone@example.net",
                             "--h-Subject", "from swaks")
    assert code == 0, out
    assert "<~  250 2.0.0 Ok: queued as " in out
    qid = out.split("queued as ", 1)[1].split()[0]
    assert await d.spool.get(qid) is not None


@needs_swaks
async def test_swaks_implicit_tls_auth_login(start_daemon) -> None:
    d = await start_daemon()
    code, out = await _swaks("--port", str(d.port("submissions")), "--tls-on-connect", "--auth", "LOGIN",
                             "--auth-user", "bob", "--auth-password", TEST_PASSWORD,
                             "--from", "bob@example.org", "--to", "someone@example.net")
    assert code == 0, out
    assert "250 2.0.0 Ok: queued as" in out


@needs_swaks
async def test_swaks_refusals(start_daemon) -> None:
    d = await start_daemon()
    # Before TLS, AUTH is not even advertised, so swaks never sends the password.
    code, out = await _swaks("--port", str(d.port("submission")), "--auth", "PLAIN", "--auth-user", "alice",
                             "--auth-password", TEST_PASSWORD, "--from", "app@example.com", "--to", "x@example.net")
    assert code != 0 and "Host did not advertise authentication" in out
    assert "AUTH PLAIN" not in out
    # Spoofing another user's domain.
    code, out = await _swaks("--port", str(d.port("submission")), "--tls", "--auth", "PLAIN",
                             "--auth-user", "bob", "--auth-password", TEST_PASSWORD,
                             "--from", "ceo@example.com", "--to", "x@example.net")
    assert code != 0 and "550 5.7.1" in out
    # Open-relay attempt from an untrusted address.
    code, out = await _swaks("--port", str(d.port("relay")), "--local-interface", "127.0.0.2",
                             "--from", "spammer@example.org", "--to", "victim@example.net")
    assert code != 0 and "554 5.7.1" in out


def _message(frm: str) -> EmailMessage:
    m = EmailMessage()
    m["From"] = frm
    m["To"] = "someone@example.net"
    m["Subject"] = "from smtplib"
    m.set_content("hello\n")
    return m


async def test_smtplib_bare_lf_is_refused_not_reinterpreted(start_daemon, client_tls: ssl.SSLContext) -> None:
    d = await start_daemon()

    def send() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", d.port("submission"), timeout=10) as s:
            s.starttls(context=client_tls)
            s.login("alice", TEST_PASSWORD)
            s.mail("app@example.com")
            s.rcpt("someone@example.net")
            try:
                return s.data(_message("app@example.com").as_bytes())  # bytes are sent as is: bare LF
            except smtplib.SMTPDataError as e:
                return e.smtp_code, e.smtp_error

    code, text = await asyncio.to_thread(send)
    assert code == 550 and text.startswith(b"5.6.0")


async def test_smtplib_implicit_tls_and_starttls(start_daemon, client_tls: ssl.SSLContext) -> None:
    d = await start_daemon()

    def implicit() -> dict:
        with smtplib.SMTP_SSL("127.0.0.1", d.port("submissions"), context=client_tls, timeout=10) as s:
            s.login("alice", TEST_PASSWORD)
            return s.send_message(_message("app@example.com"))

    def starttls() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", d.port("submission"), timeout=10) as s:
            s.starttls(context=client_tls)
            s.login("alice", TEST_PASSWORD)
            s.mail("app@example.com")
            s.rcpt("someone@example.net")
            return s.data(_message("app@example.com").as_bytes(policy=email.policy.SMTP))

    assert await asyncio.to_thread(implicit) == {}
    code, text = await asyncio.to_thread(starttls)
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
