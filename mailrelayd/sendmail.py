"""The ``sendmail`` command line (what cron, PHP ``mail()`` and scripts call) and the message
preparation shared by the local submission paths.

Pure functions: argument parsing as Postfix's sendmail(1) does it, and the envelope/header work
(``-t`` recipients from To/Cc/Bcc with Bcc removed, ``-f``/``-F``, ``-f '<>'`` for the null sender,
bare local parts qualified with a domain). The CLI (:mod:`mailrelayd.cli`) reads standard input and
hands the request to the daemon through the admin socket, or leaves it in the maildrop directory
when the daemon is down.
The HTTP API uses :func:`prepare` for ``message/rfc822`` bodies too.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mailrelayd.smtp.address import header_addresses

# sysexits.h
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_NOPERM = 77

# Options that take a value (as the next argument or glued: "-fuser@x" / "-f user@x").
_WITH_VALUE = set("fFrBNRVXCLhOo")
# Flags accepted and ignored, as Postfix does (delivery mode, error mode, verbosity...).
_IGNORED_PREFIXES = ("-od", "-oe", "-oo", "-om", "-oQ", "-ob", "-oA", "-oL", "-oR", "-oT", "-U", "-n", "-v")
# Postfix sendmail(1) "(ignored)" options without a value: -Ac/-Am (which configuration file: we have
# one), -G (gateway submission: we complete headers either way), -m (me too: backwards compatibility).
_IGNORED_FLAGS = frozenset({"-Ac", "-Am", "-G", "-m"})
# -q with an interval: "(ignored)" in Postfix, which runs its queue by itself (queue_run_delay), as
# our daemon does; what follows is the usual reading of a message from standard input.
_QUEUE_INTERVAL_RE = re.compile(r"-q(?:\d+[smhdw]?)+")
_HEADER_RE = re.compile(rb"^([!-9;-~]+):")
# Not allowed in a -F full name: a CR or LF would end the From header it goes into (and start another).
_CONTROL = frozenset(map(chr, [*range(0x20), 0x7F])) - {"\t"}


class UsageError(ValueError):
    """Bad command line (exit EX_USAGE)."""


class PrepareError(ValueError):
    """The message or envelope is unusable (exit EX_DATAERR / EX_NOUSER)."""

    def __init__(self, message: str, exit_code: int = EX_DATAERR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class SendmailArgs:
    recipients: list[str] = field(default_factory=list)
    extract: bool = False  # -t
    dot_ends: bool = True  # cleared by -i / -oi
    sender: str | None = None  # -f / -r; "" is the null reverse-path (-f '<>' or -f '')
    full_name: str | None = None  # -F
    config: str | None = None  # -C: our config file (Postfix: its configuration directory)

    def request(self, data: bytes, login: str) -> dict[str, Any]:
        """What is sent to the daemon (JSON; ``data`` base64-encoded by the caller)."""
        return {"recipients": self.recipients, "extract": self.extract, "sender": self.sender,
                "full_name": self.full_name, "login": login}


def parse_args(argv: Sequence[str]) -> SendmailArgs:
    """Parse sendmail(1) arguments. Raises UsageError for modes other than -bm (deliver)."""
    a = SendmailArgs()
    i = 0
    args = list(argv)
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            a.recipients.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            a.recipients.append(arg)
            continue
        if arg in ("-i", "-oi"):
            a.dot_ends = False
            continue
        if arg == "-t":
            a.extract = True
            continue
        if arg.startswith("-b"):
            if arg != "-bm":
                raise UsageError(f"mode {arg} is not supported (only -bm, delivering a message, is)")
            continue
        if re.fullmatch(r"-[tiv]+", arg):  # combined flags: -ti (before the ignored "-v", or -vi loses its -i)
            a.extract = a.extract or "t" in arg
            a.dot_ends = a.dot_ends and "i" not in arg
            continue
        if arg in _IGNORED_FLAGS or _QUEUE_INTERVAL_RE.fullmatch(arg):
            continue
        if arg.startswith("-q"):
            raise UsageError(f"{arg}: running the queue is `mailrelayd queue flush` (the daemon runs it by itself)")
        if arg.startswith(_IGNORED_PREFIXES) and arg[1] not in "fFr":
            continue
        opt = arg[1]
        if opt in _WITH_VALUE:
            value = arg[2:]
            if not value:
                if i >= len(args):
                    raise UsageError(f"option -{opt} needs a value")
                value = args[i]
                i += 1
            if opt in "fr":
                a.sender = sender_value(value)
            elif opt == "F":
                a.full_name = value
            elif opt == "C":
                a.config = value
            continue  # -B -N -R -V -X -L -h -O -o<x>: accepted and ignored
        raise UsageError(f"unknown option {arg}")
    out: list[str] = []
    for r in a.recipients:
        out.extend(x.strip() for x in r.split(",") if x.strip())
    a.recipients = out
    return a


def read_message(raw: bytes, dot_ends: bool) -> bytes:
    """Standard input as a CRLF message. Without -i a line with a single "." ends it (and the
    rest is ignored), as sendmail does. A first line "From sender date" (the mbox separator,
    which programs that write mbox files leave on) is dropped, as Postfix's sendmail drops it:
    it is no header field, and would push the whole header into the body."""
    lines = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if lines and lines[0].startswith(b"From "):
        lines.pop(0)
    if dot_ends:
        try:
            lines = lines[: lines.index(b".")]
        except ValueError:
            pass
    return b"".join(line + b"\r\n" for line in lines)


@dataclass(frozen=True)
class Prepared:
    mail_from: str
    recipients: tuple[str, ...]
    data: bytes


def _fields(head: bytes) -> list[bytes]:
    """The header block as a list of whole (possibly folded) fields, CRLF-terminated."""
    out: list[bytes] = []
    for line in head.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += line + b"\r\n"
        else:
            out.append(line + b"\r\n")
    return out


def _name(f: bytes) -> bytes:
    m = _HEADER_RE.match(f)
    return m.group(1).lower() if m else b""


def _value(f: bytes) -> str:
    """The field's value unfolded, bytes that are not UTF-8 kept as lone surrogates (surrogateescape):
    a Latin-1 display name written back by :func:`_qualified_from` is the same bytes again, and an
    address with such bytes is refused (5.6.7) where it is checked, never read as another address."""
    return f.split(b":", 1)[1].decode("utf-8", "surrogateescape").replace("\r\n", "").strip()


def _split_address_list(value: str) -> list[str]:
    """The entries of an address list (To, Cc, Bcc), as written: split at the commas outside quotes,
    comments, angle and square brackets; a group's name ("team:") and its ";" are dropped."""
    out: list[str] = []
    cur: list[str] = []
    quoted, escaped, depth = False, False, 0  # depth: inside (), <> or []
    for c in value:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif not quoted and c in "(<[":
            depth += 1
        elif not quoted and c in ")>]" and depth:
            depth -= 1
        elif not quoted and not depth and c in ",;":
            out.append("".join(cur))
            cur = []
            continue
        elif not quoted and not depth and c == ":":
            cur = []  # a group's display name
            continue
        cur.append(c)
    out.append("".join(cur))
    return [e.strip() for e in out if e.strip()]


