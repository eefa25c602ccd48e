"""Delivery status notifications (bounces and delay warnings) sent to a message's envelope sender.

:func:`build_dsn` returns a complete RFC 5322 message (bytes, CRLF line endings) of type
``multipart/report; report-type=delivery-status`` (RFC 6522) with three parts:

1. ``text/plain``: a human-readable explanation, in the style of Postfix's bounce messages;
2. ``message/delivery-status`` (RFC 3464 sections 2.2 and 2.3): per-message fields, then one
   block of per-recipient fields per recipient;
3. ``text/rfc822-headers`` (RFC 6522 section 4): the header section of the original message,
   never its body (left out when the original has no header section at all).

The MIME text is written by hand rather than with :mod:`email.generator`, which re-folds and
re-encodes ``message/delivery-status`` bodies; the format is fixed, so this stays small. Every
value that comes from outside (remote replies, host names, addresses, the original headers) is
stripped of CR/LF and other control characters before it is written, so a hostile SMTP reply
cannot inject header fields or MIME structure.
"""

from __future__ import annotations

import base64
import re
import secrets
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import quoprimime
from email.utils import format_datetime, formataddr, make_msgid

__all__ = ["DsnRecipient", "build_dsn"]

CRLF = "\r\n"
# RFC 5322 section 2.1.1: lines MUST be at most 998 characters, SHOULD be at most 78.
MAX_LINE = 998
FOLD_WIDTH = 78
# Remote replies are truncated to this many characters (Postfix keeps about as much).
MAX_DIAGNOSTIC = 900
# At most this much of the original header section is returned (Postfix: header_size_limit).
MAX_HEADER_BYTES = 64 * 1024

ACTIONS = ("failed", "delayed")
SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
}

