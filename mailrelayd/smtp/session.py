"""One inbound SMTP connection: the protocol state machine (RFC 5321), built on aiosmtpd.

We subclass :class:`aiosmtpd.smtp.SMTP` for its connection plumbing (stream reader/writer
set-up, idle timer, connection teardown) and replace the command handlers, for three reasons:

- every reply carries an enhanced status code (RFC 2034/3463) and is counted;
- the hot paths are ours: envelope addresses are parsed by :mod:`mailrelayd.smtp.address`
  instead of the generic RFC 5322 parser, and DATA is read in one ``readuntil`` of the
  terminator instead of line by line (a profile of stock aiosmtpd put ~75% of its CPU there);
- DATA is checked for SMTP smuggling (bare CR/LF, CVE-2023-51764 family) before anything else.

aiosmtpd's own ``__init__`` introspects the handler and itself on every connection; ours
builds those tables once per class.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP as _AiosmtpdSMTP

from mailrelayd import metrics
from mailrelayd.errors import Reply, SpoolError, reply_for
from mailrelayd.intake import Origin, accepted_reply
from mailrelayd.log import get_logger
from mailrelayd.smtp import headers as hdr
from mailrelayd.smtp.address import AddressError, Mailbox, parse_command_path
from mailrelayd.smtp.policy import AUTH_REQUIRED, STARTTLS_FIRST, Facts
from mailrelayd.users import User

if TYPE_CHECKING:
    from mailrelayd.smtp.listener import SmtpContext, SmtpListener

log = get_logger()

_TERMINATOR = b"\r\n.\r\n"
_CRLF = b"\r\n"


@dataclass(slots=True)
class SessionState:
    """Facts about the connection. ``peer`` and ``ssl`` are read by aiosmtpd's inherited code."""

    peer: Any
    peer_ip: str
    id: str
    started: float
    trusted: bool
    ssl: dict[str, Any] | None = None
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    tls_desc: str | None = None
    user: User | None = None
    messages: int = 0
    errors: int = 0
    commands: int = 0
    auth_failures: int = 0
    rejections: list[str] = field(default_factory=list)
    end: str = "closed"


@dataclass(slots=True)
class Transaction:
    mail_from: str
    sender: Mailbox | None
    smtputf8: bool = False
    rcpts: list[str] = field(default_factory=list)
    local: list[bool] = field(default_factory=list)
    refused_rcpts: int = 0


class _Close(Exception):
    """Reply already sent; close the connection."""


