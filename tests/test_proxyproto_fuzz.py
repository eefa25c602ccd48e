"""The PROXY protocol header parser against input nobody wrote by hand: seeded random bytes, prefixes
and mutations of valid v1/v2 headers, v1 lines built from hostile fields, and valid headers cut at
every point. Whatever arrives, :func:`parse_header` must return a result, return None ("need more
bytes") or raise :class:`ProxyHeaderError`; a result must carry only well-formed addresses and ports;
the answer must not depend on how the bytes were split; and the wait for more bytes is bounded
(spec: haproxy.org/download/2.9/doc/proxy-protocol.txt, §2.1 and §2.2)."""

from __future__ import annotations

import ipaddress
import random
import re
import socket
import struct
from typing import Any

import pytest

from mailrelayd.smtp.proxyproto import V1_MAX, V2_MAX_BODY, V2_SIGNATURE, ProxyHeaderError, ProxyInfo, parse_header

SIG = V2_SIGNATURE
NEED_MORE = ("more",)
ERROR = ("error",)


def v2(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return SIG + bytes([ver_cmd, fam]) + struct.pack("!H", len(body)) + body


def tlvs(*items: tuple[int, bytes]) -> bytes:
    return b"".join(bytes([t]) + struct.pack("!H", len(v)) + v for t, v in items)


IPV4 = socket.inet_aton("198.51.100.7") + socket.inet_aton("192.0.2.1") + struct.pack("!HH", 40000, 25)
IPV6 = (socket.inet_pton(socket.AF_INET6, "2001:db8::7") + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
        + struct.pack("!HH", 40001, 587))
UNIX = b"/run/haproxy.sock".ljust(108, b"\0") + b"/run/mailrelayd.sock".ljust(108, b"\0")

VALID = {
    "v1 tcp4": b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 25\r\n",
    "v1 tcp6": b"PROXY TCP6 2001:db8::1 ::2 65535 0\r\n",
    "v1 tcp6 mapped": b"PROXY TCP6 ::ffff:203.0.113.9 ::1 1 2\r\n",
    "v1 unknown": b"PROXY UNKNOWN\r\n",
    "v1 unknown addrs": b"PROXY UNKNOWN 2001:db8::1 ::2 1 2\r\n",
    "v1 tcp6 full": b"PROXY TCP6 " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n",
    "v1 longest": b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n",
    "v2 tcp4": v2(0x21, 0x11, IPV4),
    "v2 tcp6": v2(0x21, 0x21, IPV6),
    "v2 local": v2(0x20, 0x00, b""),
    "v2 local with block": v2(0x20, 0x11, IPV4),
    "v2 unspec": v2(0x21, 0x00, b""),
    "v2 tlvs": v2(0x21, 0x11, IPV4 + tlvs((0x01, b"smtp"), (0x02, b"relay.example"), (0x04, b""),
                                          (0x20, b"\x07\x00\x00\x00\x00" + tlvs((0x21, b"TLSv1.3"))))),
    "v2 tcp6 tlvs": v2(0x21, 0x21, IPV6 + tlvs((0x03, b"\x12\x34\x56\x78"), (0xE0, b"x" * 300))),
    "v2 unix": v2(0x21, 0x31, UNIX),  # a valid header for a family we do not take: refused
    "v2 local unix": v2(0x20, 0x31, UNIX),
}
assert len(VALID["v1 longest"]) == V1_MAX
TRAILING = b"EHLO client.example\r\n"
INTERESTING = b" \r\n\t%:.-0123456789afAFxPROXYTCP46UNKNOW\x00\x11\x20\x21\x31\x7f\x80\xff"


def outcome(buf: bytes | bytearray) -> tuple[Any, ...]:
    """What parse_header made of ``buf``; any exception but ProxyHeaderError propagates (a failure)."""
    try:
        parsed = parse_header(buf)
    except ProxyHeaderError:
        return ERROR
    if parsed is None:
        return NEED_MORE
    info, used = parsed
    assert isinstance(info, ProxyInfo)
    assert 0 < used <= len(buf)
    for ip in (info.source_ip, info.dest_ip):
        # What the policy, the logs and the Received field get: an address in canonical form, nothing else.
        if ip is not None:
            assert re.fullmatch(r"[0-9a-f:.]+", ip), ip
            assert str(ipaddress.ip_address(ip)) == ip
    for port in (info.source_port, info.dest_port):
        assert port is None or (isinstance(port, int) and 0 <= port <= 65535)
    return ("ok", info, used)


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(b) + 1)
        op = rng.randrange(6)
        if op == 0 and i < len(b):
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and i < len(b):
            b[i] = rng.randrange(256)
        elif op == 2 and i < len(b):
            b[i] = rng.choice(INTERESTING)
        elif op == 3:
            b[i:i] = bytes([rng.choice(INTERESTING)])
        elif op == 4 and i < len(b):
            del b[i]
        else:
            b[i:i] = b[i:i + rng.randint(1, 8)]
    return bytes(b)


