"""A scriptable SMTP server on loopback (aiosmtpd) standing in for remote MTAs in delivery tests.

    sink = Sink(tls=server_ctx)                      # STARTTLS offered when tls is given
    Sink(pipelining=False)                           # no PIPELINING (RFC 2920): one command at a time
    await sink.start()                               # 127.0.0.1, ephemeral port -> sink.port
    sink.rcpt_replies["nobody@x.example"] = "550 5.1.1 No such user"
    sink.data_action = "drop"                        # or "hang", "ok"
    ...
    sink.messages -> [Received(mail_from, rcpts, data, tls, session_id)]
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Received:
    mail_from: str
    rcpts: list[str]
    data: bytes
    tls: bool
    session_id: int
    mail_options: list[str]
    peer: str = ""
    helo: str = ""
    at: float = 0.0


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        self.sink.mail_seen.append(time.monotonic())
        n = self.sink.mails_by_session[id(session)] = self.sink.mails_by_session.get(id(session), 0) + 1
        if self.sink.mail_drop_after and n > self.sink.mail_drop_after:  # gone without a word
            assert server.transport is not None
            server.transport.abort()
            return "421 never sent"
        if self.sink.mail_421_after and n > self.sink.mail_421_after:
            assert server.transport is not None
            asyncio.get_running_loop().call_later(0.05, server.transport.close)
            return "421 4.7.0 Too many messages in this connection"
        if self.sink.mail_reply:
            return self.sink.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        self.sink.rcpt_seen.append(address)
        reply = self.sink.rcpt_replies.get(address.lower())
        if reply:
            return reply
        if self.sink.max_rcpts and len(envelope.rcpt_tos) >= self.sink.max_rcpts:
            return self.sink.too_many_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        action = self.sink.data_action
        if self.sink.data_delay:
            await asyncio.sleep(self.sink.data_delay)
        if action == "hang":
            self.sink.hung.set()
            await asyncio.sleep(3600)
        if action == "drop":
            assert server.transport is not None
            server.transport.abort()
            self.sink.dropped += 1
            return "451 dropped"
        self.sink.messages.append(Received(
            envelope.mail_from or "", list(envelope.rcpt_tos), bytes(envelope.original_content or b""),
            session.ssl is not None, id(session), list(envelope.mail_options),
            str(session.peer[0]) if isinstance(session.peer, tuple) else str(session.peer), session.host_name or "",
            time.monotonic()))
        self.sink.received.set()
        return self.sink.data_reply

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.sink.pipelining:  # aiosmtpd reads commands line by line, so it can take a pipelined group
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.sink.rsets += 1
        return "250 OK"


class Sink:
    def __init__(self, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1", pipelining: bool = True) -> None:
        self.tls = tls
        self.pipelining = pipelining
        self.host = host
        self.port = 0
        self.messages: list[Received] = []
        self.rcpt_seen: list[str] = []
        self.mail_seen: list[float] = []  # time.monotonic() of every MAIL command
        self.rcpt_replies: dict[str, str] = {}
        self.mail_reply: str | None = None
        self.data_reply = "250 2.0.0 Ok: queued"
        self.data_action = "ok"
        self.data_delay = 0.0
        self.connections = 0
        self.dropped = 0
        self.rsets = 0
        self.mail_drop_after = 0  # drop the connection at MAIL number n+1 on a connection (0: never)
        self.mail_421_after = 0  # answer 421 to MAIL number n+1 on a connection (0: never)
        self.mails_by_session: dict[int, int] = {}
        self.max_rcpts = 0  # recipients per transaction (0: no limit); more get too_many_reply
        self.too_many_reply = "452 4.5.3 Too many recipients"
        self.size_limit = 33554432  # announced as "SIZE n" (RFC 1870); aiosmtpd refuses larger with 552
        self.received = asyncio.Event()
        self.hung = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._protocols: list[SMTP] = []

    def _factory(self) -> SMTP:
        self.connections += 1
        kw: dict[str, Any] = {"hostname": "sink.test.example", "ident": "sink", "enable_SMTPUTF8": True,
                              "decode_data": False, "data_size_limit": self.size_limit}
        if self.tls is not None:
            kw["tls_context"] = self.tls
        proto = SMTP(_Handler(self), **kw)
        self._protocols.append(proto)
        return proto

    async def start(self) -> Sink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for p in self._protocols:
                if p.transport is not None:
                    p.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def wait_for(self, n: int, timeout: float = 15.0) -> list[Received]:
        """Wait until at least ``n`` messages have arrived."""
        async def _wait() -> None:
            while len(self.messages) < n:
                self.received.clear()
                await self.received.wait()
        await asyncio.wait_for(_wait(), timeout)
        return self.messages
