"""Time limits aiohttp's server lacks: one for a request's head, one for a client that stops reading.

aiohttp reads a request's head for as long as the client takes (only its keep-alive timer, an hour by
default, ends a connection that never completes one), and a response to a client that never reads
waits forever. Each such connection holds a file descriptor and its buffers, so a few thousand slow
clients exhaust the daemon's descriptors. The SMTP listeners close such clients (``command_timeout``,
then ``transport.abort()``); :class:`HttpGuard` does it for the HTTP listeners.

It serves an aiohttp runner with ``loop.create_server()``: aiohttp documents ``runner.server`` as a
protocol factory for it. Each connection's protocol is a :class:`Guard` around the one aiohttp makes,
and :meth:`HttpGuard.middleware` tells the guard when a request starts and ends (public API only).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web

from mailrelayd.log import get_logger

log = get_logger()

HEADER_TIMEOUT = 30.0
"""How long a connection may go without starting a request: from the connection (after the TLS
handshake) or the previous response. A real client sends a request's head in one write, so this is
ample even for a slow link; it matches ``limits.tls_handshake_timeout``'s default, and clients (aiohttp,
Prometheus, curl) open a new connection when they find an idle one closed."""

WRITE_TIMEOUT = 60.0
"""How long writing may stay paused (the client takes none of what we send) before the connection is
aborted: nginx's ``send_timeout``. A slow client that keeps reading is never cut."""

_CLOSE_WAIT = 2.0  # Python 3.12+: Server.wait_closed() also waits for TLS handshakes still running


class Guard(asyncio.Protocol):
    """aiohttp's protocol for one connection, aborted when no request starts within
    ``header_timeout`` or writing stays paused for ``write_timeout``."""

    def __init__(self, inner: asyncio.Protocol, owner: HttpGuard) -> None:
        self.inner = inner
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.active = 0  # requests being handled: the body upload and the handler's work are theirs
        self.writing_paused = False
        self.aborted = False
        self._idle: asyncio.TimerHandle | None = None
        self._stalled: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol, delegated ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else None
        self.owner.register(self)
        self._arm_idle()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self.transport is not None:
            self.owner.unregister(self)
            self.transport = None
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.owner.closing:  # a stop is under way: a client that stops reading now is not waited for
            asyncio.get_running_loop().call_soon(self.abort, "shutdown")
        if self._stalled is None:
            self._stalled = self._call_later(self.owner.write_timeout, self._stall_expired)
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        if self.active == 0:  # the last response is still going out: its end restarts the clock
            self._arm_idle()
        self.inner.resume_writing()

    # --- requests (from HttpGuard.middleware) ---------------------------------------------
    def request_started(self) -> None:
        self.active += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def request_finished(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._arm_idle()

    def abort(self, reason: str) -> None:
        """Reset the connection: ``close()`` would wait for unsent data a non-reader never takes."""
        if self.transport is None or self.aborted:
            return
        self.aborted = True
        timeout = {"header_timeout": self.owner.header_timeout, "write_timeout": self.owner.write_timeout}
        # Who and why only: the request itself (path, headers, body) stays out of the log.
        log.info("http.connection_aborted", listener=self.owner.name, peer=self.peer, reason=reason,
                 timeout=timeout.get(reason), requests_active=self.active)
        self.transport.abort()

    # --- timers ---------------------------------------------------------------------------
    def _call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay, callback)

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self.transport is not None:
            self._idle = self._call_later(self.owner.header_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle = None
        if self.writing_paused:  # a client that does not read is the write timer's to judge
            return
        self.abort("header_timeout")

    def _stall_expired(self) -> None:
        self._stalled = None
        self.abort("write_timeout")

    def _cancel_timers(self) -> None:
        for timer in (self._idle, self._stalled):
            if timer is not None:
                timer.cancel()
        self._idle = self._stalled = None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpGuard:
    """One HTTP listener: an aiohttp runner served through a :class:`Guard` per connection.

    ``header_timeout`` and ``write_timeout`` are read when a timer starts, so a change applies to the
    next one. Add :meth:`middleware` to the application before ``runner.setup()``; stop with
    :meth:`close`, ``runner.cleanup()``, then :meth:`wait_closed`."""

    def __init__(self, name: str, *, header_timeout: float = HEADER_TIMEOUT,
                 write_timeout: float = WRITE_TIMEOUT) -> None:
        self.name = name
        self.header_timeout = header_timeout
        self.write_timeout = write_timeout
        self._guards: dict[asyncio.BaseTransport, Guard] = {}
        self._server: asyncio.Server | None = None
        self.closing = False

    @property
    def connections(self) -> list[Guard]:
        return list(self._guards.values())

    def register(self, guard: Guard) -> None:
        assert guard.transport is not None
        self._guards[guard.transport] = guard

    def unregister(self, guard: Guard) -> None:
        if guard.transport is not None:
            self._guards.pop(guard.transport, None)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Marks the request's connection busy from its head until the handler returns: reading the
        body (bounded by the handler, e.g. the API's ``limits.data_timeout``) and waiting for the spool
        are not idleness."""
        transport = request.transport
        guard = self._guards.get(transport) if transport is not None else None
        if guard is None:  # the connection is gone already
            return await handler(request)
        guard.request_started()
        try:
            return await handler(request)
        finally:
            guard.request_finished()

    async def start(self, runner: web.BaseRunner, host: str, port: int, *, tls: ssl.SSLContext | None = None,
                    tls_handshake_timeout: float | None = None) -> tuple[str, int]:
        """Listen on (host, port) for ``runner`` (after its ``setup()``); returns the bound address."""
        factory = runner.server
        if factory is None:
            raise RuntimeError("runner.setup() must come first")
        loop = asyncio.get_running_loop()

        def protocol() -> Guard:
            return Guard(factory(), self)

        if tls is None:  # (asyncio refuses a handshake timeout without TLS)
            self._server = await loop.create_server(protocol, host, port, reuse_address=True)
        else:
            self._server = await loop.create_server(protocol, host, port, reuse_address=True, ssl=tls,
                                                    ssl_handshake_timeout=tls_handshake_timeout)
        addr = self._server.sockets[0].getsockname()
        return str(addr[0]), int(addr[1])

    def close(self) -> None:
        """Stop accepting, and abort the connections with no request in a handler (idle, a head still
        coming, aiohttp lingering to drain an unread body) and those whose client is not reading:
        nothing graceful is left to do with them, and aiohttp's shutdown would wait its
        shutdown_timeout for them. A request being handled (a commit in flight) gets to finish; if its
        client then does not read the response, the connection is reset when writing pauses."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for guard in self.connections:
            if guard.writing_paused or guard.active == 0:
                guard.abort("shutdown")

    async def wait_closed(self) -> None:
        """After ``runner.cleanup()``: abort what is left (a transport closed with unsent data would
        wait for a reader that never comes), then wait for the server to close."""
        for guard in self.connections:
            guard.abort("shutdown")
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), _CLOSE_WAIT)
