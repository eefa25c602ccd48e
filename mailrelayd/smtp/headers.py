"""Header work done at accept time: a fast scan of the header block (From, Sender, Message-ID,
Date) and the trace and identification fields we add (RFC 5321 §4.4, RFC 5322 §3.6)."""

from __future__ import annotations

import email.utils
import functools
import re
import time
from dataclasses import dataclass, field

from mailrelayd.config import normalize_domain
from mailrelayd.smtp.address import AddressError, Mailbox, parse_header_mailboxes


@dataclass(slots=True)
class HeaderScan:
    """What the policy needs from the header block, found without building a Message object.

    The header block ends at the first empty line or, as Postfix's cleanup(8) and the ``email``
    parser read it, at the first line that is neither a header field nor a continuation of one: a
    message that starts with ``just a body line`` has an empty header block and all of it is body.
    ``needs_separator`` is then true, and :func:`insert_fields` adds the missing empty line."""

    end: int  # offset where the header block ends: fields are inserted here
    from_values: list[str] = field(default_factory=list)
    sender_values: list[str] = field(default_factory=list)
    has_message_id: bool = False
    has_date: bool = False
    received: int = 0
    """Received fields in the header block: the hop count that stops mail loops (RFC 5321 §6.3)."""
    message_id: str = ""
    """The first Message-ID field's value, unfolded and stripped (for history, events and logs)."""
    needs_separator: bool = False  # a body follows the header block without the empty line
    unterminated: bool = False  # the header block's last line has no CRLF: insert_fields ends it first
    bare_line_end: bool = False
    """A CR or LF not part of a CRLF in the header block (RFC 5321 §2.3.8). Parsers that take either for a
    line end see other fields there than this scan does (a From where we saw a Subject)."""
    too_large: bool = False  # the header block is longer than the limit scan_headers was given
    from_parsed: list[Mailbox] | AddressError | None = None  # from_mailboxes(), once computed

    def from_mailboxes(self) -> list[Mailbox]:
        """Every mailbox in the From fields. Raises AddressError unless each is a valid mailbox."""
        got = self.from_parsed
        if got is None:  # parsed once: the header policy and the signer's From domain both ask
            try:
                got = [m for v in self.from_values for m in parse_header_mailboxes(v)]
            except AddressError as e:
                got = e
            self.from_parsed = got
        if isinstance(got, AddressError):
            raise got
        return list(got)

    def sender_mailboxes(self) -> list[Mailbox]:
        return [m for v in self.sender_values for m in parse_header_mailboxes(v)]

    def from_addresses(self) -> list[str]:
        """Every mailbox address in the From fields, or [] if one of them is not a valid mailbox."""
        try:
            return [str(m) for m in self.from_mailboxes()]
        except AddressError:
            return []

    def sender_addresses(self) -> list[str]:
        try:
            return [str(m) for m in self.sender_mailboxes()]
        except AddressError:
            return []

    @property
    def from_domain(self) -> str:
        """The author domain: that of the one From field's mailboxes when they share one, else "" (no
        guess: several From fields, an invalid one, or authors in several domains, RFC 7489 §6.6.1)."""
        if len(self.from_values) != 1:
            return ""
        try:
            domains = {m.domain for m in self.from_mailboxes()}
        except AddressError:
            return ""
        return domains.pop() if len(domains) == 1 else ""


_WATCH = {b"from": "from_values", b"sender": "sender_values"}
# RFC 5322 §3.6.8 field-name = 1*ftext (printable US-ASCII but ":"), then the colon. The obsolete form
# with spaces before the colon (§4.5.3) is not a field here: Python's email parser and others read it
# as the start of the body, and fields we insert must land in the header block for every receiver.
_FIELD = re.compile(rb"([!-9;-~]+):")


