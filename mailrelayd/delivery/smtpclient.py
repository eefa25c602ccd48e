"""The outbound SMTP client: a reply parser without I/O and a thin asyncio edge.

Our own rather than aiosmtplib's because delivery needs two things its public API does not give:
RFC 2920 pipelining (MAIL, every RCPT and DATA in one write, then the replies in order: two round
trips per message on a reused session instead of four) and sending a message from the bytes the
spool returned, without the two copies its ``data()`` makes (line-ending normalisation and dot
stuffing, done here only when the message needs them).

The edge is an :class:`asyncio.Protocol`: replies are parsed as they arrive and queued, so the
server's replies to a pipelined group can never fill its send buffer while we write (RFC 2920 §3.5's
deadlock). Every wait has a timer (``loop.call_later``), and a timeout, a reset or a malformed reply
ends the session: after any of them its state is unknown.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_LINE = 16384
"""Longest reply line accepted (RFC 5321 §4.5.3.1.5 says 512; real servers send longer text)."""
MAX_LINES = 512
"""Most lines in one reply (a long EHLO list is ~30)."""
MAX_QUOTED = 2000
"""Longest reply text kept for a recipient's result, its DSN and logs (Reply.line)."""


class ClientError(Exception):
    """The session failed; it must not be used again."""


class ConnectFailed(ClientError):
    """The TCP connection could not be made."""


class Timeout(ClientError):
    """A reply (or the room to write) did not come in time."""


class GreetingTimeout(Timeout):
    """Connected, but the server said nothing within the greeting timeout (not a network problem)."""


class Disconnected(ClientError):
    """The server closed or reset the connection."""


class BadReply(ClientError):
    """The server sent something that is not an SMTP reply (RFC 5321 §4.2)."""

    def __init__(self, message: str, replies: Sequence[Reply] = ()) -> None:
        super().__init__(message)
        self.replies = list(replies)
        """Whole replies that came before it in the same bytes: they count all the same, since how
        the bytes were cut must not matter (:meth:`ReplyParser.feed`)."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str
    """The text of every line after the code, joined with newlines."""

    def line(self) -> str:
        """The reply on one line, as logs and DSNs quote it: at most MAX_QUOTED characters (a reply
        may be megabytes; it is stored per recipient and quoted in DSNs and every log line)."""
        text = f"{self.code} {' '.join(self.text.split())}".strip()
        return text if len(text) <= MAX_QUOTED else text[:MAX_QUOTED - 6] + " [...]"


_LINE_END = re.compile(rb"\r\n|\n")


class ReplyParser:
    """Bytes in, whole replies out (RFC 5321 §4.2.1: ``ddd-text`` continues, ``ddd text`` ends)."""

    def __init__(self) -> None:
        self.buf = b""
        self.lines: list[str] = []
        self.code = 0

    @property
    def pending(self) -> bool:
        """Part of a reply has arrived."""
        return bool(self.buf or self.lines)

    def feed(self, data: bytes) -> list[Reply]:
        # Look for line ends only in the new bytes (and the CR that may end the old ones): a line
        # trickled a byte at a time must cost time linear in its length, not quadratic.
        scan = max(len(self.buf) - 1, 0)
        buf = self.buf + data if self.buf else data
        out: list[Reply] = []
        pos = 0
        while True:
            m = _LINE_END.search(buf, max(pos, scan))
            if m is None:
                break
            line = buf[pos:m.start()]
            pos = m.end()
            if len(line) > MAX_LINE:
                raise BadReply("reply line too long", out)
            if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3:4] not in b" -"):
                raise BadReply(f"not an SMTP reply: {line[:60]!r}", out)
            if line[0] not in b"2345":  # RFC 5321 §4.2: other first digits are to be treated as fatal errors
                raise BadReply(f"reply code out of range: {line[:3]!r}", out)
            code = int(line[:3])
            if self.lines and code != self.code:
                raise BadReply("reply code changed inside a multiline reply", out)
            self.code = code
            self.lines.append(line[4:].decode("utf-8", "replace"))
            if len(self.lines) > MAX_LINES:
                raise BadReply("reply has too many lines", out)
            if line[3:4] != b"-":
                out.append(Reply(code, "\n".join(self.lines)))
                self.lines = []
        self.buf = buf[pos:]
        if len(self.buf) > MAX_LINE:
            raise BadReply("reply line too long", out)
        return out


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (lower case) and their parameters; the first line is the greeting (RFC 5321 §4.1.1.1)."""
    ext: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:
        word, _, params = line.strip().partition(" ")
        if not word:
            continue
        if word.lower().startswith("auth="):  # the pre-RFC 4954 form some servers still add
            word, params = "auth", f"{ext.get('auth', '')} {word[5:]} {params}".strip()
        elif word.lower() == "auth" and "auth" in ext:
            params = f"{ext['auth']} {params}".strip()
        word = word.lower()
        ext[word] = params.strip()
    return ext


