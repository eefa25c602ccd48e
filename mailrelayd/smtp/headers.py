"""Header work done at accept time: a fast scan of the header block (From, Sender, Message-ID,
Date) and the trace and identification fields we add (RFC 5321 §4.4, RFC 5322 §3.6)."""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class HeaderScan:
    """What the policy needs from the header block, found without building a Message object."""

    end: int  # offset of the blank line that ends the header block (or len(data) if none)
    from_values: list[str] = field(default_factory=list)
    sender_values: list[str] = field(default_factory=list)
    has_message_id: bool = False
    has_date: bool = False
    message_id: str = ""
    """The first Message-ID field's value, unfolded and stripped (for history, events and logs)."""

    def from_addresses(self) -> list[str]:
        """Every mailbox address in the From fields (lowercased domain)."""
        return _addresses(self.from_values)

    def sender_addresses(self) -> list[str]:
        return _addresses(self.sender_values)

    @property
    def from_domain(self) -> str:
        addrs = self.from_addresses()
        return addrs[0].rpartition("@")[2] if addrs else ""


_WATCH = {b"from": "from_values", b"sender": "sender_values"}


def scan_headers(data: bytes) -> HeaderScan:
    """Scan the header block of a CRLF message. Tolerates a missing body and a header-only message."""
    if data.startswith(b"\r\n"):
        return HeaderScan(end=0)
    end = data.find(b"\r\n\r\n")
    end = len(data) if end < 0 else end + 2
    scan = HeaderScan(end=end)
    current: str | None = None
    for line in data[:end].split(b"\r\n"):
        if not line:
            continue
        if line[0] in b" \t":
            if current is not None:  # folded continuation of a watched field
                lst = getattr(scan, current)
                lst[-1] += " " + line.strip().decode("utf-8", "replace")
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            current = None
            continue
        key = name.strip().lower()
        current = _WATCH.get(key)
        if current is not None:
            getattr(scan, current).append(value.strip().decode("utf-8", "replace"))
        elif key == b"message-id":
            if not scan.has_message_id:
                scan.message_id = value.strip().decode("utf-8", "replace")[:998]
            scan.has_message_id = True
        elif key == b"date":
            scan.has_date = True
    return scan


def _addresses(values: list[str]) -> list[str]:
    out = []
    for _name, addr in email.utils.getaddresses(values):
        if addr and "@" in addr:
            local, _, dom = addr.rpartition("@")
            out.append(f"{local}@{dom.lower().rstrip('.')}")
        elif addr:
            out.append(addr)
    return out


def received_header(*, helo: str, peer_ip: str, hostname: str, protocol: str, queue_id: str,
                    tls: str | None, user: str | None, now: float | None = None) -> bytes:
    """A Received trace field (RFC 5321 §4.4), folded, CRLF-terminated. No reverse DNS lookup:
    the IP literal is what we know for sure."""
    helo = "".join(c for c in helo if 32 < ord(c) < 127 and c not in "()")[:255] or "unknown"
    lines = [f"Received: from {helo} ([{peer_ip}])", f"\tby {hostname} (mailrelayd) with {protocol} id {queue_id}"]
    if tls:
        lines.append(f"\t({tls})")
    if user:
        lines.append(f"\t(authenticated sender: {user})")
    lines[-1] += ";"
    lines.append("\t" + email.utils.formatdate(now if now is not None else time.time(), localtime=True))
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def message_id(queue_id: str, hostname: str) -> bytes:
    return f"Message-ID: {message_id_value(queue_id, hostname)}\r\n".encode()


def message_id_value(queue_id: str, hostname: str) -> str:
    """The Message-ID we add (RFC 5322 §3.6.4): unique by queue id, time and host."""
    return f"<{queue_id}.{int(time.time())}@{hostname}>"


def date_header(now: float | None = None) -> bytes:
    return f"Date: {email.utils.formatdate(now if now is not None else time.time(), localtime=True)}\r\n".encode()


def protocol_name(esmtp: bool, tls: bool, auth: bool) -> str:
    """RFC 3848 protocol names for the Received ``with`` clause."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if auth else "")