_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_STATUS_IN_TEXT = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
_SMTP_REPLY = re.compile(r"^[2-5]\d\d(?:[ -]|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# RFC 5322 section 2.2: field name, then a colon (obsolete syntax allows space before it).
_HEADER_FIELD = re.compile(rb"^[!-9;-~]+[ \t]*:")


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    """One recipient the notification is about (RFC 3464 section 2.3).

    ``status`` is the enhanced status code (RFC 3463, ``"5.1.1"``); ``diagnostic`` the remote
    reply (``"550 5.1.1 <x@y>: user unknown"``) or our own explanation, may be empty;
    ``remote_mta`` the host that gave the reply, ``""`` when none did; ``last_attempt`` an
    epoch timestamp.
    """

    address: str
    status: str
    diagnostic: str
    remote_mta: str
    last_attempt: float
    stage: str = ""
    """The command the remote's reply answered (``"RCPT TO"``), for the human-readable part."""


def build_dsn(
    *,
    reporting_mta: str,
    to: str,
    original: bytes,
    queue_id: str,
    arrival_date: float,
    action: str,
    now: float,
    recipients: Sequence[DsnRecipient],
    envelope_id: str | None = None,
) -> bytes:
    """Build a DSN for ``recipients`` of the message ``original`` (RFC 3464, RFC 6522).

    ``action`` is ``"failed"`` (a bounce) or ``"delayed"`` (a warning); ``to`` is the original
    envelope sender, which receives the DSN (the caller sends it with a null reverse-path,
    RFC 3464 section 2). ``original`` is the message as spooled (CRLF or LF, possibly 8-bit,
    possibly garbage): only its header section is returned. ``envelope_id`` is the RFC 3461
    ENVID, xtext-decoded. Raises :class:`ValueError` for an unknown action, an empty ``to``
    or no recipients (all programming errors: a DSN always reports on someone, to someone).
    """
    if action not in ACTIONS:
        raise ValueError(f"DSN action must be one of {ACTIONS}, not {action!r}")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient (RFC 3464 section 2.3)")
    host = _hostname(reporting_mta) or "localhost"
    sender = _clean(to).strip("<>")
    if not sender:
        raise ValueError("a DSN is never sent to the null reverse-path (RFC 3464 section 2)")

    boundary = f"=_mailrelayd_{secrets.token_hex(12)}"  # "=_" never occurs in QP or base64 text
    headers_part = _headers_part(original)
    parts = [
        _text_part(host, action, recipients, with_headers=headers_part is not None),
        _status_part(host, queue_id, arrival_date, action, now, recipients, envelope_id),
    ]
    if headers_part is not None:
        parts.append(headers_part)

    top = [
        ("From", formataddr(("Mail Delivery System", f"MAILER-DAEMON@{host}"))),
        ("To", f"<{sender}>"),
        ("Subject", SUBJECTS[action]),
        ("Date", _date(now, now)),
        ("Message-ID", make_msgid(domain=host)),
        ("Auto-Submitted", "auto-replied"),  # RFC 3834 section 5
        ("MIME-Version", "1.0"),
        ("Content-Type", f'multipart/report; report-type=delivery-status;\r\n boundary="{boundary}"'),
    ]
    out = bytearray()
    for name, value in top:
        out += f"{name}: {value}{CRLF}".encode()
    out += CRLF.encode()
    out += f"This is a MIME-encapsulated message.{CRLF}".encode()
    for part in parts:
        out += f"{CRLF}--{boundary}{CRLF}".encode()
        out += part
    out += f"{CRLF}--{boundary}--{CRLF}".encode()
    return bytes(out)


# --- parts -----------------------------------------------------------------------------------


def _text_part(host: str, action: str, recipients: Sequence[DsnRecipient], *, with_headers: bool) -> bytes:
    """Part 1 (RFC 6522 section 3): the human-readable explanation."""
    lines = [f"This is the mail system at host {host}.", ""]
    if action == "failed":
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients.",
        ]
    else:
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered yet to one or more recipients.",
            "The mail system will keep trying to deliver it; you will be notified",
            "again only if delivery finally fails.",
        ]
    if with_headers:
        lines.append("The headers of your message are attached below.")
    lines += [
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report.",
        "",
        "                   The mail system",
        "",
    ]
    for r in recipients:
        address = _clean(r.address)
        diagnostic = _diagnostic(r.diagnostic)
        remote = _hostname(r.remote_mta)
        if diagnostic and remote and _SMTP_REPLY.match(diagnostic):
            # Postfix's wording; the reply is quoted once (it is also the Diagnostic-Code).
            entry = f"<{address}>: host {remote} said: {diagnostic}"
            if r.stage:
                entry += f" (in reply to {_clean(r.stage)} command)"
        elif diagnostic:
            entry = f"<{address}>: {diagnostic}"
        else:
            entry = f"<{address}>: delivery status {_status(r, action)}"
        lines += textwrap.wrap(
            entry, width=76, subsequent_indent="    ", break_long_words=False, break_on_hyphens=False
        )
        lines.append("")
    text = CRLF.join(_split_long(line) for line in lines).rstrip()
    if text.isascii():
        head = "Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n"
        body = text
    else:  # a non-ASCII address or reply: UTF-8, quoted-printable keeps the part 7-bit
        head = "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        body = quoprimime.body_encode(text.encode("utf-8").decode("latin-1"), maxlinelen=76, eol=CRLF)
    return (f"Content-Description: Notification\r\n{head}\r\n{body}\r\n").encode("ascii")