def scan_headers(data: bytes, limit: int | None = None) -> HeaderScan:
    """Scan the header block of a CRLF message. Tolerates a missing body, a header-only message and
    a message with no header block at all. Past ``limit`` octets of header block the scan stops
    and sets ``too_large`` (the rest is not looked at)."""
    scan = HeaderScan(end=len(data))
    # The lines of each watched field, joined once the scan is done: adding to a growing string for
    # every continuation line was quadratic (a From folded into 100,000 short lines took 2 s).
    watched: dict[str, list[list[bytes]]] = {attr: [] for attr in _WATCH.values()}
    current: list[bytes] | None = None
    message_id: list[bytes] = []
    in_field = False
    pos, n = 0, len(data)
    while pos < n:
        if limit is not None and pos > limit:
            scan.too_large = True
            break
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            eol = n
        line = data[pos:eol]
        if not line:  # the empty line that separates header and body
            scan.end = pos
            break
        if line[0] in b" \t":
            if not in_field:  # a continuation with no field before it: the body has begun
                scan.end, scan.needs_separator = pos, True
                break
            if current is not None:  # folded continuation of a watched field
                current.append(line)
        else:
            m = _FIELD.match(line)
            if m is None:  # not a header field: the body has begun
                scan.end, scan.needs_separator = pos, True
                break
            in_field = True
            key = m.group(1).lower()
            attr = _WATCH.get(key)
            current = None
            if attr is not None:
                current = [line[m.end():]]
                watched[attr].append(current)
            elif key == b"message-id":
                if not scan.has_message_id:  # the first one, folded lines too ("Message-ID:\r\n <id>")
                    current = message_id = [line[m.end():]]
                scan.has_message_id = True
            elif key == b"date":
                scan.has_date = True
            elif key == b"received":
                scan.received += 1
        if b"\r" in line or b"\n" in line:
            scan.bare_line_end = True
        if eol == n:  # header-only message whose last line has no CRLF
            scan.unterminated = True
        pos = eol + 2
    # Unfolded as RFC 5322 §2.2.3 says, by removing the CRLFs only: the blanks around them can be part of a
    # quoted local part. Undecodable bytes stay lone surrogates: the address parser refuses them (RFC 6532
    # §3.2 allows UTF-8 only), where U+FFFD in their place would make a valid mailbox not in the message.
    scan.from_values = [b"".join(f).strip().decode("utf-8", "surrogateescape") for f in watched["from_values"]]
    scan.sender_values = [b"".join(f).strip().decode("utf-8", "surrogateescape") for f in watched["sender_values"]]
    if message_id:
        scan.message_id = b" ".join(part.strip() for part in message_id[:20]).strip().decode("utf-8", "replace")[:998]
    return scan


def insert_fields(data: bytes, scan: HeaderScan, fields: bytes) -> bytes:
    """``data`` with ``fields`` (CRLF-terminated header lines) appended to its header block, and the
    empty line added after them when the message had none before its body (RFC 5322 §2.1; Postfix's
    cleanup does the same), so receivers never read our From/Date/Message-ID as body text."""
    sep = b"\r\n" if scan.needs_separator else b""
    if not fields and not sep:
        return data
    lead = b"\r\n" if scan.unterminated and fields else b""
    return data[:scan.end] + lead + fields + sep + data[scan.end:]



def assemble(trace: bytes, data: bytes, scan: HeaderScan, fields: bytes) -> bytes:
    """``trace + insert_fields(data, scan, fields)`` with one copy of ``data`` (the intermediate
    concatenations and slices of a 25 MB message would each copy it whole)."""
    sep = b"\r\n" if scan.needs_separator else b""
    if not fields and not sep:
        return b"".join((trace, data))
    lead = b"\r\n" if scan.unterminated and fields else b""
    with memoryview(data) as view:
        return b"".join((trace, view[:scan.end], lead, fields, sep, view[scan.end:]))

def received_header(*, helo: str, peer_ip: str, hostname: str, protocol: str, queue_id: str,
                    tls: str | None, user: str | None, now: float | None = None) -> bytes:
    """A Received trace field (RFC 5321 §4.4), folded, CRLF-terminated. No reverse DNS lookup:
    the IP literal is what we know for sure."""
    if not helo.isascii():
        # An internationalized name in its A-label form (été.example is xn--t-9ba.example); anything
        # else keeps its shape, a "?" for each character that cannot be written here.
        try:
            helo = normalize_domain(helo)
        except ValueError:
            helo = "".join(c if c.isascii() else "?" for c in helo)
    helo = "".join(c for c in helo if 32 < ord(c) < 127 and c not in "()")[:255] or "unknown"
    lines = [f"Received: from {helo} ([{peer_ip}])", f"\tby {hostname} (mailrelayd) with {protocol} id {queue_id}"]
    if tls:
        lines.append(f"\t({tls})")
    if user:
        lines.append(f"\t(authenticated sender: {user})")
    lines[-1] += ";"
    lines.append("\t" + rfc5322_date(now))
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def message_id(queue_id: str, hostname: str) -> bytes:
    return f"Message-ID: {message_id_value(queue_id, hostname)}\r\n".encode()


def message_id_value(queue_id: str, hostname: str) -> str:
    """The Message-ID we add (RFC 5322 §3.6.4): unique by queue id, time and host."""
    return f"<{queue_id}.{int(time.time())}@{hostname}>"


def date_header(now: float | None = None) -> bytes:
    return f"Date: {rfc5322_date(now)}\r\n".encode()


def rfc5322_date(now: float | None = None) -> str:
    """The date-time of RFC 5322 §3.3 in local time, for Received and Date."""
    return _date_of_second(int(now if now is not None else time.time()))


@functools.lru_cache(maxsize=4)
def _date_of_second(second: int) -> str:
    # Every message of the same second gets the same text: formatting it once per second keeps
    # email.utils (datetime and tz arithmetic) off the per-message path.
    return email.utils.formatdate(second, localtime=True)


def protocol_name(esmtp: bool, tls: bool, auth: bool) -> str:
    """RFC 3848 protocol names for the Received ``with`` clause."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if auth else "")
