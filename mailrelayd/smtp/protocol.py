"""The SMTP server protocol (RFC 5321) as a pure state machine, in the h11 / aioquic style.

Bytes go in (:meth:`ServerProtocol.receive`), replies come out (:meth:`ServerProtocol.data_to_send`)
together with *events* for the work the protocol cannot do itself because it takes time or I/O:
checking a password (:class:`AuthRequest`), starting TLS (:class:`StartTls`), making a message durable
(:class:`MessageReceived`), closing the connection (:class:`Close`). While such an event is
outstanding, input is buffered, not interpreted (PIPELINING, RFC 2920); the edge reports the outcome
(:meth:`auth_result`, :meth:`tls_started`, :meth:`message_result`) and the protocol carries on.

No asyncio here: the edge (:mod:`mailrelayd.smtp.connection`) owns sockets, timers and tasks. The
synchronous decisions (MAIL/RCPT policy, spool space, AUTH lock-out, the DATA memory budget) are
called through :class:`Hooks`, each a pure function or an in-memory check.

Error accounting: protocol errors (syntax, sequence, unknown commands) count towards
``limits.max_errors``; a recipient refused by policy because of the recipient limit or suppression
does not (RFC 5321 §4.5.3.1.10: the client sends the message to the recipients accepted, as Python's
smtplib and most MTAs do), nor does a 421. Commands that move nothing forward (NOOP, RSET, VRFY,
HELP, a repeated HELO/EHLO) are free up to ``limits.max_junk_commands`` between accepted messages,
then each counts as an error: a session cannot hold its slot for ever on NOOPs (Postfix's
smtpd_junk_command_limit). Likewise RCPT commands that add nothing (over the recipient limit, or a
recipient already given) past ``limits.max_recipient_overshoot`` (smtpd_recipient_overshoot_limit).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto

from mailrelayd.errors import Reply, SpoolError, address_refusal, reply_for
from mailrelayd.smtp.address import AddressError, Mailbox, parse_command_path
from mailrelayd.smtp.dataread import DotReader, MemoryBudget
from mailrelayd.smtp.policy import AUTH_REQUIRED, STARTTLS_FIRST, SUPPRESSED, TOO_MANY_RCPTS, Facts, Policy
from mailrelayd.users import User

CRLF = b"\r\n"

# Refusals that are about the recipient, not about the client's conduct: not session errors.
_NOT_ERRORS = (TOO_MANY_RCPTS, SUPPRESSED)
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
AUTH_THROTTLED = Reply(421, "4.7.0", "Too many authentication failures, try again later")
NO_MEMORY_AT_DATA = Reply(451, "4.3.2", "Too much mail in progress, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
PREGREET = Reply(554, "5.5.1", "Protocol error: talked before greeting")
NOT_SMTP = Reply(554, "5.5.1", "Protocol error: HTTP request to an SMTP server")
# A web page can make a browser POST to any port not on the browser's blocked list (2525, say)
# with a body of SMTP commands, and so relay through a trusted network: cross-protocol request
# forgery. No SMTP client sends an HTTP method, so the first one ends the session before the
# request's body is read (Postfix: smtpd_forbidden_commands).
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


# --- events -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AuthRequest:
    """Check these credentials, then call :meth:`ServerProtocol.auth_result`."""

    mechanism: str
    username: bytes
    password: bytes


@dataclass(frozen=True, slots=True)
class StartTls:
    """The 220 for STARTTLS is queued: send it, start the TLS handshake, then call
    :meth:`ServerProtocol.tls_started` (or close on failure)."""


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A complete, well-formed message: make it durable, then call :meth:`ServerProtocol.message_result`."""

    mail_from: str
    recipients: tuple[str, ...]
    local: tuple[bool, ...]
    body: bytes
    smtputf8: bool


@dataclass(frozen=True, slots=True)
class Close:
    """Send what is queued, then close. ``end`` says why (the ``smtp.session`` log field)."""

    end: str


Event = AuthRequest | StartTls | MessageReceived | Close


# --- configuration and collaborators ----------------------------------------------------
@dataclass(frozen=True, slots=True)
class Settings:
    """Per listener, from the config."""

    hostname: str
    tls_mode: str  # "starttls" | "implicit" | "none"
    submission: bool
    auth_offered: bool
    max_message_size: int
    max_line_length: int
    max_errors: int
    command_timeout: float
    data_timeout: float
    max_junk_commands: int = 100
    max_recipient_overshoot: int = 1000