class SmtpSession(_AiosmtpdSMTP):
    """The protocol object for one connection (created by :class:`SmtpListener`)."""

    _commands: dict[str, Callable[[SmtpSession, str], Awaitable[None]]] = {}

    def __init__(self, listener: SmtpListener) -> None:
        loop = asyncio.get_running_loop()
        ctx = listener.context
        self.listener = listener
        self.ctx: SmtpContext = ctx
        self.lcfg = listener.config
        limits = ctx.cfg.limits
        # asyncio.StreamReaderProtocol.__init__, skipping aiosmtpd's per-connection introspection.
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=limits.max_line_length + 2),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.loop = loop
        self.hostname = ctx.cfg.server.hostname
        self.enable_SMTPUTF8 = True
        self._timeout_duration = limits.command_timeout
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._handler_coroutine: asyncio.Task[None] | None = None
        self._original_transport = None
        self._tls_protocol = None
        self._tls_handshake_okay = True
        self.transport: asyncio.BaseTransport | None = None
        self.session: SessionState | None = None  # type: ignore[assignment]
        self.envelope = None
        self.tx: Transaction | None = None
        self._slot: str | None = None
        self._log: Any = log

    # --- connection lifecycle -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        if ip.startswith("::ffff:"):
            ip = ip[7:]
        sid = secrets.token_hex(6)
        self.session = SessionState(peer=peer, peer_ip=ip, id=sid, started=time.monotonic(),
                                    trusted=self.ctx.policy.is_trusted(ip))
        self._log = log.bind(listener=self.lcfg.name, peer=ip, session=sid)
        asyncio.StreamReaderProtocol.connection_made(self, transport)
        self.transport = transport
        refusal = self.listener.limiter.acquire(ip)
        if refusal is not None:
            metrics.CONNECTIONS.labels(self.lcfg.name, refusal).inc()
            self.session.end = refusal
            # Best effort on implicit TLS (the client expects a handshake): just close.
            if self.lcfg.tls != "implicit":
                transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
            transport.close()
            return
        self._slot = ip
        self.listener.sessions.add(self)
        if self.lcfg.tls == "implicit":
            # Stop reading until TLS is wired in, so the ClientHello cannot land in the plaintext buffer.
            transport.pause_reading()  # type: ignore[attr-defined]
        self._reset_timeout()
        self._handler_coroutine = self.loop.create_task(self._handle_client())

    def connection_lost(self, error: Exception | None) -> None:
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        asyncio.StreamReaderProtocol.connection_lost(self, error)
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        self.transport = None
        if self._slot is not None:
            self.listener.limiter.release(self._slot)
            self._slot = None
            self.listener.sessions.discard(self)
            self._log_session()

    def eof_received(self) -> bool | None:
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        if self.session is not None and self.session.tls:
            return False
        return asyncio.StreamReaderProtocol.eof_received(self)

    def _timeout_cb(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self.session is not None:
                self.session.end = "timeout"
            if not (self.lcfg.tls == "implicit" and self.session is not None and not self.session.tls):
                self.transport.write(b"421 4.4.2 Timeout exceeded, closing connection\r\n")  # type: ignore[attr-defined]
            self.transport.close()

    def _log_session(self) -> None:
        s = self.session
        if s is None:
            return
        self._log.info("smtp.session", duration=round(time.monotonic() - s.started, 4), helo=s.helo,
                       tls=s.tls_desc, user=s.user.name if s.user else None, trusted=s.trusted,
                       messages=s.messages, commands=s.commands, errors=s.errors, end=s.end,
                       rejections=s.rejections or None)

    # --- replies ------------------------------------------------------------------------
    async def reply(self, command: str, r: Reply | str) -> None:
        text = str(r)
        code = text[:3]
        self.listener.count_reply(command, code[0])
        s = self.session
        assert s is not None
        if code[0] in "45" and code != "421":
            s.errors += 1
            if len(s.rejections) < 5:
                s.rejections.append(f"{command}: {text}")
        self._writer.write(text.encode("utf-8", "replace") + _CRLF)
        await self._writer.drain()
        if code[0] in "45" and code != "421" and s.errors >= self.ctx.cfg.limits.max_errors:
            s.end = "too_many_errors"
            await self.reply(command, "421 4.7.0 Too many errors, closing connection")
            raise _Close

    async def close_with(self, command: str, r: Reply | str, end: str) -> None:
        assert self.session is not None
        self.session.end = end
        await self.reply(command, r)
        raise _Close

    # --- the command loop ---------------------------------------------------------------
    async def _handle_client(self) -> None:
        s = self.session
        assert s is not None
        try:
            if self.lcfg.tls == "implicit":
                if not await self._start_tls(implicit=True):
                    return
            elif self._reader._buffer:  # type: ignore[attr-defined]
                # The client talked before our greeting: a spambot trait (RFC 5321 §4.3.1).
                metrics.CONNECTIONS.labels(self.lcfg.name, "pregreet").inc()
                await self.close_with("CONNECT", "554 5.5.0 Protocol error: client sent data before greeting",
                                      "pregreet")
            metrics.CONNECTIONS.labels(self.lcfg.name, "accepted").inc()
            await self.reply("CONNECT", f"220 {self.hostname} ESMTP mailrelayd")
            while self.transport is not None and not self.transport.is_closing():
                try:
                    line = await self._reader.readuntil(b"\n")
                except asyncio.LimitOverrunError as e:
                    await self._discard_line(e.consumed)
                    await self.reply("UNKNOWN", "500 5.5.2 Line too long")
                    continue
                except asyncio.IncompleteReadError:
                    s.end = "client_eof"
                    return
                s.commands += 1
                verb, _, arg = line.rstrip(b"\r\n").partition(b" ")
                try:
                    cmd = verb.decode("ascii").upper()
                    text = arg.decode("utf-8", "surrogateescape")
                except UnicodeDecodeError:
                    await self.reply("UNKNOWN", "500 5.5.2 Error: bad syntax")
                    continue
                handler = self._commands.get(cmd)
                if handler is None:
                    await self.reply("UNKNOWN", "500 5.5.2 Error: command not recognized")
                    continue
                self._reset_timeout()
                await handler(self, text.strip())
        except _Close:
            pass
        except asyncio.CancelledError:
            raise
        except (ConnectionError, OSError) as e:
            s.end = f"network_error: {type(e).__name__}"
        except Exception as e:  # a bug: never a traceback to the client, never a hang
            s.end = "internal_error"
            self._log.exception("smtp.internal_error", error=str(e))
            if self.transport is not None and not self.transport.is_closing():
                self._writer.write(b"421 4.3.0 Local error, closing connection\r\n")
        finally:
            if self.transport is not None:
                self.transport.close()

    async def _discard_line(self, consumed: int) -> None:
        await self._reader.readexactly(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as e:
                await self._reader.readexactly(e.consumed)

    # --- TLS ----------------------------------------------------------------------------
    async def _start_tls(self, implicit: bool) -> bool:
        s = self.session
        assert s is not None
        ctx = self.ctx.tls_context
        assert ctx is not None
        # uvloop starts reading only after connection_made() returns, so the pause there may not
        # hold and a fast client's ClientHello can already sit in the plaintext buffer. Pause now (this
        # holds), and hand those bytes to the TLS protocol once the loop has installed it. Implicit TLS
        # only: after STARTTLS, buffered plaintext is an injection attempt and is dropped (RFC 3207 §5).
        if self.transport is not None:
            self.transport.pause_reading()  # type: ignore[attr-defined]
        early = bytes(self._reader._buffer) if implicit else b""  # type: ignore[attr-defined]
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        try:
            if early:
                # start_tls() installs the TLS protocol, then queues connection_made and resume_reading:
                # two hops put the replay behind both.
                self.loop.call_soon(self.loop.call_soon, self._replay, early)
            await self._writer.start_tls(ctx, ssl_handshake_timeout=self.ctx.cfg.limits.tls_handshake_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            metrics.TLS_HANDSHAKE_FAILURES.labels(self.lcfg.name).inc()
            s.end = "tls_failed"
            self._log.info("smtp.tls_failed", implicit=implicit, error=f"{type(e).__name__}: {e}"[:200])
            if self.transport is not None:
                self.transport.close()
            return False
        self.transport = self._writer.transport
        sslobj: ssl.SSLObject | None = self.transport.get_extra_info("ssl_object")
        s.tls = True
        s.ssl = {"ssl_object": sslobj}
        if sslobj is not None:
            cipher = sslobj.cipher()
            s.tls_desc = f"using {sslobj.version()} with cipher {cipher[0]} ({cipher[2]}/{cipher[2]} bits)" \
                if cipher else f"using {sslobj.version()}"
        else:
            s.tls_desc = "using TLS"
        return True

    def _replay(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        proto: Any = self.transport.get_protocol()
        if proto is self:  # the TLS protocol was not installed: nothing to replay into
            return
        view = memoryview(data)
        if hasattr(proto, "get_buffer"):  # asyncio's and uvloop's SSL protocols are buffered protocols
            while view:
                buf = proto.get_buffer(len(view))
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                proto.buffer_updated(n)
                view = view[n:]
        else:
            proto.data_received(bytes(view))

    # --- commands -----------------------------------------------------------------------
    async def smtp_HELO(self, arg: str) -> None:
        await self._helo("HELO", arg, esmtp=False)

    async def smtp_EHLO(self, arg: str) -> None:
        await self._helo("EHLO", arg, esmtp=True)

    async def _helo(self, cmd: str, arg: str, esmtp: bool) -> None:
        s = self.session
        assert s is not None
        if not arg or " " in arg:
            await self.reply(cmd, f"501 5.5.4 Syntax: {cmd} hostname")
            return
        s.helo, s.esmtp = arg, esmtp
        self.tx = None
        if not esmtp:
            await self.reply(cmd, f"250 {self.hostname}")
            return
        lines = [self.hostname, "PIPELINING", f"SIZE {self.ctx.cfg.limits.max_message_size}", "8BITMIME",
                 "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if self.lcfg.tls == "starttls" and not s.tls:
            lines.append("STARTTLS")
        if self.ctx.policy.auth_offered and s.tls:
            lines.append("AUTH PLAIN LOGIN")
        text = "\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}"
        await self.reply(cmd, text)

    async def smtp_STARTTLS(self, arg: str) -> None:
        s = self.session
        assert s is not None
        if arg:
            await self.reply("STARTTLS", "501 5.5.4 Syntax: STARTTLS")
            return
        if s.tls:
            await self.reply("STARTTLS", "503 5.5.1 TLS already active")
            return
        if self.lcfg.tls != "starttls" or self.ctx.tls_context is None:
            await self.reply("STARTTLS", "502 5.5.1 STARTTLS not available")
            return
        # RFC 3207 §5 / CVE-2011-0411: anything pipelined after STARTTLS is plaintext injection.
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        await self.reply("STARTTLS", "220 2.0.0 Ready to start TLS")
        if not await self._start_tls(implicit=False):
            raise _Close
        # RFC 3207 §4.2: forget everything learnt before TLS.
        s.helo, s.esmtp, s.user = None, False, None
        self.tx = None

    async def smtp_AUTH(self, arg: str) -> None:
        s = self.session
        assert s is not None
        if not self.ctx.policy.auth_offered:
            await self.reply("AUTH", "502 5.5.1 AUTH not available on this port")
            return
        if not s.tls:
            await self.reply("AUTH", STARTTLS_FIRST)
            return
        if not s.esmtp:
            await self.reply("AUTH", "503 5.5.1 Error: send EHLO first")
            return
        if s.user is not None:
            await self.reply("AUTH", "503 5.5.1 Already authenticated")
            return
        if self.tx is not None:
            await self.reply("AUTH", "503 5.5.1 AUTH not permitted during a mail transaction")
            return
        throttle = self.ctx.throttle
        if throttle.is_locked(s.peer_ip):
            metrics.AUTH_THROTTLED.labels(self.lcfg.name).inc()
            await self.close_with("AUTH", "421 4.7.0 Too many authentication failures, try again later",
                                  "auth_throttled")
        parts = arg.split()
        if not parts or len(parts) > 2:
            await self.reply("AUTH", "501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mech = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        creds: tuple[bytes, bytes] | None
        if mech == "PLAIN":
            creds = await self._auth_plain(initial)
        elif mech == "LOGIN":
            creds = await self._auth_login(initial)
        else:
            await self.reply("AUTH", "504 5.5.4 Unrecognized authentication type")
            return
        if creds is None:
            return  # reply already sent (aborted or malformed)
        authenticator = self.ctx.authenticator
        user = await authenticator.verify(*creds) if authenticator is not None else None
        if user is None:
            metrics.AUTH_FAILURES.labels(self.lcfg.name).inc()
            metrics.AUTH_ATTEMPTS.labels(self.lcfg.name, "failure").inc()
            s.auth_failures += 1
            throttle.failure(s.peer_ip)
            # Log the attempted user name only if it is printable and short; never the password.
            name = creds[0].decode("utf-8", "replace")[:64]
            self._log.info("smtp.auth_failed", user=name if name.isprintable() else None)
            await self.reply("AUTH", "535 5.7.8 Authentication credentials invalid")
            return
        throttle.success(s.peer_ip)
        metrics.AUTH_ATTEMPTS.labels(self.lcfg.name, "success").inc()
        s.user = user
        await self.reply("AUTH", "235 2.7.0 Authentication successful")

    async def _auth_line(self) -> bytes | None:
        """Read one AUTH continuation line (RFC 4954 §4); None after replying to '*' or junk."""
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as e:
            await self._discard_line(e.consumed)
            await self.reply("AUTH", "500 5.5.6 Authentication exchange line is too long")
            return None
        except asyncio.IncompleteReadError:
            raise _Close from None
        line = line.strip()
        if line == b"*":
            await self.reply("AUTH", "501 5.7.0 Authentication aborted")
            return None
        return await self._b64(line)

    async def _b64(self, data: bytes | str) -> bytes | None:
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            await self.reply("AUTH", "501 5.5.2 Cannot decode base64 response")
            return None

    async def _auth_plain(self, initial: str | None) -> tuple[bytes, bytes] | None:
        if initial is None:
            await self.reply("AUTH", "334 ")
            raw = await self._auth_line()
        elif initial == "=":
            raw = b""
        else:
            raw = await self._b64(initial)
        if raw is None:
            return None
        parts = raw.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            await self.reply("AUTH", "501 5.5.2 Malformed PLAIN response")
            return None
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            # We do not support acting as another identity (RFC 4616 §2 authorization identity).
            return authcid, b"\0invalid-authzid\0" + password
        return authcid, password

    async def _auth_login(self, initial: str | None) -> tuple[bytes, bytes] | None:
        if initial is None:
            await self.reply("AUTH", "334 VXNlcm5hbWU6")  # "Username:"
            user = await self._auth_line()
        else:
            user = await self._b64(initial)
        if user is None:
            return None
        await self.reply("AUTH", "334 UGFzc3dvcmQ6")  # "Password:"
        password = await self._auth_line()
        if password is None:
            return None
        return user, password

    async def smtp_MAIL(self, arg: str) -> None:
        s = self.session
        assert s is not None
        if s.helo is None:
            await self.reply("MAIL", "503 5.5.1 Error: send HELO/EHLO first")
            return
        if self.listener.draining:
            await self.close_with("MAIL", "421 4.3.2 Service shutting down, try again later", "draining")
        if self.lcfg.mode == "submission" and s.user is None:
            await self.reply("MAIL", STARTTLS_FIRST if not s.tls and self.lcfg.tls == "starttls" else AUTH_REQUIRED)
            return
        if self.tx is not None:
            await self.reply("MAIL", "503 5.5.1 Error: nested MAIL command")
            return
        if arg[:5].upper() != "FROM:":
            await self.reply("MAIL", "501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        arg = arg[5:]
        try:
            sender, rest = parse_command_path(arg, allow_null=True, utf8=True)
            opts = _parse_params(rest, s.esmtp)
        except AddressError as e:
            await self.reply("MAIL", f"553 5.1.7 Bad sender address syntax: {e}")
            return
        except ValueError as e:
            await self.reply("MAIL", f"555 5.5.4 {e}")
            return
        smtputf8 = "SMTPUTF8" in opts
        if sender is not None and sender.needs_smtputf8 and not smtputf8:
            await self.reply("MAIL", "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter")
            return
        body = opts.get("BODY", "7BIT")
        if body not in ("7BIT", "8BITMIME"):
            await self.reply("MAIL", "501 5.5.4 BODY must be 7BIT or 8BITMIME")
            return
        size: int | None = None
        if "SIZE" in opts:
            if not opts["SIZE"].isdigit():
                await self.reply("MAIL", "501 5.5.4 SIZE takes a number")
                return
            size = int(opts["SIZE"])
        try:
            self.ctx.spool.check_space(size or 0)
        except SpoolError as e:
            await self.reply("MAIL", reply_for(e))
            return
        facts = self._facts()
        refusal = self.ctx.policy.check_mail(facts, sender, size) or await self.ctx.policy.check_rate(facts)
        if refusal is not None:
            await self.reply("MAIL", refusal)
            return
        self.tx = Transaction(mail_from=str(sender) if sender else "", sender=sender, smtputf8=smtputf8)
        await self.reply("MAIL", "250 2.1.0 Ok")

    async def smtp_RCPT(self, arg: str) -> None:
        s = self.session
        assert s is not None
        tx = self.tx
        if tx is None:
            await self.reply("RCPT", "503 5.5.1 Error: need MAIL command")
            return
        if arg[:3].upper() != "TO:":
            await self.reply("RCPT", "501 5.5.4 Syntax: RCPT TO:<address>")
            return
        try:
            rcpt, rest = parse_command_path(arg[3:], allow_null=False, utf8=tx.smtputf8)
            _parse_params(rest, s.esmtp, allowed=())
        except AddressError as e:
            tx.refused_rcpts += 1
            code = "553 5.6.7" if not arg.isascii() and not tx.smtputf8 else "553 5.1.3"
            await self.reply("RCPT", f"{code} Bad recipient address syntax: {e}")
            return
        except ValueError as e:
            tx.refused_rcpts += 1
            await self.reply("RCPT", f"555 5.5.4 {e}")
            return
        assert rcpt is not None
        refusal, local = self.ctx.policy.check_rcpt(self._facts(), s.trusted, rcpt, len(tx.rcpts))
        if refusal is not None:
            tx.refused_rcpts += 1
            if refusal.enhanced == "5.7.1" and "suppressed" in refusal.text:
                metrics.SUPPRESSED_REJECTIONS.labels("rcpt").inc()
            await self.reply("RCPT", refusal)
            return
        tx.rcpts.append(str(rcpt))
        tx.local.append(local)
        await self.reply("RCPT", "250 2.1.5 Ok")

    async def smtp_DATA(self, arg: str) -> None:
        s = self.session
        assert s is not None
        tx = self.tx
        if arg:
            await self.reply("DATA", "501 5.5.4 Syntax: DATA")
            return
        if tx is None:
            await self.reply("DATA", "503 5.5.1 Error: need MAIL command")
            return
        if not tx.rcpts:
            await self.reply("DATA", "554 5.5.1 Error: no valid recipients" if tx.refused_rcpts
                             else "503 5.5.1 Error: need RCPT command")
            return
        await self.reply("DATA", "354 End data with <CR><LF>.<CR><LF>")
        self._reset_timeout(self.ctx.cfg.limits.data_timeout)
        data, problem = await self._read_data()
        self._reset_timeout()
        self.tx = None
        if problem is not None:
            await self.reply("DATA", problem)
            return
        assert data is not None
        try:
            result = await self._accept(tx, data)
        except Exception as e:
            r = reply_for(e)
            if r.code == 451 and not isinstance(e, SpoolError):
                self._log.exception("smtp.accept_failed")
            else:
                self._log.warning("smtp.accept_failed", error=str(e), reply=str(r))
            result = r
        await self.reply("DATA", result)

    async def _read_data(self) -> tuple[bytes | None, Reply | None]:
        """Read the DATA payload up to CRLF.CRLF. Returns (message, None) with dot-stuffing
        removed (RFC 5321 §4.5.2), or (None, refusal). Always consumes through the terminator,
        so the session stays in step with the client."""
        limits = self.ctx.cfg.limits
        reader = self._reader
        buf: bytearray = reader._buffer  # type: ignore[attr-defined]
        # A virtual CRLF in front lets one search find the terminator even for an empty body.
        buf[0:0] = _CRLF
        old_limit = reader._limit  # type: ignore[attr-defined]
        reader._limit = limits.max_message_size + 4096  # type: ignore[attr-defined]
        too_big = False
        try:
            while True:
                try:
                    wire = await reader.readuntil(_TERMINATOR)
                    break
                except asyncio.LimitOverrunError as e:
                    # Over the size limit: keep reading to the terminator but keep nothing (RFC 5321 §4.2.5:
                    # the reply comes after the data).
                    too_big = True
                    await reader.readexactly(e.consumed)
                    reader._limit = 65536  # type: ignore[attr-defined]
        except asyncio.IncompleteReadError:
            raise _Close from None
        finally:
            reader._limit = old_limit  # type: ignore[attr-defined]
        if too_big:
            return None, Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        # Smuggling (CVE-2023-51764 family): a bare LF or CR anywhere, including "\n.\n" or
        # "\r.\n" meant as an end of data by some other server, rejects the whole message.
        n_crlf = wire.count(_CRLF)
        if wire.count(b"\n") != n_crlf or wire.count(b"\r") != n_crlf:
            return None, Reply(550, "5.6.0", "Bare CR or LF in message data is not allowed (RFC 5321 §2.3.8)")
        body = wire[:-3].replace(b"\r\n.", _CRLF)[2:]
        if len(body) > limits.max_message_size:
            return None, Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        if len(body) > limits.max_line_length - 2:
            longest = max(map(len, wire.split(_CRLF)))
            if longest > limits.max_line_length - 1:  # -2 for CRLF, +1 for a stuffed dot
                return None, Reply(500, "5.5.2", f"Line too long (RFC 5321 §4.5.3.1.6: "
                                                 f"{limits.max_line_length} octets with CRLF)")
        return body, None

    async def _accept(self, tx: Transaction, body: bytes) -> Reply:
        """Hand the message to the intake (policy, headers, DKIM, durable commit). Returns the reply."""
        s = self.session
        assert s is not None
        origin = Origin(listener=self.lcfg.name, peer_ip=s.peer_ip, helo=s.helo,
                        protocol=hdr.protocol_name(s.esmtp, s.tls, s.user is not None), tls=s.tls_desc,
                        user=s.user, session=s.id)
        qid = await self.ctx.intake.accept(origin, tx.mail_from, tx.rcpts, body, outbound=not all(tx.local))
        s.messages += 1
        return accepted_reply(qid)

    async def smtp_RSET(self, arg: str) -> None:
        if arg:
            await self.reply("RSET", "501 5.5.4 Syntax: RSET")
            return
        self.tx = None
        await self.reply("RSET", "250 2.0.0 Ok")

    async def smtp_NOOP(self, arg: str) -> None:
        await self.reply("NOOP", "250 2.0.0 Ok")

    async def smtp_QUIT(self, arg: str) -> None:
        assert self.session is not None
        self.session.end = "quit"
        await self.reply("QUIT", "221 2.0.0 Bye")
        raise _Close

    async def smtp_VRFY(self, arg: str) -> None:
        # RFC 5321 §3.5.3: 252 when we will not say whether a mailbox exists.
        await self.reply("VRFY", "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery")

    async def smtp_EXPN(self, arg: str) -> None:
        await self.reply("EXPN", "502 5.5.1 EXPN not supported")

    async def smtp_HELP(self, arg: str) -> None:
        await self.reply("HELP", "214 2.0.0 See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT "
                                 "STARTTLS AUTH VRFY")

    def _facts(self) -> Facts:
        s = self.session
        assert s is not None
        return Facts(peer_ip=s.peer_ip, tls=s.tls, user=s.user)


SmtpSession._commands = {
    name[5:]: fn for name, fn in vars(SmtpSession).items() if name.startswith("smtp_") and callable(fn)
}


_MAIL_PARAMS = ("SIZE", "BODY", "SMTPUTF8", "AUTH")


def _parse_params(rest: str, esmtp: bool, allowed: tuple[str, ...] = _MAIL_PARAMS) -> dict[str, str]:
    """ESMTP parameters (RFC 5321 §4.1.2 esmtp-param) as an upper-cased dict. Raises ValueError
    for anything we do not advertise (555 per §4.1.1.11)."""
    rest = rest.strip()
    if not rest:
        return {}
    if not esmtp:
        raise ValueError("parameters need EHLO")
    out: dict[str, str] = {}
    for p in rest.split():
        key, eq, value = p.partition("=")
        key = key.upper()
        if not key.isalnum() or (eq and not value):
            raise ValueError(f"malformed parameter {p[:40]!r}")
        if key not in allowed:
            raise ValueError(f"unsupported parameter {key[:20]}")
        out[key] = value.upper() if key in ("BODY",) else value
    return out
