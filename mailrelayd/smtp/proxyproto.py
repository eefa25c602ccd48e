"""The PROXY protocol header, versions 1 (text) and 2 (binary), as sent by HAProxy and cloud TCP load
balancers in front of a listener with ``proxy_protocol = true`` (spec: haproxy.org/download/2.9/doc/
proxy-protocol.txt). Pure parsing, no I/O.

The header is the first thing on the connection; anything else there (including a bare client that
bypassed the proxy) is refused, so a client cannot choose the address the policy sees by connecting
directly. ``LOCAL`` (v2) and ``UNKNOWN`` (v1) headers, the proxy's own health checks, keep the real
connection's address, as the spec requires.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (spec §2.1)
V2_MAX_BODY = 4096  # we read addresses and skip TLVs; a larger header is refused, not buffered
_V1_ADDRESS_CHARS = frozenset("0123456789abcdefABCDEF:.")


class ProxyHeaderError(ValueError):
    """Not a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """The original client's address, or None for LOCAL/UNKNOWN (use the connection's own)."""

    source_ip: str | None
    source_port: int | None = None
    dest_ip: str | None = None
    dest_port: int | None = None


def parse_header(buf: bytes | bytearray) -> tuple[ProxyInfo, int] | None:
    """Parse a header at the start of ``buf``: (info, its length in bytes), or None if more bytes are
    needed to decide. Raises :class:`ProxyHeaderError` for anything else."""
    n = min(len(buf), 12)
    if bytes(buf[:n]) == V2_SIGNATURE[:n]:
        return None if n < 12 else _v2(buf)
    n = min(len(buf), 6)
    if bytes(buf[:n]) == V1_PREFIX[:n]:
        return None if n < 6 else _v1(buf)
    raise ProxyHeaderError("no PROXY protocol header")


def _v1(buf: bytes | bytearray) -> tuple[ProxyInfo, int] | None:
    end = bytes(buf[:V1_MAX]).find(b"\r\n")
    if end < 0:
        if len(buf) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line too long")
        return None
    try:
        line = bytes(buf[:end]).decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyInfo(None), end + 2
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    _, fam, src, dst, sport, dport = parts
    version = 4 if fam == "TCP4" else 6
    return ProxyInfo(_ip(src, version), _port(sport), _ip(dst, version), _port(dport)), end + 2


def _ip(text: str, version: int) -> str:
    # The spec's grammar (§2.1): hex digits, colons, dots. ``ipaddress`` also takes an IPv6 scope
    # ("fe80::1%<anything but a space>", bare LF included), which would reach logs and Received.
    if not set(text) <= _V1_ADDRESS_CHARS:
        raise ProxyHeaderError(f"bad address {text[:45]!r}")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"bad address {text[:45]!r}") from None
    if addr.version != version:
        raise ProxyHeaderError("address family mismatch")
    return ip_text(addr)


def ip_text(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """One form per client address: an IPv4-mapped IPv6 address (a dual-stack socket, or a proxy
    that writes ``::ffff:192.0.2.1``) is the IPv4 address, so limits, logs and Received: agree."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _port(text: str) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError(f"bad port {text[:8]!r}")
    return int(text)


def _v2(buf: bytes | bytearray) -> tuple[ProxyInfo, int] | None:
    if len(buf) < 16:
        return None
    ver_cmd, fam, length = struct.unpack("!BBH", bytes(buf[12:16]))
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError("PROXY v2: unsupported version")
    if length > V2_MAX_BODY:
        raise ProxyHeaderError("PROXY v2: header too long")
    total = 16 + length
    if len(buf) < total:
        return None
    cmd = ver_cmd & 0x0F
    if cmd == 0x0:  # LOCAL: the proxy speaking for itself (health checks)
        return ProxyInfo(None), total
    if cmd != 0x1:
        raise ProxyHeaderError("PROXY v2: unknown command")
    body = bytes(buf[16:total])
    if fam == 0x11:  # TCP over IPv4
        if length < 12:
            raise ProxyHeaderError("PROXY v2: short IPv4 address block")
        src, dst, sport, dport = struct.unpack("!4s4sHH", body[:12])
        return ProxyInfo(str(ipaddress.IPv4Address(src)), sport, str(ipaddress.IPv4Address(dst)), dport), total
    if fam == 0x21:  # TCP over IPv6
        if length < 36:
            raise ProxyHeaderError("PROXY v2: short IPv6 address block")
        src, dst, sport, dport = struct.unpack("!16s16sHH", body[:36])
        return ProxyInfo(ip_text(ipaddress.IPv6Address(src)), sport, ip_text(ipaddress.IPv6Address(dst)),
                         dport), total
    if fam == 0x00:  # UNSPEC: keep the connection's own address (spec §2.2)
        return ProxyInfo(None), total
    raise ProxyHeaderError("PROXY v2: only TCP over IPv4/IPv6 is supported")
