"""The ``smtp.session`` log line of a client that leaves right after its final dot is written once
the commit has ended, so it counts the message (it used to say ``messages: 0`` beside the
message's own ``message.accepted``). The commit is slowed down to make the order certain. In-process
daemon, under asyncio's loop and under uvloop (this folder's conftest.py)."""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import struct
from collections.abc import Awaitable
from typing import Any

import pytest
import structlog

from tests.conftest import TEST_PASSWORD

pytestmark = pytest.mark.timeout(60)

MESSAGE = (b"EHLO client.test.example\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<someone@example.net>\r\n"
           b"DATA\r\nFrom: app@example.com\r\nSubject: t\r\n\r\nhello\r\n.\r\n")


@pytest.mark.parametrize("listener", ["relay", "submissions"])
async def test_a_client_that_resets_after_the_dot_is_counted_in_its_session_line(
        start_daemon: Any, client_tls: ssl.SSLContext, listener: str) -> None:
    rd = await start_daemon()
    spool = rd.daemon.spool
    start_commit = spool.start_commit

    def slow_commit(msg: Any) -> Awaitable[None]:
        pending = start_commit(msg)

        async def later() -> None:
            await pending
            await asyncio.sleep(0.5)
        return later()

    spool.start_commit = slow_commit
    with structlog.testing.capture_logs() as logs:
        tls = client_tls if listener == "submissions" else None
        _reader, writer = await asyncio.open_connection("127.0.0.1", rd.port(listener), ssl=tls)
        auth = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0" + TEST_PASSWORD.encode()) + b"\r\n"
        writer.write(MESSAGE.replace(b"\r\nMAIL", b"\r\n" + auth + b"MAIL", 1) if tls else MESSAGE)
        await writer.drain()
        await asyncio.sleep(0.2)  # the dot has arrived; the commit is under way
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset
        for _ in range(300):
            if any(e["event"] == "smtp.session" for e in logs):
                break
            await asyncio.sleep(0.01)
    accepted = [e for e in logs if e["event"] == "message.accepted"]
    (session,) = [e for e in logs if e["event"] == "smtp.session"]
    assert len(accepted) == 1 and session["messages"] == 1, session
    assert logs.index(accepted[0]) < logs.index(session)