def message_bytes(data: bytes) -> tuple[bytes, bytes]:
    """The pieces to write after a 354: the message with CRLF line ends, dot-stuffed (RFC 5321
    §4.5.2), and the terminator. The common message needs neither change and is sent as it is."""
    n_lf = data.count(b"\n")
    if n_lf != data.count(b"\r") or n_lf != data.count(b"\r\n"):
        data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)  # bare CR or LF: what aiosmtplib did too
    if data.startswith(b".") or b"\n." in data:
        data = re.sub(rb"(?m)^\.", b"..", data)
    if data and not data.endswith(b"\r\n"):
        return data, b"\r\n.\r\n"
    return data, b".\r\n"


class _Edge(asyncio.Protocol):
    """Queues parsed replies and wakes the one waiter; tracks write flow control."""

    def __init__(self) -> None:
        self.parser = ReplyParser()
        self.replies: deque[Reply] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.drained: asyncio.Future[None] | None = None
        self.writable = True
        self.error: ClientError | None = None
        self.owed = 1
        """Replies due: the greeting, then one for each command sent, less those read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        bad: BadReply | None = None
        try:
            got = self.parser.feed(data)
        except BadReply as e:
            got, bad = e.replies, e
        self.replies.extend(got)
        if len(self.replies) > self.owed or (len(self.replies) == self.owed and self.parser.pending):
            # One reply per command, after it (RFC 5321 §4.3.1; in order when pipelining, RFC 2920
            # §3.1). A reply beyond those due, sent early or in surplus, would be read as the answer
            # to a later command (a 250 to the dot before the message was sent), so it ends the session.
            while len(self.replies) > self.owed:
                self.replies.pop()
            self.fail(BadReply("the server sent a reply to no command"))
        elif bad is not None:
            self.fail(bad)
        elif got:
            self.wake()

    def eof_received(self) -> bool | None:
        self.fail(Disconnected("the server closed the connection"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(Disconnected(f"connection lost: {exc}" if exc else "the server closed the connection"))
        self.writable = True
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def fail(self, err: ClientError) -> None:
        if self.error is None:
            self.error = err
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)


class SmtpClient:
    """One SMTP session to one server. Methods return the server's :class:`Reply` (any code); they
    raise :class:`ClientError` when the session itself failed."""

    def __init__(self, transport: asyncio.Transport, edge: _Edge) -> None:
        self.transport = transport
        self.edge = edge
        self.extensions: dict[str, str] = {}
        self.closed = False

    @classmethod
    async def connect(cls, host: str, port: int, *, source: str | None = None, connect_timeout: float,
                      greeting_timeout: float) -> tuple[SmtpClient, Reply]:
        """Open a TCP session and read the greeting (RFC 5321 §4.5.3.2: separate limits for each)."""
        loop = asyncio.get_running_loop()
        try:
            transport, edge = await asyncio.wait_for(
                loop.create_connection(_Edge, host, port, local_addr=(source, 0) if source else None),
                connect_timeout)
        except TimeoutError:
            raise Timeout(f"connect to {host}:{port} timed out") from None
        except OSError as e:
            raise ConnectFailed(e.strerror or str(e)) from None
        client = cls(transport, edge)
        try:
            greeting = await client.reply(greeting_timeout)
        except Timeout:
            client.close()
            raise GreetingTimeout(f"{host}:{port} sent no greeting") from None
        except BaseException:
            client.close()
            raise
        return client, greeting

    # --- state ---------------------------------------------------------------------------
    @property
    def is_connected(self) -> bool:
        return not self.closed and self.edge.error is None and not self.transport.is_closing()

    def supports(self, keyword: str) -> bool:
        return keyword in self.extensions

    def extra(self, name: str) -> Any:
        return self.transport.get_extra_info(name)

    def close(self) -> None:
        """Drop the session at once (its state is unknown or it is no longer wanted)."""
        self.closed = True
        self.transport.abort()

    # --- replies -------------------------------------------------------------------------
    async def reply(self, timeout: float) -> Reply:
        """The next reply, within ``timeout``. A reply already queued (the answer to an earlier
        command of a pipelined group) is returned at once."""
        edge = self.edge
        if not edge.replies and edge.error is None:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(timeout, edge.fail, Timeout(f"no reply within {timeout:g}s"))
            try:
                while not edge.replies and edge.error is None:
                    edge.waiter = loop.create_future()
                    await edge.waiter
            except asyncio.CancelledError:
                self.close()  # a reply still owed would answer the next command: never reuse this session
                raise
            finally:
                edge.waiter = None
                timer.cancel()
        if not edge.replies:
            self.close()
            assert edge.error is not None
            raise edge.error
        edge.owed -= 1
        return edge.replies.popleft()

    def send(self, *lines: bytes) -> None:
        """Write command lines (each without its CRLF) in one write: a pipelined group when several."""
        if not self.is_connected:
            raise self.edge.error or Disconnected("the session is closed")
        self.edge.owed += len(lines)
        self.transport.write(b"".join(line + b"\r\n" for line in lines))

    async def command(self, line: bytes, timeout: float) -> Reply:
        self.send(line)
        return await self.reply(timeout)

    async def drain(self, timeout: float) -> None:
        """Wait until the transport wants more data. Fails only when the receiver took nothing for
        ``timeout`` (a slow link moving a large message is progress, like Postfix's
        smtp_data_xfer_timeout)."""
        edge = self.edge
        before = self.transport.get_write_buffer_size()
        while not edge.writable and edge.error is None:
            edge.drained = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(edge.drained, timeout)
            except TimeoutError:
                now = self.transport.get_write_buffer_size()
                if now >= before:
                    self.close()
                    raise Timeout(f"the server took no data for {timeout:g}s") from None
                before = now
            finally:
                edge.drained = None

    # --- commands ------------------------------------------------------------------------
    async def ehlo(self, name: str, timeout: float) -> Reply:
        """EHLO; on 250 the extensions are what it listed (RFC 3207 §4.2: forgotten after STARTTLS)."""
        r = await self.command(b"EHLO " + name.encode("idna" if not name.isascii() else "ascii"), timeout)
        self.extensions = parse_ehlo(r) if r.code == 250 else {}
        return r

    async def helo(self, name: str, timeout: float) -> Reply:
        """HELO: a session without extensions (RFC 5321 §4.1.1.1), for servers that refuse EHLO."""
        r = await self.command(b"HELO " + name.encode("idna" if not name.isascii() else "ascii"), timeout)
        self.extensions = {}
        return r

    async def starttls(self, ctx: ssl.SSLContext, server_hostname: str, timeout: float) -> Reply:
        """STARTTLS (RFC 3207). Returns the server's refusal, or its 220 once the handshake is done;
        a failed handshake raises :class:`ssl.SSLError` (or OSError / Timeout) and closes the session."""
        r = await self.command(b"STARTTLS", timeout)
        if r.code != 220:
            return r
        if self.edge.error is not None or self.edge.replies or self.edge.parser.pending:
            self.close()  # RFC 3207 §4: nothing may follow the 220 in the clear (the edge fails on it)
            raise self.edge.error or BadReply("the server sent data after its 220 to STARTTLS")
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(self.transport, self.edge, ctx, server_hostname=server_hostname,
                                       ssl_handshake_timeout=timeout)
        except BaseException:
            self.close()
            raise
        if tls is None:
            self.close()
            raise Disconnected("the connection closed during the TLS handshake")
        self.transport = tls
        self.extensions = {}
        return r

    async def login(self, username: str, password: str, timeout: float) -> Reply:
        """AUTH PLAIN, else LOGIN (RFC 4954, RFC 4616); the final reply."""
        methods = self.extensions.get("auth", "").upper().split()
        if "PLAIN" in methods or "LOGIN" not in methods:
            token = base64.b64encode(b"\0" + username.encode() + b"\0" + password.encode())
            return await self.command(b"AUTH PLAIN " + token, timeout)
        r = await self.command(b"AUTH LOGIN", timeout)
        for secret in (username, password):
            if r.code != 334:
                return r
            r = await self.command(base64.b64encode(secret.encode()), timeout)
        return r

    async def message(self, data: bytes, *, block_timeout: float, done_timeout: float) -> Reply:
        """After a 354: the message and its terminator, then the final reply (RFC 5321 §4.1.1.4)."""
        await self.send_message(data, block_timeout)
        return await self.reply(done_timeout)

    async def send_message(self, data: bytes, block_timeout: float) -> None:
        """After a 354: the message and its terminator, written until the transport has taken them
        (the first half of :meth:`message`; the final reply is :meth:`reply`'s)."""
        if not self.is_connected:
            raise self.edge.error or Disconnected("the session is closed")
        body, end = message_bytes(data)
        self.edge.owed += 1
        if len(body) < 65536:
            self.transport.write(body + end)  # one send for the common small message
        else:
            # Two writes, not writelines(): asyncio's selector transport in 3.12-3.13 does not pause
            # the protocol from writelines(), which would leave flow control (and data_block_timeout) out.
            self.transport.write(body)
            self.transport.write(end)
        await self.drain(block_timeout)

    async def quit(self, wait: float = 0.0) -> None:
        """QUIT and close; the 221 is awaited for at most ``wait`` seconds. RFC 5321 §4.1.1.10: the
        client sends QUIT before closing (close() flushes it) and SHOULD await the reply. Callers
        that end a session mid-delivery pass 0, as Postfix does by default (smtp_skip_quit_response):
        every outcome is settled by then, and a peer that never answers would otherwise hold the
        results and the delivery and connection slots for the wait. The 221 is awaited only when no
        other reply is due (a group left unread after a 421): the next reply would not be QUIT's."""
        try:
            if self.is_connected:
                self.send(b"QUIT")
                if wait > 0 and self.edge.owed == 1:
                    await self.reply(wait)
        except (ClientError, OSError):
            pass
        finally:
            self.closed = True
            self.transport.close()