@dataclass(frozen=True, slots=True)
class Hooks:
    """The narrow set of synchronous decisions the protocol asks for."""

    policy: Policy
    check_space: Callable[[int], None]  # raises SpoolError when the spool cannot take this much
    auth_locked: Callable[[str], bool]  # is this IP locked out after AUTH failures?
    draining: Callable[[], bool]  # is the daemon shutting down?
    budget: MemoryBudget | None = None
    on_reply: Callable[[str, str], None] = lambda command, cls: None  # (command, "2"/"4"/"5") for metrics
    on_suppressed: Callable[[], None] = lambda: None


@dataclass(slots=True)
class Transaction:
    mail_from: str
    sender: Mailbox | None
    smtputf8: bool = False
    rcpts: list[str] = field(default_factory=list)
    local: list[bool] = field(default_factory=list)
    refused_rcpts: int = 0
    overshoot: int = 0  # RCPTs that added nothing: over the limit, or given before


@dataclass(slots=True)
class SessionFacts:
    """What we know about the client, and the counters of the ``smtp.session`` log line."""

    peer_ip: str
    trusted: bool
    tls: bool = False
    tls_desc: str | None = None
    helo: str | None = None
    esmtp: bool = False
    user: User | None = None
    messages: int = 0
    errors: int = 0
    commands: int = 0
    rejections: list[str] = field(default_factory=list)


class Phase(Enum):
    NEW = auto()  # before the greeting (the edge may hold it back: listeners[].greet_delay)
    COMMAND = auto()
    AUTH = auto()  # reading AUTH continuation lines
    DATA = auto()  # reading the payload
    WAIT = auto()  # an event is outstanding
    CLOSED = auto()