def test_valid_headers() -> None:
    for name, hdr in VALID.items():
        got = outcome(hdr + TRAILING)
        if name == "v2 unix":
            assert got == ERROR
            continue
        assert got[0] == "ok" and got[2] == len(hdr), name
    assert outcome(VALID["v2 local with block"])[1] == ProxyInfo(None)


def test_random_bytes_and_prefixes() -> None:
    rng = random.Random(20250521)
    for _ in range(3000):
        outcome(rng.randbytes(rng.randrange(64)))
        outcome(rng.choice([b"PROXY ", SIG, SIG[:5]]) + rng.randbytes(rng.randrange(300)))
    for hdr in VALID.values():
        for cut in range(len(hdr)):
            assert outcome(hdr[:cut]) in (NEED_MORE, ERROR)
            outcome(hdr[:cut] + rng.randbytes(rng.randrange(1, 40)))


@pytest.mark.parametrize("name", sorted(VALID))
def test_mutated_headers(name: str) -> None:
    rng = random.Random(name)
    hdr = VALID[name]
    for _ in range(1500):
        outcome(mutate(rng, hdr) + rng.choice([b"", TRAILING]))


# v1 lines put together from fields each valid or subtly not (§2.1: decimal IPv4 without leading
# zeroes, IPv6 as hex groups and at most one "::", ports 0..65535 without leading zeroes, single spaces).
V1_ADDRESSES = ["203.0.113.9", "0.0.0.0", "255.255.255.255", "2001:db8::1", "::", "::1", "::ffff:192.0.2.1",
                "FE80::1", "fe80::1%eth0", "fe80::1%1", "::1%\n", "2001:db8::1%a\nBcc:x", "01.2.3.4", "1.2.3",
                "256.1.1.1", "1.2.3.4.", "1.2.3.4%0", "2001:db8:::1", "1::2::3", "::g", "", "1.2.3.4\t",
                "\u0661.2.3.4"]
V1_PORTS = ["0", "25", "65535", "65536", "025", "-1", "+25", "2 5", "25\n", "", "\u0662\u0665", "99999999999"]


def test_v1_lines_from_hostile_fields() -> None:
    rng = random.Random(7)
    accepted = 0
    for _ in range(4000):
        fields = ["PROXY", rng.choice(["TCP4", "TCP6", "UNKNOWN", "tcp4", "TCP5", ""]),
                  rng.choice(V1_ADDRESSES), rng.choice(V1_ADDRESSES), rng.choice(V1_PORTS), rng.choice(V1_PORTS)]
        line = " ".join(fields[: rng.choice([2, 6, 6, 6, 7])]).encode("utf-8") + b"\r\n"
        got = outcome(line + TRAILING)
        accepted += got[0] == "ok"
    assert accepted > 100  # the generator does produce valid lines too


