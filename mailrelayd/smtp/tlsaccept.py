"""Implicit TLS (port 465, RFC 8314 §3.3) with our own accept loop.

``loop.create_server(ssl=…)`` does the handshake inside the loop and tells the protocol nothing
when it fails; the connection then leaves no trace but a timeout guessed from outside, without the
peer's address. So implicit-TLS listeners accept themselves, with public APIs only: a non-blocking
listening socket, ``loop.sock_accept()``, and per connection a task that

1. reads the PROXY protocol header from the raw socket when the listener has ``proxy_protocol``
   (from ``proxy_networks`` only, within ``limits.proxy_header_timeout``), never a byte past it:
   the TLS layer must get the ClientHello from its first byte, and there is no public way to hand
   it bytes we read already. v2 is read exactly (16 fixed bytes, then the length they give); v1
   has no length, so after an 8-byte prefix it is read one byte at a time up to its CRLF (at most
   107 bytes, once per connection; a peek would need a readiness API the loops do not share);
2. takes the connection slot (``limits.max_connections`` / ``max_connections_per_ip``) for the
   client's address (the proxied one). Over the limit the connection is closed before the
   handshake: a 421 would need the very handshake the limit is there to save;
3. runs ``loop.connect_accepted_socket(ssl=…)`` under our own deadline (``asyncio.timeout``): a
   failure is counted and logged at once, with the peer, and classified by exception type
   (``TimeoutError``: the deadline passed; ``ssl.SSLError``/``OSError``: the handshake failed).
   The loop's own ``ssl_handshake_timeout`` is only a backstop a little later: it reports a
   timeout as ``ConnectionAbortedError``, indistinguishable by type from a reset.

On success the loop calls the protocol's ``connection_made``; the slot passes to the session there,
in the same callback (released here, taken again by the session), so it is held on every path and
freed on every path. Plaintext and STARTTLS listeners stay on ``loop.create_server`` (uvloop's
accept loop in C is faster, and they need none of this).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from mailrelayd import metrics
from mailrelayd.log import get_logger
from mailrelayd.smtp.connection import HANDSHAKE_BACKSTOP, SmtpConnection, client_ip, in_networks
from mailrelayd.smtp.proxyproto import V2_SIGNATURE, ProxyHeaderError, parse_header

if TYPE_CHECKING:
    from mailrelayd.smtp.listener import SmtpListener

log = get_logger()

ACCEPT_ERROR_PAUSE = 0.1  # after accept() fails (EMFILE, ENOBUFS): let connections close, then retry
_PREFIX = 8  # first read of a PROXY header: shorter than any v1 line (15+) and the v2 signature (12)


class _NoProxyHeader(Exception):
    """The PROXY header is missing, invalid or late, or the peer may not send one (``result`` says which)."""

    def __init__(self, result: str, error: str | None = None) -> None:
        super().__init__(result)
        self.result = result
        self.error = error


class _HandedOver(SmtpConnection):
    """A session whose client address the accept loop already knows (the PROXY header was read
    before TLS); ``on_made`` hands the accept loop's connection slot over to it."""

    def __init__(self, listener: SmtpListener, ip: str, on_made: Callable[[], None]) -> None:
        super().__init__(listener)
        self._client = ip
        self._on_made = on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._on_made()
        # (uvloop's TLS transport is not an asyncio.Transport subclass, but has its interface.)
        self.transport = cast(asyncio.Transport, transport)
        self.id = secrets.token_hex(6)
        self._begin(self._client)