class ServerProtocol:
    """One SMTP server conversation."""

    def __init__(self, settings: Settings, hooks: Hooks, facts: SessionFacts) -> None:
        self.settings = settings
        self.hooks = hooks
        self.facts = facts
        self.phase = Phase.NEW
        self.tx: Transaction | None = None
        self.progress = 0  # bumped on each command and payload: the edge re-arms its idle timer on change
        self._in = bytearray()
        self._out = bytearray()
        self._events: list[Event] = []
        self._eof = False
        self._lost = False  # connection_lost() came (possibly while a commit was outstanding)
        self._discarding = False  # inside an over-long line: drop through its LF, then reply 500
        self._reader: DotReader | None = None
        self._auth_step: str | None = None  # "plain", "login-user", "login-pass"
        self._auth_user = b""
        self._declared = 0  # MAIL SIZE= of the current transaction
        self._junk = 0  # commands that moved nothing forward since the last accepted message
        self._max_line = settings.max_line_length  # octets with the line's CRLF (or bare LF)

    # --- inputs from the edge -------------------------------------------------------------
    def start(self) -> list[Event]:
        """The connection is ready (after the TLS handshake on implicit TLS): greet."""
        if self.phase is not Phase.NEW:  # already refused or closed while the greeting was held back
            return []
        self.phase = Phase.COMMAND
        self._send("CONNECT", f"220 {self.settings.hostname} ESMTP mailrelayd")
        return self._run()

    def receive(self, data: bytes) -> list[Event]:
        if self.phase is Phase.CLOSED:
            return []
        if self.phase is Phase.NEW:
            return self._talked_first()
        if self.phase is Phase.DATA and not self._in:
            self._feed_data(data)  # the common case: straight into the payload, no copy
        else:
            self._in += data
        return self._run()

    def receive_eof(self) -> list[Event]:
        """The client will send nothing more (a FIN: half-close or close). Commands already complete
        are still answered, an outstanding commit still gets its reply, then the connection closes."""
        self._eof = True
        return self._run()

    def auth_result(self, user: User | None) -> list[Event]:
        assert self.phase is Phase.WAIT
        self.phase = Phase.COMMAND
        if user is None:
            self._send("AUTH", "535 5.7.8 Authentication credentials invalid")
        else:
            self.facts.user = user
            self._send("AUTH", "235 2.7.0 Authentication successful")
        return self._run()

    def auth_throttled(self) -> list[Event]:
        """The :class:`AuthRequest` was not checked: the IP was locked out while it waited its turn."""
        assert self.phase is Phase.WAIT
        self.phase = Phase.COMMAND
        self._send("AUTH", AUTH_THROTTLED)
        self._close("auth_throttled")
        return self._run()

    def tls_started(self, description: str) -> list[Event]:
        assert self.phase is Phase.WAIT
        f = self.facts
        f.tls, f.tls_desc = True, description
        # RFC 3207 §4.2: forget everything learnt before TLS.
        f.helo, f.esmtp, f.user = None, False, None
        self.tx = None
        self.phase = Phase.COMMAND
        return self._run()

    def message_result(self, reply: Reply) -> list[Event]:
        """The outcome of a :class:`MessageReceived`: the queue id's 250, or a refusal."""
        assert self.phase is Phase.WAIT
        if self._reader is not None:
            self._reader.release()
            self._reader = None
        if reply.code == 250:
            self.facts.messages += 1
            self._junk = 0
        if self._lost:
            # The commit outlived its connection: nobody reads the reply, and what the client had
            # pipelined behind the message must not become another message (and hold memory).
            self.phase = Phase.CLOSED
            return []
        self.phase = Phase.COMMAND
        self._send("DATA", reply)
        return self._run()

    def timeout(self) -> list[Event]:
        """The edge's timer fired (no command within ``command_timeout``, or DATA longer than ``data_timeout``)."""
        if self.phase is not Phase.CLOSED:
            self._send("TIMEOUT", TIMEOUT)
            self._close("timeout")
        return self._run()

    def shutdown(self) -> list[Event]:
        """The daemon is stopping: an idle session (no transaction, nothing outstanding) is told to
        come back later and closed; a busy one is left to finish (MAIL then gets the same 421)."""
        if self.phase is Phase.NEW or (self.phase is Phase.COMMAND and self.tx is None and not self._in):
            self._send("CONNECT", SHUTTING_DOWN)
            self._close("draining")
        return self._run()

    def connection_lost(self) -> None:
        """The connection is gone. Gives back what is held (nothing is in flight here: an outstanding
        commit belongs to the edge, which still reports it with :meth:`message_result`, after which
        the protocol is closed)."""
        self._lost = True
        self._in.clear()
        if self.phase is not Phase.WAIT and self._reader is not None:
            self._reader.release()
            self._reader = None
        if self.phase is not Phase.WAIT:
            self.phase = Phase.CLOSED

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def current_timeout(self) -> float:
        return self.settings.data_timeout if self.phase is Phase.DATA else self.settings.command_timeout

    @property
    def idle(self) -> bool:
        """Between commands with nothing outstanding (used by the edge to decide about EOF and drain)."""
        return self.phase is Phase.COMMAND and not self._in

    # --- the loop -------------------------------------------------------------------------
    def _run(self) -> list[Event]:
        """Interpret buffered input as far as the state allows; return the events raised."""
        while True:
            if self.phase is Phase.DATA:
                if not self._in:
                    break
                rest = bytes(self._in)
                self._in.clear()
                self._feed_data(rest)
                continue
            if self.phase not in (Phase.COMMAND, Phase.AUTH):
                break
            line = self._next_line()
            if line is None:
                break
            self.progress += 1
            if self.phase is Phase.AUTH:
                self._auth_line(line)
            else:
                self._command(line)
        if self._eof and self.phase in (Phase.NEW, Phase.COMMAND, Phase.AUTH, Phase.DATA):
            # Everything complete has been answered; a partial command or payload is dropped.
            self._close("client_eof")
        events, self._events = self._events, []
        return events

    def _next_line(self) -> bytes | None:
        buf = self._in
        while True:
            i = buf.find(b"\n")
            if self._discarding:
                if i < 0:
                    buf.clear()
                    return None
                del buf[:i + 1]
                self._discarding = False
                self.progress += 1
                if self.phase is Phase.AUTH:
                    self.phase, self._auth_step = Phase.COMMAND, None
                    self._send("AUTH", "500 5.5.6 Authentication exchange line is too long")
                else:
                    self._send("UNKNOWN", "500 5.5.2 Line too long")
                if self.phase is Phase.CLOSED:
                    return None
                continue
            if i < 0:
                if len(buf) > self._max_line:
                    self._discarding = True
                    continue
                return None
            if i + 1 > self._max_line:
                self._discarding = True
                continue
            line = bytes(buf[:i + 1])
            del buf[:i + 1]
            return line

    def _feed_data(self, data: bytes) -> None:
        reader = self._reader
        assert reader is not None
        used = reader.feed(data)
        if used is None:
            return
        if used < len(data):
            self._in += data[used:]  # pipelined commands after the dot (the buffer was empty)
        self.progress += 1
        body, problem = reader.result()
        tx = self.tx
        self.tx = None
        assert tx is not None
        if problem is not None:
            reader.release()
            self._reader = None
            self.phase = Phase.COMMAND
            self._send("DATA", problem)
            return
        assert body is not None
        self.phase = Phase.WAIT
        self._events.append(MessageReceived(mail_from=tx.mail_from, recipients=tuple(tx.rcpts),
                                            local=tuple(tx.local), body=body, smtputf8=tx.smtputf8))

    def _talked_first(self) -> list[Event]:
        """Bytes before our 220. The client must wait for the greeting (RFC 5321 §3.1, §4.3.1); one
        that does not is a spambot (Postfix postscreen's pregreet test): refused and closed. Only
        possible while the edge holds the greeting back (``listeners[].greet_delay``)."""
        self._send("CONNECT", PREGREET, counts=False)
        self._close("pregreet")
        return self._run()

    # --- replies --------------------------------------------------------------------------
    def _send(self, command: str, r: Reply | str, *, counts: bool = True) -> None:
        text = str(r)
        code = text[:3]
        self.hooks.on_reply(command, code[0])
        self._out += text.encode("utf-8", "replace") + CRLF
        if counts and code[0] in "45" and code != "421":
            self._error(command, text)

    def _error(self, command: str, what: str) -> None:
        f = self.facts
        f.errors += 1
        if len(f.rejections) < 5:
            f.rejections.append(f"{command}: {what}")
        if f.errors >= self.settings.max_errors and self.phase is not Phase.CLOSED:
            self._send(command, "421 4.7.0 Too many errors, closing connection")
            self._close("too_many_errors")

    def _junk_command(self, command: str) -> None:
        """Answered as usual; past the limit it also counts as an error."""
        self._junk += 1
        if self._junk > self.settings.max_junk_commands:
            self._error(command, "too many commands that move no mail")

    def _close(self, end: str) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self._reader is not None and self.phase is not Phase.WAIT:
            self._reader.release()
            self._reader = None
        self.phase = Phase.CLOSED
        self._in.clear()
        self._events.append(Close(end))

    # --- commands -------------------------------------------------------------------------
    def _command(self, raw: bytes) -> None:
        self.facts.commands += 1
        line = raw.rstrip(b"\r\n")
        # The verb ends at a space or, as Postfix takes it, a tab ("EHLO\tclient").
        cut = min((i for i in (line.find(b" "), line.find(b"\t")) if i >= 0), default=len(line))
        verb, arg = line[:cut], line[cut + 1:]
        try:
            cmd = verb.decode("ascii").upper()
            text = arg.decode("utf-8", "surrogateescape").strip()
        except UnicodeDecodeError:
            self._send("UNKNOWN", "500 5.5.2 Error: bad syntax")
            return
        handler = _COMMANDS.get(cmd)
        if handler is None:
            if cmd in HTTP_METHODS:
                self._send(cmd, NOT_SMTP, counts=False)
                self._close("non_smtp")
                return
            self._send("UNKNOWN", "500 5.5.2 Error: command not recognized")
            return
        handler(self, text)

    def _helo(self, cmd: str, arg: str, esmtp: bool) -> None:
        f = self.facts
        if not arg:
            self._send(cmd, f"501 5.5.4 Syntax: {cmd} hostname")
            return
        # RFC 5321 §4.1.1.1 wants one domain, but devices send their machine name ("EHLO Front Desk
        # PC"): taken whole, as Postfix does. The name is only recorded (Received: keeps its
        # printable characters), never trusted.
        repeated = f.helo is not None  # not after STARTTLS: TLS forgets the first (RFC 3207 §4.2)
        f.helo, f.esmtp = " ".join(arg.split()), esmtp
        self.tx = None
        s = self.settings
        if not esmtp:
            self._send(cmd, f"250 {s.hostname}")
            if repeated:
                self._junk_command(cmd)
            return
        lines = [s.hostname, "PIPELINING", f"SIZE {s.max_message_size}", "8BITMIME", "SMTPUTF8",
                 "ENHANCEDSTATUSCODES"]
        if s.tls_mode == "starttls" and not f.tls:
            lines.append("STARTTLS")
        if s.auth_offered and f.tls:
            lines.append("AUTH PLAIN LOGIN")
        self._send(cmd, "\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}")
        if repeated:
            self._junk_command(cmd)

    def cmd_HELO(self, arg: str) -> None:
        self._helo("HELO", arg, esmtp=False)

    def cmd_EHLO(self, arg: str) -> None:
        self._helo("EHLO", arg, esmtp=True)

    def cmd_STARTTLS(self, arg: str) -> None:
        f = self.facts
        if arg:
            self._send("STARTTLS", "501 5.5.4 Syntax: STARTTLS")
        elif f.tls:
            self._send("STARTTLS", "503 5.5.1 TLS already active")
        elif self.settings.tls_mode != "starttls":
            self._send("STARTTLS", "502 5.5.1 STARTTLS not available")
        else:
            # RFC 3207 §5 / CVE-2011-0411: anything pipelined after STARTTLS is plaintext injection.
            self._in.clear()
            self._send("STARTTLS", "220 2.0.0 Ready to start TLS")
            self.phase = Phase.WAIT
            self._events.append(StartTls())

    def cmd_AUTH(self, arg: str) -> None:
        f = self.facts
        if not self.settings.auth_offered:
            self._send("AUTH", "502 5.5.1 AUTH not available on this port")
            return
        if not f.tls:
            self._send("AUTH", STARTTLS_FIRST)
            return
        if not f.esmtp:
            self._send("AUTH", "503 5.5.1 Error: send EHLO first")
            return
        if f.user is not None:
            self._send("AUTH", "503 5.5.1 Already authenticated")
            return
        if self.tx is not None:
            self._send("AUTH", "503 5.5.1 AUTH not permitted during a mail transaction")
            return
        if self.hooks.auth_locked(f.peer_ip):
            self._send("AUTH", AUTH_THROTTLED)
            self._close("auth_throttled")
            return
        parts = arg.split()
        if not parts or len(parts) > 2:
            self._send("AUTH", "501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mech = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mech == "PLAIN":
            if initial is None:
                self._auth_step = "plain"
                self.phase = Phase.AUTH
                self._send("AUTH", "334 ")
            elif initial == "=":
                self._auth_plain(b"")
            else:
                raw = self._b64(initial)
                if raw is not None:
                    self._auth_plain(raw)
        elif mech == "LOGIN":
            if initial is None:
                self._auth_step = "login-user"
                self.phase = Phase.AUTH
                self._send("AUTH", "334 VXNlcm5hbWU6")  # "Username:"
            else:
                user = self._b64(initial)
                if user is not None:
                    self._auth_user = user
                    self._auth_step = "login-pass"
                    self.phase = Phase.AUTH
                    self._send("AUTH", "334 UGFzc3dvcmQ6")  # "Password:"
        else:
            self._send("AUTH", "504 5.5.4 Unrecognized authentication type")

    def _auth_line(self, raw: bytes) -> None:
        """One AUTH continuation line (RFC 4954 §4)."""
        self.phase = Phase.COMMAND
        step, self._auth_step = self._auth_step, None
        line = raw.strip()
        if line == b"*":
            self._send("AUTH", "501 5.7.0 Authentication aborted")
            return
        data = self._b64(line)
        if data is None:
            return
        if step == "plain":
            self._auth_plain(data)
        elif step == "login-user":
            self._auth_user = data
            self._auth_step = "login-pass"
            self.phase = Phase.AUTH
            self._send("AUTH", "334 UGFzc3dvcmQ6")
        else:
            self._request_auth("LOGIN", self._auth_user, data)

    def _b64(self, data: bytes | str) -> bytes | None:
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            self._send("AUTH", "501 5.5.2 Cannot decode base64 response")
            return None

    def _auth_plain(self, raw: bytes) -> None:
        parts = raw.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            self._send("AUTH", "501 5.5.2 Malformed PLAIN response")
            return
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            # We do not support acting as another identity (RFC 4616 §2 authorization identity).
            password = b"\0invalid-authzid\0" + password
        self._request_auth("PLAIN", authcid, password)

    def _request_auth(self, mech: str, user: bytes, password: bytes) -> None:
        self.phase = Phase.WAIT
        self._events.append(AuthRequest(mech, user, password))

    def cmd_MAIL(self, arg: str) -> None:
        f = self.facts
        if f.helo is None:
            self._send("MAIL", "503 5.5.1 Error: send HELO/EHLO first")
            return
        if self.hooks.draining():
            self._send("MAIL", SHUTTING_DOWN)
            self._close("draining")
            return
        if self.settings.submission and f.user is None:
            self._send("MAIL", STARTTLS_FIRST if not f.tls and self.settings.tls_mode == "starttls"
                       else AUTH_REQUIRED)
            return
        if self.tx is not None:
            self._send("MAIL", "503 5.5.1 Error: nested MAIL command")
            return
        if arg[:5].upper() != "FROM:":
            self._send("MAIL", "501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        try:
            sender, rest = parse_command_path(arg[5:], allow_null=True, utf8=True)
            opts = parse_params(rest, f.esmtp)
        except AddressError as e:
            self._send("MAIL", address_refusal(e, sender=True))
            return
        except ValueError as e:
            self._send("MAIL", f"{501 if isinstance(e, ParamSyntaxError) else 555} 5.5.4 {e}")
            return
        smtputf8 = "SMTPUTF8" in opts
        path_text = arg[5:arg.rfind(rest)] if rest else arg[5:]
        if not smtputf8 and not path_text.isascii():
            # RFC 6531 §3.4: a non-ASCII local part or domain needs SMTPUTF8. The mailbox's domain
            # is in A-labels by now (bücher.de is xn--bcher-kva.de), so the command's text decides.
            self._send("MAIL", "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter")
            return
        if opts.get("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
            self._send("MAIL", "501 5.5.4 BODY must be 7BIT or 8BITMIME")
            return
        size: int | None = None
        if "SIZE" in opts:
            # RFC 1870 §3: size-value = 1*20DIGIT, ASCII ("²".isdigit() is true, int() refuses it).
            if not (opts["SIZE"].isascii() and opts["SIZE"].isdigit() and len(opts["SIZE"]) <= 20):
                self._send("MAIL", "501 5.5.4 SIZE takes a number")
                return
            size = int(opts["SIZE"])
        facts = self._facts()
        # The size limit first: a declared size over it is the client's problem (552 5.3.4), not a
        # lack of disk space here (RFC 1870 §6.1).
        refusal = self.hooks.policy.check_mail(facts, sender, size) or self.hooks.policy.check_rate(facts)
        if refusal is None:
            try:
                self.hooks.check_space(size or 0)
            except SpoolError as e:
                refusal = reply_for(e)
        if refusal is not None:
            self._send("MAIL", refusal)
            return
        self.tx = Transaction(mail_from=str(sender) if sender else "", sender=sender, smtputf8=smtputf8)
        self._declared = size or 0
        self._send("MAIL", "250 2.1.0 Ok")

    def cmd_RCPT(self, arg: str) -> None:
        f = self.facts
        tx = self.tx
        if tx is None:
            self._send("RCPT", "503 5.5.1 Error: need MAIL command")
            return
        if arg[:3].upper() != "TO:":
            self._send("RCPT", "501 5.5.4 Syntax: RCPT TO:<address>")
            return
        try:
            rcpt, rest = parse_command_path(arg[3:], allow_null=False, utf8=tx.smtputf8,
                                            postmaster_domain=self.hooks.policy.postmaster_domain)
            parse_params(rest, f.esmtp, allowed=())
        except AddressError as e:
            tx.refused_rcpts += 1
            self._send("RCPT", address_refusal(e, sender=False))
            return
        except ValueError as e:
            tx.refused_rcpts += 1
            self._send("RCPT", f"{501 if isinstance(e, ParamSyntaxError) else 555} 5.5.4 {e}")
            return
        assert rcpt is not None
        address = str(rcpt)  # the domain is normalised (lowercase, no trailing dot)
        if address in tx.rcpts:
            # The same mailbox twice (a@x, a@X): one delivery, and the client is told it is fine.
            self._send("RCPT", "250 2.1.5 Ok (duplicate recipient)")
            self._overshoot(tx)
            return
        refusal, local = self.hooks.policy.check_rcpt(self._facts(), f.trusted, rcpt, len(tx.rcpts))
        if refusal is not None:
            tx.refused_rcpts += 1
            if refusal == SUPPRESSED:
                self.hooks.on_suppressed()
            self._send("RCPT", refusal, counts=refusal not in _NOT_ERRORS)
            if refusal == TOO_MANY_RCPTS:
                self._overshoot(tx)
            return
        tx.rcpts.append(address)
        tx.local.append(local)
        self._send("RCPT", "250 2.1.5 Ok")

    def _overshoot(self, tx: Transaction) -> None:
        tx.overshoot += 1
        if tx.overshoot > self.settings.max_recipient_overshoot:
            self._error("RCPT", "too many recipients that add nothing")

    def cmd_DATA(self, arg: str) -> None:
        tx = self.tx
        if arg:
            self._send("DATA", "501 5.5.4 Syntax: DATA")
            return
        if tx is None:
            self._send("DATA", "503 5.5.1 Error: need MAIL command")
            return
        if not tx.rcpts:
            self._send("DATA", "554 5.5.1 Error: no valid recipients" if tx.refused_rcpts
                       else "503 5.5.1 Error: need RCPT command")
            return
        budget = self.hooks.budget
        if budget is not None and not budget.admits(self._declared):
            # Not the client's fault: a temporary refusal that does not count as a session error.
            self._send("DATA", NO_MEMORY_AT_DATA, counts=False)
            return
        s = self.settings
        self._reader = DotReader(s.max_message_size, s.max_line_length, budget)
        self.phase = Phase.DATA
        self._send("DATA", "354 End data with <CR><LF>.<CR><LF>")

    def cmd_RSET(self, arg: str) -> None:
        if arg:
            self._send("RSET", "501 5.5.4 Syntax: RSET")
            return
        self.tx = None
        self._send("RSET", "250 2.0.0 Ok")
        self._junk_command("RSET")

    def cmd_NOOP(self, arg: str) -> None:
        self._send("NOOP", "250 2.0.0 Ok")
        self._junk_command("NOOP")

    def cmd_QUIT(self, arg: str) -> None:
        self._send("QUIT", "221 2.0.0 Bye")
        self._close("quit")

    def cmd_VRFY(self, arg: str) -> None:
        if not arg:  # RFC 5321 §4.1.1.6: the argument is required
            self._send("VRFY", "501 5.5.4 Syntax: VRFY address")
            return
        # RFC 5321 §3.5.3: 252 when we will not say whether a mailbox exists.
        self._send("VRFY", "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery")
        self._junk_command("VRFY")

    def cmd_EXPN(self, arg: str) -> None:
        self._send("EXPN", "502 5.5.1 EXPN not supported")

    def cmd_HELP(self, arg: str) -> None:
        self._send("HELP", "214 2.0.0 See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT "
                           "STARTTLS AUTH VRFY")
        self._junk_command("HELP")

    def _facts(self) -> Facts:
        f = self.facts
        return Facts(peer_ip=f.peer_ip, tls=f.tls, user=f.user)


_COMMANDS: dict[str, Callable[[ServerProtocol, str], None]] = {
    name[4:]: fn for name, fn in vars(ServerProtocol).items() if name.startswith("cmd_") and callable(fn)
}

_MAIL_PARAMS = ("SIZE", "BODY", "SMTPUTF8", "AUTH")


class ParamSyntaxError(ValueError):
    """The text after the path is no parameter list at all (501, not 555)."""


def parse_params(rest: str, esmtp: bool, allowed: tuple[str, ...] = _MAIL_PARAMS) -> dict[str, str]:
    """ESMTP parameters (RFC 5321 §4.1.2 esmtp-param) as an upper-cased dict. Raises ValueError
    for anything we do not advertise (555 per §4.1.1.11)."""
    if rest and rest[0] not in " \t":  # "<a@b>x": junk glued to the path, not a parameter
        raise ParamSyntaxError("a parameter must follow the address after a space")
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
        if eq and key == "SMTPUTF8":  # RFC 6531 §3.4: a keyword without a value
            raise ValueError("SMTPUTF8 takes no value")
        out[key] = value.upper() if key == "BODY" else value
    return out
