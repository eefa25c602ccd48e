"""The asyncio edge of one inbound SMTP connection: sockets, timers and tasks around the pure
protocol (:mod:`mailrelayd.smtp.protocol`). Public asyncio APIs only.

What this layer decides, and why:

- **Timeouts abort.** ``transport.close()`` waits until queued replies are flushed, which a client
  that never reads can postpone for ever; a timeout therefore sends the 421 only if nothing is
  queued, and otherwise (and after a short grace in any case) calls ``transport.abort()``.
- **EOF by state.** A FIN between commands closes at once (a load balancer's health check or a port
  scanner frees its slot immediately). After the final dot, a half-closed client still gets the
  commit and its 250 (RFC 5321 allows the half-close; Postfix answers and queues). TLS has no
  half-close, so there the reply is dropped, but the commit still completes.
- **The commit is not the connection's.** A message handed to the intake is never cancelled by
  anything the connection does (the intake shields the commit and logs, counts and schedules it).
- **Backpressure.** While the protocol waits for a password check, the TLS handshake or a commit,
  and while the client does not read our replies, we stop reading from it.
- **TLS.** Implicit TLS has its own accept loop (:mod:`mailrelayd.smtp.tlsaccept`: it sees a
  failed handshake, with the peer, and reads a PROXY header before TLS); the connection is handed
  over here after the handshake. STARTTLS is ``loop.start_tls()``; reading is paused before the 220
  goes out, so no ClientHello byte can reach the plaintext side.
- **Pregreet** (``greet_delay``): the edge holds the 220 back on a timer; the protocol refuses a
  client that talks first.
- **PROXY protocol** (``proxy_protocol = true``): the header is read before anything else and the
  address in it is the client's for policy, limits, logs and Received.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from mailrelayd import metrics
from mailrelayd.config import Network
from mailrelayd.errors import Reply, SpoolError, reply_for
from mailrelayd.intake import Origin, accepted_reply
from mailrelayd.log import get_logger
from mailrelayd.smtp import headers as hdr
from mailrelayd.smtp.auth import username_for_log
from mailrelayd.smtp.protocol import (
    AuthRequest,
    Close,
    Event,
    MessageReceived,
    Phase,
    ServerProtocol,
    SessionFacts,
    StartTls,
)
from mailrelayd.smtp.proxyproto import ProxyHeaderError, ip_text, parse_header

if TYPE_CHECKING:
    from mailrelayd.smtp.listener import SmtpContext, SmtpListener

log = get_logger()

CLOSE_GRACE = 5.0  # seconds a closing connection may take to flush its last reply before it is aborted
PROXY_MAX = 16 + 4096
HANDSHAKE_BACKSTOP = 5.0  # the loop's own TLS handshake timeout fires this long after ours


def client_ip(peer: Any) -> str:
    ip = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
    try:
        return ip_text(ipaddress.ip_address(ip))
    except ValueError:  # "unknown", or a scoped link-local address: kept as the socket gave it
        return ip


def in_networks(ip: str, nets: Sequence[Network]) -> bool:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    return any(addr in net for net in nets)


def describe_tls(transport: asyncio.BaseTransport) -> str:
    """The TLS clause of the Received header (RFC 8314 §4.3 style)."""
    sslobj: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return "using TLS"
    cipher = sslobj.cipher()
    return f"using {sslobj.version()} with cipher {cipher[0]} ({cipher[2]}/{cipher[2]} bits)" if cipher \
        else f"using {sslobj.version()}"


class SmtpConnection(asyncio.Protocol):
    """The protocol object for one connection (created by :class:`SmtpListener`)."""

    def __init__(self, listener: SmtpListener) -> None:
        self.listener = listener
        self.ctx: SmtpContext = listener.context
        self.lcfg = listener.config
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.proto: ServerProtocol | None = None
        self.id = ""
        self.peer_ip = "unknown"
        self.end = "closed"
        self._log: Any = log
        self._started = time.monotonic()
        self._slot: str | None = None
        self._closed = False
        self._write_paused = False
        self._reading = True
        self._timer: asyncio.TimerHandle | None = None
        self._grace: asyncio.TimerHandle | None = None
        self._progress = -1
        self._proxy_buf: bytearray | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._greet_timer: asyncio.TimerHandle | None = None
        self._committing = False  # a message handed to the intake, its outcome not yet back
        self._log_when_committed = False

    # --- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's TLS transport is not an asyncio.Transport subclass, but has its interface.)
        self.transport = cast(asyncio.Transport, transport)
        self.peer_ip = client_ip(transport.get_extra_info("peername"))
        self.id = secrets.token_hex(6)
        if self.lcfg.proxy_protocol:
            nets = self.lcfg.proxy_networks
            if nets and not in_networks(self.peer_ip, nets):
                self._refuse_proxy("proxy_not_allowed")
                return
            self._proxy_buf = bytearray()
            self._timer = self.loop.call_later(self.ctx.cfg.limits.proxy_header_timeout, self._proxy_timeout)
            return
        self._begin(self.peer_ip)

    def data_received(self, data: bytes) -> None:
        if self._proxy_buf is not None:
            self._proxy_data(data)
            return
        proto = self.proto
        if proto is None or self._closed:
            return
        self._drive(proto.receive, data)

    def eof_received(self) -> bool | None:
        proto = self.proto
        if proto is None:
            return False  # refused, or still waiting for a PROXY header: just close
        self._drive(proto.receive_eof)
        if self.proto is None:
            return False
        # Keep the write side open for the reply a half-closed client is owed (TLS cannot half-close).
        return not proto.facts.tls and not self._closed_by_us()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if exc is not None and self.end == "closed":
            self.end = f"network_error: {type(exc).__name__}"
        for h in (self._timer, self._grace):
            if h is not None:
                h.cancel()
        if self._greet_timer is not None:
            self._greet_timer.cancel()
            self._greet_timer = None
            self._count_ungreeted()
        self.transport = None
        if self.proto is not None:
            self.proto.connection_lost()
        if self._slot is not None:
            self.listener.limiter.release(self._slot)
            self._slot = None
            self.listener.sessions.discard(self)
            if self._committing:  # the session line waits for the commit (its count of messages)
                self._log_when_committed = True
            else:
                self._log_session()

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its commands (the idle timer then runs out).
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # --- set-up ----------------------------------------------------------------------------
    def _begin(self, ip: str) -> None:
        transport = self.transport
        assert transport is not None
        self.peer_ip = ip
        self._log = log.bind(listener=self.lcfg.name, peer=ip, session=self.id)
        refusal = self.listener.limiter.acquire(ip)
        if refusal is not None:
            metrics.CONNECTIONS.labels(self.lcfg.name, refusal).inc()
            self.end = refusal
            transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
            self._close_transport()
            return
        self._slot = ip
        self.listener.sessions.add(self)
        settings, hooks = self.listener.protocol_parts()
        facts = SessionFacts(peer_ip=ip, trusted=self.ctx.policy.is_trusted(ip))
        if self.lcfg.tls == "implicit":
            facts.tls, facts.tls_desc = True, describe_tls(transport)
        self.proto = ServerProtocol(settings, hooks, facts)
        if self.lcfg.greet_delay > 0:
            self._greet_timer = self.loop.call_later(self.lcfg.greet_delay, self._greet)
            return
        metrics.CONNECTIONS.labels(self.lcfg.name, "accepted").inc()
        self._drive(self.proto.start)

    def _greet(self) -> None:
        """``greet_delay`` has passed in silence: the 220 goes out (the protocol refuses earlier talk)."""
        self._greet_timer = None
        proto = self.proto
        if proto is None or self._closed or proto.phase is not Phase.NEW:
            return
        metrics.CONNECTIONS.labels(self.lcfg.name, "accepted").inc()
        self._drive(proto.start)

    def _count_ungreeted(self) -> None:
        """A connection closed while its greeting was held back: one result in connections_total."""
        result = self.end if self.end in ("pregreet", "draining") else "accepted"
        metrics.CONNECTIONS.labels(self.lcfg.name, result).inc()
        if result == "pregreet":
            self._log.info("smtp.pregreet", greet_delay=self.lcfg.greet_delay)

    def _proxy_data(self, data: bytes) -> None:
        buf = self._proxy_buf
        assert buf is not None
        buf += data
        try:
            parsed = parse_header(buf)
        except ProxyHeaderError as e:
            self._refuse_proxy("proxy_invalid", str(e))
            return
        if parsed is None:
            if len(buf) > PROXY_MAX:
                self._refuse_proxy("proxy_invalid", "header too long")
            return
        info, used = parsed
        rest = bytes(buf[used:])
        self._proxy_buf = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._begin(info.source_ip or self.peer_ip)
        if rest and self.proto is not None and not self._closed:
            self._drive(self.proto.receive, rest)

    def _refuse_proxy(self, why: str, error: str | None = None) -> None:
        metrics.CONNECTIONS.labels(self.lcfg.name, why).inc()
        log.info("smtp.proxy_refused", listener=self.lcfg.name, peer=self.peer_ip, reason=why, error=error)
        self._proxy_buf = None
        if self.transport is not None:
            self.transport.abort()

    def _proxy_timeout(self) -> None:
        self._refuse_proxy("proxy_timeout")

    # --- driving the protocol ------------------------------------------------------------
    def _drive(self, step: Callable[..., list[Event]], *args: Any) -> None:
        """Run one protocol step and act on its events. A bug in the protocol must not leave the
        connection open with no timer and its slot taken: what the step had already answered (a
        message's 250 among it) still goes out, then 421 and the connection is dropped."""
        try:
            events = step(*args)
        except Exception:
            self._internal_error()
            return
        self._handle(events)

    def _internal_error(self) -> None:
        self._log.exception("smtp.internal_error")
        self.end = "internal_error"
        proto, t = self.proto, self.transport
        if t is None or t.is_closing():
            return
        try:
            out = proto.data_to_send() if proto is not None else b""
        except Exception:  # nothing more can be learnt from it
            out = b""
        t.write(out + b"421 4.3.0 Internal error, closing connection\r\n")
        self._close_transport()

    def _handle(self, events: list[Event]) -> None:
        proto = self.proto
        assert proto is not None
        out = proto.data_to_send()
        if out and self.transport is not None and not self._closed:
            self.transport.write(out)
        for ev in events:
            if isinstance(ev, MessageReceived):
                self._message(ev)
            elif isinstance(ev, AuthRequest):
                self._spawn(self._auth(ev))
            elif isinstance(ev, StartTls):
                self._spawn(self._starttls())
            elif isinstance(ev, Close):
                self.end = ev.end
                self._close_transport()
        if self._closed or proto.phase is Phase.CLOSED:
            return
        if proto.phase is Phase.WAIT:
            if self._timer is not None:  # the work we wait for has its own bounds
                self._timer.cancel()
                self._timer = None
        elif self._timer is None or proto.progress != self._progress:
            self._progress = proto.progress
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(proto.current_timeout, self._on_timeout)
        self._update_reading()

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or self._closed or t.is_closing():
            return
        want = not self._write_paused and (self.proto is None or self.proto.phase is not Phase.WAIT)
        if want != self._reading:
            self._reading = want
            if want:
                t.resume_reading()
            else:
                t.pause_reading()

    def _on_timeout(self) -> None:
        self._timer = None
        t = self.transport
        if t is None or self.proto is None:
            return
        self.end = "timeout"
        if t.get_write_buffer_size() > 0:
            # The client is not reading: a 421 would never arrive, and close() would wait for it.
            t.abort()
            return
        self._drive(self.proto.timeout)

    def _close_transport(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.close()
        self._grace = self.loop.call_later(CLOSE_GRACE, self._abort_if_open)

    def _ensure_released(self) -> None:
        if not self._closed:
            self.connection_lost(None)

    def _closed_by_us(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def _abort_if_open(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def abort(self) -> None:
        """End of the shutdown drain: drop the connection now (a commit in flight still completes)."""
        if self.transport is not None:
            self.end = "aborted"
            self.transport.abort()

    def drain(self) -> None:
        """Shutdown: an idle session (between transactions) is told to come back later and closed."""
        proto = self.proto
        if proto is None or self._closed:
            return
        self._drive(proto.shutdown)

    # --- the work the protocol asks for --------------------------------------------------
    def _message(self, ev: MessageReceived) -> None:
        """Hand a complete message to the intake, now (not a loop turn later: see Intake.submit)."""
        proto = self.proto
        assert proto is not None
        f = proto.facts
        origin = Origin(listener=self.lcfg.name, peer_ip=f.peer_ip, helo=f.helo,
                        protocol=hdr.protocol_name(f.esmtp, f.tls, f.user is not None), tls=f.tls_desc,
                        user=f.user, session=self.id)
        self._committing = True
        try:
            self.ctx.intake.submit(origin, ev.mail_from, ev.recipients, ev.body, outbound=not all(ev.local),
                                   on_done=self._message_done)
        except Exception as e:
            self._message_done(None, e)

    def _message_done(self, qid: str | None, error: BaseException | None) -> None:
        self._committing = False
        try:
            self._message_outcome(qid, error)
        finally:
            if self._log_when_committed:
                self._log_when_committed = False
                self._log_session()

    def _message_outcome(self, qid: str | None, error: BaseException | None) -> None:
        reply: Reply
        if qid is not None:
            reply = accepted_reply(qid)
        else:
            reply = reply_for(error) if error is not None else reply_for(RuntimeError("no queue id"))
            if reply.code == 451 and not isinstance(error, SpoolError):
                self._log.error("smtp.accept_failed", error=f"{type(error).__name__}: {error}"[:300],
                                exc_info=error)
            else:
                self._log.warning("smtp.accept_failed", error=str(error), reply=str(reply))
        # Whatever happened to the connection meanwhile, the protocol learns the outcome (it frees
        # the memory the message held); the reply goes out only if there is still someone to read it.
        assert self.proto is not None
        try:
            events = self.proto.message_result(reply)
        except Exception:
            if not self._closed:
                self._internal_error()
            else:
                self._log.exception("smtp.internal_error")
            return
        if not self._closed:
            self._handle(events)

    async def _auth(self, ev: AuthRequest) -> None:
        proto = self.proto
        assert proto is not None
        ctx = self.ctx
        user = None
        ip = proto.facts.peer_ip
        # One check per IP at a time, each after a look at the lockout: guesses sent on many
        # connections at once would otherwise all be checked before the first failure counted.
        async with ctx.throttle.serial.hold(ip):
            if self._closed:  # left while waiting its turn: no password check for nobody
                return
            if ctx.throttle.is_locked(ip):
                metrics.AUTH_THROTTLED.labels(self.lcfg.name).inc()
                self._log.info("smtp.auth_throttled")
                if not self._closed:
                    self._drive(proto.auth_throttled)
                return
            try:
                if ctx.authenticator is not None:
                    user = await ctx.authenticator.verify(ev.username, ev.password)
            except Exception:
                self._log.exception("smtp.auth_error")
            if user is None:
                metrics.AUTH_FAILURES.labels(self.lcfg.name).inc()
                metrics.AUTH_ATTEMPTS.labels(self.lcfg.name, "failure").inc()
                ctx.throttle.failure(ip)
                # A mistyped password may sit in the username: never logged in clear (auth.username_for_log).
                known = ctx.authenticator.users if ctx.authenticator is not None else {}
                self._log.info("smtp.auth_failed", user=username_for_log(ev.username, known))
            else:
                metrics.AUTH_ATTEMPTS.labels(self.lcfg.name, "success").inc()
        if not self._closed:
            self._drive(proto.auth_result, user)

    async def _starttls(self) -> None:
        proto = self.proto
        t = self.transport
        assert proto is not None and t is not None
        ctx = self.ctx.tls_context
        timeout = self.ctx.cfg.limits.tls_handshake_timeout
        # Reading was paused synchronously when the StartTls event was raised (WAIT), before the 220
        # could reach the client, so nothing of the handshake was read as plaintext.
        try:
            if ctx is None:
                raise ssl.SSLError("no TLS context")
            # Our own deadline, so that a timeout is a TimeoutError (the loop's own reports it as
            # ConnectionAbortedError, like a reset); the loop's is only a backstop (see tlsaccept).
            async with asyncio.timeout(timeout):
                new = await self.loop.start_tls(t, self, ctx, server_side=True,
                                                ssl_handshake_timeout=timeout + HANDSHAKE_BACKSTOP)
        except Exception as e:
            self.end = "tls_handshake_timeout" if isinstance(e, TimeoutError) else "tls_failed"
            metrics.TLS_HANDSHAKE_FAILURES.labels(self.lcfg.name).inc()
            self._log.info("smtp.tls_failed", implicit=False, end=self.end,
                           error=f"{type(e).__name__}: {e}"[:200])
            if not t.is_closing():
                t.abort()
            # The TLS layer forwards connection_lost to us; should a loop not, free the slot anyway.
            self.loop.call_later(1.0, self._ensure_released)
            return
        if new is None or self._closed:
            return
        self.transport = cast(asyncio.Transport, new)
        self._reading = True  # start_tls resumes reading on the TLS transport
        self._drive(proto.tls_started, describe_tls(new))

    # --- logging -----------------------------------------------------------------------
    def _log_session(self) -> None:
        p = self.proto
        if p is None:
            return
        f = p.facts
        self._log.info("smtp.session", duration=round(time.monotonic() - self._started, 4), helo=f.helo,
                       tls=f.tls_desc, user=f.user.name if f.user else None, trusted=f.trusted,
                       messages=f.messages, commands=f.commands, errors=f.errors, end=self.end,
                       rejections=f.rejections or None)
