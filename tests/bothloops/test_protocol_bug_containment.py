"""A bug in the SMTP protocol state machine (an exception from one of its steps) must not leave the
connection open with no timer and its slot taken, nor lose the reply it had already produced: the
edge (mailrelayd/smtp/connection.py) sends what the step answered, then 421, and drops the
connection. The bug is simulated by a command handler that raises, in an in-process daemon, under
asyncio's loop and under uvloop (this folder's conftest.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mailrelayd.smtp import protocol
from mailrelayd.smtp.protocol import ServerProtocol

pytestmark = pytest.mark.timeout(60)

MESSAGE = (b"EHLO client.test.example\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<someone@example.net>\r\n"
           b"DATA\r\nFrom: app@example.com\r\nSubject: t\r\n\r\nhello\r\n.\r\n")


class Boom(Exception):
    pass


def _raise(self: ServerProtocol, arg: str) -> None:
    raise Boom("a bug")


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 10)  # until the server closes


async def _sessions(rd: Any) -> int:
    return sum(len(lst.sessions) for lst in rd.daemon.listeners)


async def test_a_step_that_raises_answers_421_and_frees_the_slot(start_daemon: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rd = await start_daemon()
    monkeypatch.setitem(protocol._COMMANDS, "NOOP", _raise)
    reader, writer = await asyncio.open_connection("127.0.0.1", rd.port("relay"))
    writer.write(MESSAGE + b"NOOP\r\nQUIT\r\n")  # the bug strikes behind the message's commit
    got = await _read_all(reader)
    writer.close()
    lines = got.decode().split("\r\n")
    queued = [x for x in lines if x.startswith("250 2.0.0 Ok: queued as ")]
    assert len(queued) == 1, got  # the accepted message's reply was not lost
    assert lines[-2] == "421 4.3.0 Internal error, closing connection", got
    assert "221" not in got.decode()
    for _ in range(200):
        if await _sessions(rd) == 0:
            break
        await asyncio.sleep(0.02)
    assert await _sessions(rd) == 0
    # The daemon still serves.
    monkeypatch.undo()
    reader, writer = await asyncio.open_connection("127.0.0.1", rd.port("relay"))
    writer.write(b"NOOP\r\nQUIT\r\n")
    got = await _read_all(reader)
    writer.close()
    assert b"250 2.0.0 Ok\r\n221" in got


async def test_a_step_that_raises_before_anything_is_answered(start_daemon: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    rd = await start_daemon()
    monkeypatch.setitem(protocol._COMMANDS, "HELP", _raise)
    reader, writer = await asyncio.open_connection("127.0.0.1", rd.port("relay"))
    assert (await reader.readline()).startswith(b"220 ")
    writer.write(b"HELP\r\n")
    got = await _read_all(reader)
    writer.close()
    assert got == b"421 4.3.0 Internal error, closing connection\r\n"