def header_recipients(values: Sequence[str], domain: str) -> list[str]:
    """The addresses of ``-t``'s To, Cc and Bcc values, bare names qualified with ``domain``. An entry
    in which no address can be read (``x@``, ``Foo <x@>``) is returned as written, so that it is
    refused and reported like a bad address given as an argument, not dropped without a word."""
    out: list[str] = []
    for value in values:
        for entry in _split_address_list(value):
            found = [qualify(a, domain) for _, a in header_addresses([entry]) if a]
            out.extend(found or [entry])
    return out


def _qualified_from(f: bytes, domain: str) -> bytes:
    """A From field whose bare names (``root (Cron Daemon)``) are qualified with ``domain``, written as
    ``Name <addr>``. A display name that is not UTF-8 (Latin-1 ``R\xe9my``, as old scripts write it) is
    read as Latin-1 and written as an ISO-8859-1 encoded word (RFC 2047): the same bytes, where
    re-encoding it as UTF-8 turned them into U+FFFD. (Raw 8-bit bytes would not pass the From
    header check, which reads the field as the receivers do.)"""
    entries = []
    for name, addr in header_addresses([_value(f)]):
        if not addr:
            continue
        addr = qualify(addr, domain)
        try:
            if not addr.isascii():  # formataddr writes ASCII addresses only
                raise UnicodeEncodeError("ascii", addr, 0, 1, "not ASCII")
            try:
                entries.append(email.utils.formataddr((name, addr)))
            except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8
                latin1 = name.encode("utf-8", "surrogateescape").decode("latin-1")
                entries.append(email.utils.formataddr((latin1, addr), charset="iso-8859-1"))
        except UnicodeEncodeError:
            raise PrepareError(f"bad address in the From header: {_value(f)[:100]!r}") from None
    return f"From: {', '.join(entries)}\r\n".encode()