class ImplicitTlsServer:
    """The listening socket and accept loop of one implicit-TLS listener."""

    def __init__(self, listener: SmtpListener) -> None:
        self.listener = listener
        self.loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()  # connections before or in their handshake

    async def start(self, host: str, port: int, family: socket.AddressFamily) -> None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as create_server: an IPv6 address means IPv6 only
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._accepting = self.loop.create_task(self._accept_loop(sock), name=f"accept-{self.listener.name}")

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,) if self._sock is not None else ()

    def is_serving(self) -> bool:
        return self._accepting is not None and not self._accepting.done()

    def close(self) -> None:
        """Stop accepting and close the listening socket; connections still in their handshake are
        dropped (counted ``draining``); sessions already handed over carry on."""
        if self._accepting is not None:
            self._accepting.cancel()
        for task in list(self._pending):
            task.cancel()
        if self._sock is not None:
            # The cancelled sock_accept stops watching the socket before it is closed (next turn).
            sock, self._sock = self._sock, None
            self.loop.call_soon(sock.close)

    async def _accept_loop(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, addr = await self.loop.sock_accept(sock)
            except (ConnectionAbortedError, InterruptedError):
                continue  # the client gave up while queued (ECONNABORTED): nothing to count
            except OSError as e:
                if sock.fileno() < 0:
                    return
                # Out of descriptors or buffers: keep the listener alive, as asyncio's own server does.
                log.error("listener.accept_failed", listener=self.listener.name, error=f"{type(e).__name__}: {e}")
                await asyncio.sleep(ACCEPT_ERROR_PAUSE)
                continue
            conn.setblocking(False)
            task = self.loop.create_task(self._connection(conn, addr))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _connection(self, conn: socket.socket, addr: Any) -> None:
        lst = self.listener
        name = lst.name
        ip = client_ip(addr)
        slot: list[str] = []  # the address whose slot this task holds (empty: none, or handed over)
        owned = True  # we, not a transport, close the socket
        try:
            if lst.config.proxy_protocol:
                try:
                    ip = await self._proxy_header(conn, ip)
                except _NoProxyHeader as e:
                    if e.result:
                        metrics.CONNECTIONS.labels(name, e.result).inc()
                        log.info("smtp.proxy_refused", listener=name, peer=ip, reason=e.result, error=e.error)
                    return
            refusal = lst.limiter.acquire(ip)
            if refusal is not None:
                metrics.CONNECTIONS.labels(name, refusal).inc()
                log.info("smtp.connection_refused", listener=name, peer=ip, reason=refusal, implicit=True)
                return
            slot.append(ip)

            def handed_over() -> None:
                # The session takes its own slot for ip in the same callback (SmtpConnection._begin).
                lst.limiter.release(slot.pop())

            ctx = lst.context
            timeout = ctx.cfg.limits.tls_handshake_timeout
            tls = ctx.tls_context
            if tls is None:  # (not reached: the config requires [tls] for an implicit-TLS listener)
                self._tls_failed(ip, "tls_failed", ssl.SSLError("no TLS context"), timeout)
                return
            owned = False
            try:
                async with asyncio.timeout(timeout):
                    await self.loop.connect_accepted_socket(lambda: _HandedOver(lst, ip, handed_over), conn,
                                                            ssl=tls, ssl_handshake_timeout=timeout + HANDSHAKE_BACKSTOP)
                return
            except TimeoutError as e:
                if not slot:
                    return  # the handshake completed as the deadline passed: the session owns it now
                self._tls_failed(ip, "tls_handshake_timeout", e, timeout)
            except (ssl.SSLError, OSError) as e:  # ConnectionError is an OSError
                self._tls_failed(ip, "tls_failed", e, timeout)
        except asyncio.CancelledError:
            metrics.CONNECTIONS.labels(name, "draining").inc()  # the listener stopped (shutdown)
            raise
        except Exception as e:  # a bug, not a client: logged with its traceback; the connection is closed
            log.exception("smtp.accept_error", listener=name, peer=ip, error=f"{type(e).__name__}: {e}"[:200])
        finally:
            if slot:
                lst.limiter.release(slot.pop())
            if owned:
                conn.close()

    def _tls_failed(self, ip: str, end: str, e: BaseException, timeout: float) -> None:
        name = self.listener.name
        metrics.TLS_HANDSHAKE_FAILURES.labels(name).inc()
        metrics.CONNECTIONS.labels(name, "tls_failed").inc()
        error = f"no TLS handshake within {timeout:g}s" if end == "tls_handshake_timeout" \
            else f"{type(e).__name__}: {e}"[:200]
        log.info("smtp.tls_failed", listener=name, peer=ip, implicit=True, end=end, error=error)

    async def _proxy_header(self, conn: socket.socket, peer: str) -> str:
        """The client's address from the PROXY header at the start of ``conn`` (the connection's own
        for LOCAL/UNKNOWN), read without consuming a byte after it."""
        cfg = self.listener.config
        if cfg.proxy_networks and not in_networks(peer, cfg.proxy_networks):
            raise _NoProxyHeader("proxy_not_allowed")
        try:
            async with asyncio.timeout(self.listener.context.cfg.limits.proxy_header_timeout):
                buf = await self._recv_exactly(conn, _PREFIX)
                parsed = parse_header(buf)  # raises unless it can be the start of a header
                if buf == V2_SIGNATURE[:_PREFIX]:
                    buf += await self._recv_exactly(conn, 16 - _PREFIX)  # signature, version, family, length
                    parsed = parse_header(buf)  # checks the version and the length limit
                    (length,) = struct.unpack("!H", buf[14:16])
                    buf += await self._recv_exactly(conn, length)
                    parsed = parse_header(buf)
                else:
                    while parsed is None:  # v1: up to the CRLF (parse_header caps the line length)
                        buf += await self._recv_exactly(conn, 1)
                        parsed = parse_header(buf)
        except TimeoutError:
            raise _NoProxyHeader("proxy_timeout") from None
        except ProxyHeaderError as e:
            raise _NoProxyHeader("proxy_invalid", str(e)) from None
        if parsed is None:  # (not reached: a complete v2 header always parses or raises)
            raise _NoProxyHeader("proxy_invalid", "incomplete header")
        info, _ = parsed
        return info.source_ip or peer

    async def _recv_exactly(self, conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                chunk = await self.loop.sock_recv(conn, n - len(buf))
            except OSError:
                chunk = b""
            if not chunk:
                # The client left (or reset) before a complete header: closed without a word, as
                # the plaintext listeners do (a TCP health check of the proxy itself).
                raise _NoProxyHeader("")
            buf += chunk
        return buf