def _status_part(
    host: str,
    queue_id: str,
    arrival_date: float,
    action: str,
    now: float,
    recipients: Sequence[DsnRecipient],
    envelope_id: str | None,
) -> bytes:
    """Part 2: ``message/delivery-status`` (RFC 3464 section 2.1: 7-bit, blocks of fields)."""
    # RFC 3464 section 2.2: per-message fields.
    fields = [_field("Reporting-MTA", f"dns; {host}"), _field("X-Mailrelayd-Queue-ID", _ascii(queue_id))]
    if envelope_id:
        fields.append(_field("Original-Envelope-Id", _ascii(envelope_id)))  # section 2.2.1
    fields.append(_field("Arrival-Date", _date(arrival_date, now)))  # section 2.2.5
    blocks = [fields]
    # RFC 3464 section 2.3: one block of per-recipient fields per recipient.
    for r in recipients:
        block = [
            _field("Final-Recipient", _address_field(r.address)),  # 2.3.2
            _field("Action", action),  # 2.3.3
            _field("Status", _status(r, action)),  # 2.3.4
        ]
        remote = _hostname(r.remote_mta)
        if remote:
            block.append(_field("Remote-MTA", f"dns; {remote}"))  # 2.3.5
        diagnostic = _ascii(_diagnostic(r.diagnostic))
        if diagnostic:
            # 2.3.6: "smtp" for a remote reply; our own explanations get an X- type, as
            # Postfix's "X-Postfix;" ones do.
            kind = "smtp" if _SMTP_REPLY.match(diagnostic) else "X-Mailrelayd"
            block.append(_field("Diagnostic-Code", f"{kind}; {diagnostic}"))
        block.append(_field("Last-Attempt-Date", _date(r.last_attempt, now)))  # 2.3.7
        blocks.append(block)
    body = (CRLF + CRLF).join(CRLF.join(block) for block in blocks)
    head = "Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n"
    return f"{head}\r\n{body}\r\n".encode("ascii")


def _headers_part(original: bytes) -> bytes | None:
    """Part 3: the original header section as ``text/rfc822-headers`` (RFC 6522 section 4).

    Never the body. 7-bit when the headers are plain ASCII with legal line lengths, otherwise
    base64 (8-bit RFC 6532 headers or raw Latin-1 would need 8BITMIME all the way back).
    """
    block = _header_section(original)
    if not block:
        return None
    lines = block.split(b"\n")
    desc = "Content-Description: Undelivered Message Headers\r\n"
    if block.isascii() and b"\x00" not in block and all(len(line) <= MAX_LINE for line in lines):
        return (desc + "Content-Type: text/rfc822-headers\r\n\r\n").encode() + b"\r\n".join(lines) + b"\r\n"
    crlf = b"\r\n".join(lines) + b"\r\n"
    try:
        crlf.decode("utf-8")
        ctype = "Content-Type: text/rfc822-headers; charset=utf-8\r\n"
    except UnicodeDecodeError:
        ctype = "Content-Type: text/rfc822-headers; charset=unknown-8bit\r\n"  # RFC 1428
    encoded = base64.encodebytes(crlf).replace(b"\n", b"\r\n")
    return (desc + ctype + "Content-Transfer-Encoding: base64\r\n\r\n").encode() + encoded


def _header_section(original: bytes) -> bytes:
    """The leading header fields of ``original`` (LF line endings, no trailing newline).

    Stops at the first empty line (RFC 5322 section 2.1), at the first line that is neither a
    field nor a continuation (garbage, or a message without a separator), or at
    :data:`MAX_HEADER_BYTES` (cut at a field boundary).
    """
    if not isinstance(original, bytes | bytearray):
        return b""
    data = bytes(original[: MAX_HEADER_BYTES + MAX_LINE * 4])
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    kept: list[bytes] = []
    size = 0
    field_start = 0  # index in kept of the current field's first line
    for line in data.split(b"\n"):
        if line[:1] in (b" ", b"\t") and kept:
            if not line.strip():
                break  # a whitespace-only line ends the header section in practice
        elif not _HEADER_FIELD.match(line):
            break
        else:
            field_start = len(kept)
        size += len(line) + 1
        if size > MAX_HEADER_BYTES:
            del kept[field_start:]  # never return half a field
            break
        kept.append(line)
    return b"\n".join(kept)


# --- values -----------------------------------------------------------------------------