def sender_value(value: str) -> str:
    """An envelope sender as given to ``-f``/``-r`` (or ``?from=`` of the HTTP API): without surrounding
    blanks and one pair of enclosing angle brackets. ``-f '<>'`` and ``-f ''`` give "", the null reverse-path that
    programs sending bounces and autoreplies ask for (sendmail(1), Postfix)."""
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    return value


def qualify(addr: str, domain: str) -> str:
    addr = addr.strip().strip("<>")
    return addr if "@" in addr or not addr else f"{addr}@{domain}"


def _envelope_sender(sender: str | None, default_sender: str | None, header_from: str, fallback_sender: str,
                     domain: str) -> str:
    """``-f`` (its "" is the null sender, kept as ""), then the configured default, then the From
    header, then login@domain (Postfix's default). Raises PrepareError when there is none."""
    if sender is not None:
        return qualify(sender_value(sender), domain)
    mail_from = qualify(default_sender or header_from or fallback_sender, domain)
    if not mail_from:
        raise PrepareError("no sender: give -f, set [sendmail] default_from, or add a From header")
    return mail_from


def _from_field(mail_from: str, full_name: str | None, domain: str) -> bytes:
    """The From header for a message without one: the sender and ``-F``'s name. For the null sender,
    ``MAILER-DAEMON@domain`` without a name, as Postfix writes it (a From is required, RFC 5322 §3.6)."""
    if not mail_from:
        return f"From: MAILER-DAEMON@{domain}\r\n".encode()
    if full_name and not _CONTROL.isdisjoint(full_name):
        raise PrepareError(f"bad full name (-F) {full_name[:100]!r}: control characters are not allowed")
    try:
        return f"From: {email.utils.formataddr((full_name or '', mail_from))}\r\n".encode()
    except UnicodeEncodeError:  # formataddr writes ASCII addresses only; argv may hold undecodable bytes
        raise PrepareError(f"cannot write a From header for sender {mail_from[:100]!r} and full name (-F) "
                           f"{(full_name or '')[:100]!r}: add a From header, or use an ASCII sender") from None


def prepare(data: bytes, *, recipients: Sequence[str], extract: bool, sender: str | None, full_name: str | None,
            domain: str, default_sender: str | None, fallback_sender: str = "") -> Prepared:
    """Envelope and header work for a locally submitted CRLF message (see module docstring)."""
    end = data.find(b"\r\n\r\n")
    if data.startswith(b"\r\n"):
        head, body = b"", data[2:]
    elif end < 0:
        # No blank line: all header if every line looks like a field, else all body.
        lines = [ln for ln in data.split(b"\r\n") if ln]
        if lines and all(_HEADER_RE.match(ln) or ln[:1] in (b" ", b"\t") for ln in lines):
            head, body = data, b""
        else:
            head, body = b"", data
    else:
        head, body = data[: end + 2], data[end + 4:]
    fields = _fields(head)
    if head and any(not _name(f) for f in fields):
        # A line that is no header field: treat everything as body (what Postfix does).
        fields, body = [], data
    rcpts = [qualify(r, domain) for r in recipients]
    if extract:
        values = [_value(f) for f in fields if _name(f) in (b"to", b"cc", b"bcc")]
        rcpts += header_recipients(values, domain)
    # Bcc is never transmitted (RFC 5322 §3.6.3).
    fields = [f for f in fields if _name(f) not in (b"bcc", b"resent-bcc")]
    froms = [f for f in fields if _name(f) == b"from"]
    header_from = ""
    new_fields = []
    for f in fields:
        if _name(f) == b"from":
            pairs = header_addresses([_value(f)])
            if any(a and "@" not in a for _, a in pairs):  # "root (Cron Daemon)": qualify it
                f = _qualified_from(f, domain)
            header_from = next((qualify(a, domain) for _, a in header_addresses([_value(f)]) if a), "")
        new_fields.append(f)
    fields = new_fields
    mail_from = _envelope_sender(sender, default_sender, header_from, fallback_sender, domain)
    if not froms:
        fields.insert(0, _from_field(mail_from, full_name, domain))
    # Bad addresses stay in: they are refused one by one where every recipient is checked, and
    # reported with the others' delivery going ahead (as SMTP's RCPT does).
    seen = dict.fromkeys(r for r in rcpts if r)
    if not seen:
        raise PrepareError("no recipients (give addresses as arguments, or -t with To/Cc/Bcc headers)", EX_NOUSER)
    return Prepared(mail_from, tuple(seen), b"".join(fields) + b"\r\n" + body)