@pytest.mark.parametrize("line", [
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    b"PROXY TCP6 ::1 fe80::1%1 1 2\r\n",
    b"PROXY TCP6 ::1%a\nX-Injected:yes ::1 1 2\r\n",  # a bare LF must not end up in the client's address
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n\r\n",
    b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 \xd9\xa2\r\n",
])
def test_v1_refuses_what_the_spec_refuses(line: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_header(line + TRAILING)


@pytest.mark.parametrize("name", sorted(VALID))
def test_split_at_every_point(name: str) -> None:
    """Fed as it arrives, the header gives the same answer as in one piece, and nothing sooner."""
    whole = VALID[name] + TRAILING
    expected = outcome(whole)
    for cut in range(1, len(whole)):
        buf = bytearray()
        got = NEED_MORE
        for piece in (whole[:cut], whole[cut:]):
            buf += piece
            got = outcome(buf)
            if got != NEED_MORE:
                break
        assert got == expected, (name, cut)
    # One byte at a time, as the implicit-TLS listener reads a v1 line.
    buf = bytearray()
    for i in range(len(whole)):
        buf.append(whole[i])
        got = outcome(buf)
        if got != NEED_MORE:
            break
    assert got == expected, name


def test_bounded() -> None:
    """Too long is refused as soon as it is known, never waited on."""
    # v1: no CRLF within 107 bytes, however the line goes on.
    for body in (b"TCP4 " + b"1" * 200, b"UNKNOWN" + b" " * 200, b"TCP6 " + b"f" * 95 + b"\r"):
        line = b"PROXY " + body
        assert outcome(line[: V1_MAX - 1]) == NEED_MORE
        assert outcome(line[:V1_MAX]) == ERROR
        assert outcome(line) == ERROR
    longest = VALID["v1 longest"]
    assert outcome(longest[:-2] + b"f\r\n") == ERROR  # 108 bytes with its CRLF
    # v2: a length past the limit is refused from the 16 fixed bytes, before the body arrives.
    for length in (V2_MAX_BODY + 1, 0x8000, 0xFFFF):
        fixed = SIG + bytes([0x21, 0x11]) + struct.pack("!H", length)
        assert outcome(fixed) == ERROR
        assert outcome(fixed + IPV4) == ERROR
    fixed = SIG + bytes([0x21, 0x11]) + struct.pack("!H", V2_MAX_BODY)
    assert outcome(fixed + IPV4) == NEED_MORE
    assert outcome(fixed + IPV4.ljust(V2_MAX_BODY, b"\0"))[0] == "ok"
    # Whatever the bytes, once past the longest header allowed there is an answer.
    rng = random.Random(3)
    for _ in range(200):
        buf = rng.choice([b"PROXY ", SIG + bytes([0x21, 0x11])]) + rng.randbytes(V2_MAX_BODY + 2)
        assert outcome(buf) != NEED_MORE
    # The v2 header's fixed part decides version and command: other values are refused (§2.2).
    for ver_cmd in (0x00, 0x11, 0x22, 0x2F, 0x31, 0xF1):
        assert outcome(SIG + bytes([ver_cmd, 0x11]) + struct.pack("!H", 12) + IPV4) == ERROR
    for fam in (0x12, 0x22, 0x32, 0x13, 0x41, 0xFF, 0x01, 0x10):
        assert outcome(v2(0x21, fam, IPV4 + bytes(300))) == ERROR


def test_an_ipv4_mapped_client_is_its_ipv4_address_in_both_versions() -> None:
    """``::ffff:203.0.113.9`` is 203.0.113.9 whichever header carried it: per-IP limits, trusted
    networks, logs and Received: must not count one client as two."""
    v1, _ = parse_header(b"PROXY TCP6 ::ffff:203.0.113.9 ::FFFF:192.0.2.1 1 2\r\n") or (None, 0)
    v2, _ = parse_header(SIG + bytes([0x21, 0x21]) + struct.pack("!H", 36)
                         + ipaddress.IPv6Address("::ffff:203.0.113.9").packed
                         + ipaddress.IPv6Address("::ffff:192.0.2.1").packed + struct.pack("!HH", 1, 2)) or (None, 0)
    assert v1 is not None and v2 is not None
    assert (v1.source_ip, v1.dest_ip) == (v2.source_ip, v2.dest_ip) == ("203.0.113.9", "192.0.2.1")
    assert parse_header(b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n")[0].source_ip == "2001:db8::1"  # type: ignore[index]