def _clean(value: str) -> str:
    """``value`` on one line: control characters (CR, LF, NUL, TAB...) become single spaces, and a
    lone surrogate (undecodable bytes kept with ``surrogateescape``) a "?": it cannot be encoded."""
    text = str(value)
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return " ".join(_CONTROL.sub(" ", text).split())


def _ascii(value: str) -> str:
    """:func:`_clean`, then non-ASCII characters replaced (delivery-status is 7-bit)."""
    return _clean(value).encode("ascii", "replace").decode("ascii")


def _hostname(value: str) -> str:
    """A host name for ``dns;`` fields and the From domain: one token, ASCII (IDNA when needed)."""
    cleaned = _clean(value).split(" ")[0].strip("<>;")
    if not cleaned.isascii():
        try:
            cleaned = cleaned.encode("idna").decode("ascii")
        except UnicodeError:
            cleaned = cleaned.encode("ascii", "replace").decode("ascii")
    return cleaned[:255]


def _diagnostic(value: str) -> str:
    """A remote reply on one line, truncated to :data:`MAX_DIAGNOSTIC` characters."""
    cleaned = _clean(value)
    if len(cleaned) > MAX_DIAGNOSTIC:
        cleaned = cleaned[: MAX_DIAGNOSTIC - 3].rstrip() + "..."
    return cleaned


def _status(r: DsnRecipient, action: str) -> str:
    """RFC 3464 section 2.3.4 / RFC 3463: a valid ``class.subject.detail`` code, always."""
    status = _clean(r.status)
    if _STATUS.match(status):
        return status
    found = _STATUS_IN_TEXT.search(_clean(r.diagnostic)[:64])
    if found:
        return found.group(1)
    return "5.0.0" if action == "failed" else "4.0.0"


def _address_field(address: str) -> str:
    """Final-Recipient value: ``rfc822; addr``, or RFC 6533 section 3 ``utf-8; addr`` in its
    7-bit utf-8-addr-xtext form (non-ASCII, ``\\``, ``+``, ``=`` and controls as ``\\x{HEX}``)."""
    cleaned = _clean(address).strip("<>")
    if cleaned.isascii():
        return f"rfc822; {cleaned}"
    encoded = "".join(ch if 0x21 <= ord(ch) <= 0x7E and ch not in "\\+=" else f"\\x{{{ord(ch):X}}}" for ch in cleaned)
    return f"utf-8; {encoded}"


def _date(timestamp: float, fallback: float) -> str:
    """RFC 5322 section 3.3 date-time in UTC (``+0000``); ``fallback`` for a bad timestamp."""
    for value in (timestamp, fallback, 0.0):
        try:
            return format_datetime(datetime.fromtimestamp(float(value), tz=UTC))
        except (OverflowError, OSError, ValueError, TypeError):
            continue
    return "Thu, 01 Jan 1970 00:00:00 +0000"


def _field(name: str, value: str) -> str:
    """``Name: value`` folded at whitespace to :data:`FOLD_WIDTH` where possible (RFC 5322
    section 2.2.3); a run without whitespace longer than a line allows is split hard."""
    line = f"{name}: {value}"
    if len(line) <= FOLD_WIDTH:
        return line
    out: list[str] = []
    current = f"{name}:"
    for word in value.split(" "):
        if not word:
            continue
        if len(current) + 1 + len(word) > FOLD_WIDTH and current != f"{name}:":
            out.append(current)
            current = ""
        current = f"{current} {word}"
        while len(current) > MAX_LINE:
            out.append(current[:MAX_LINE])
            current = " " + current[MAX_LINE:]
    out.append(current)
    return CRLF.join(out)


def _split_long(line: str) -> str:
    """Hard-split a text line longer than :data:`MAX_LINE` (only absurd input gets here)."""
    if len(line) <= MAX_LINE:
        return line
    return CRLF.join(line[i : i + MAX_LINE] for i in range(0, len(line), MAX_LINE))
