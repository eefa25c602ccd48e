"""The delivery side's remote-controlled input, with seeded hostile data nobody wrote by hand.

What a recipient domain (or anyone on the path of its DNS) controls: the ``_mta-sts`` TXT record and
the MTA-STS policy file (RFC 8461 §3), the ``_smtp._tls`` TLS-RPT record (RFC 8460 §3), the MX RRset
(RFC 5321 §5.1, RFC 7505), TLSA records (RFC 7672), and the certificate chain its MX presents. Each
parser and decision is checked against an independent reading of the RFC: it returns a valid,
normalised value or raises its own error type, never anything else, in bounded time. Every seed is
fixed, so a failure names its input and reproduces.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import random
import re
import string
import time
from collections.abc import AsyncIterator, Iterator
from email import message_from_bytes
from email.policy import default as email_default
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mailrelayd.config import DnsConfig, HostPort
from mailrelayd.delivery import dane, mta_sts, tlsrpt
from mailrelayd.delivery.dane import Tlsa
from mailrelayd.delivery.mta_sts import (
    MAX_AGE_LIMIT,
    FetchError,
    MtaSts,
    PolicyError,
    StsPolicy,
    host_allowed,
    mx_matches,
    parse_policy,
    parse_txt,
)
from mailrelayd.delivery.mx import MAX_MX_HOSTS, DnsPermanentError, DnsTemporaryError, MxHost, MxResolver
from mailrelayd.delivery.outbound_tls import client_context, mailto_recipients
from mailrelayd.delivery.tlspolicy import plan_host
from tests.support.dnsserver import DnsServer
from tests.support.policyserver import PolicyServer, cannot_bind_443
from tests.support.testca import TestCA

# --- an independent reading of the grammar -------------------------------------------------------
LDH = frozenset(string.ascii_lowercase + string.digits + "-_")  # "_" tolerated, as by Postfix
WSP = " \t"
MODES = ("enforce", "testing", "none")
PARSE_BUDGET = 2.0
"""Seconds one parse of the largest input here may take (it is linear; this only catches blow-ups)."""


def ref_host(text: str) -> str | None:
    """A host name by RFC 1123 §2.1 labels, read char by char: ASCII before any case folding."""
    if not text.isascii():
        return None
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    if len(name) > 253 or any(not 1 <= len(lb) <= 63 or not set(lb) <= LDH for lb in labels):
        return None
    return name


def ref_pattern(text: str) -> str | None:
    """RFC 8461 §3.2: sts-policy-mx-value = ["*."] Domain."""
    if text.startswith("*."):
        rest = ref_host(text[2:])
        return None if rest is None else "*." + rest
    return ref_host(text)


def ref_policy(text: str) -> tuple[str, tuple[str, ...], int] | None:
    """RFC 8461 §3.2 read on its own: lines end in LF or CRLF; key ":" *WSP value *WSP; the first of
    version/mode/max_age counts; unknown keys are ignored; every mx is a pattern; max_age is
    1*10DIGIT (ASCII) capped at 31557600; enforce and testing need an mx. None: not a valid policy."""
    first: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        line = line.strip(WSP)
        if not line:
            continue
        if ":" not in line:
            return None
        key, value = line.split(":", 1)
        key, value = key.strip(WSP), value.strip(WSP)
        if key == "mx":
            pattern = ref_pattern(value)
            if pattern is None:
                return None
            mx.append(pattern)
        elif key not in first:
            first[key] = value
    age = first.get("max_age", "")
    if first.get("version") != "STSv1" or first.get("mode") not in MODES:
        return None
    if not 1 <= len(age) <= 10 or any(c not in "0123456789" for c in age):
        return None
    if first["mode"] != "none" and not mx:
        return None
    return first["mode"], tuple(mx), min(int(age), 31_557_600)


# --- hostile material ----------------------------------------------------------------------------
WEIRD = ["\x00", "\x0b", "\x0c", "\x1c", "\x7f", "\x85", "\u00a0", "\u2028", "\u3000", "\ufeff", "\u212a", "\u0130",
         "ü", "\u0661", "²", "\udcff", "\r", "\n", "\t", " ", ":", ";", "=", ".", "*", "\\", ",", "%", "@", "<", ">"]
HOSTS = ["mx1.example.com", "MX1.Example.COM.", "mail.example.net", "a.b.c.d.example", "x", "xn--bcher-kva.example",
         "bücher.example", "\u212aelvin.example", "mx_1.example", "-lead.example", "192.0.2.1", "a..b", ".lead",
         "trail..", "a" * 63 + ".example", "a" * 64 + ".example", ".".join(["a" * 63] * 4), ("a." * 126) + "a",
         "a\x00b.example", "a b.example", "a\\.b.example", "", ".", "*", "**", "*.", "*.*.example", "*.example",
         "*.EXAMPLE.com.", "*example.com", "*.ex*ample.com", "*.bücher.example"]
ARABIC_INDIC_123 = "\u0661\u0662\u0663"
FULLWIDTH_86400 = "\uff18\uff16\uff14\uff10\uff10"
AGES = ["86400", "0", "31557600", "31557601", "9999999999", "99999999999", str(2**63), str(2**64 + 1), str(10**40),
        "-1", "+5", "1_000", "1e5", "0x10", " 86400", "86400\x00", ARABIC_INDIC_123, "²", "\u0663" * 10,
        FULLWIDTH_86400, "", "0086400"]


def _word(rng: random.Random, n: int = 12) -> str:
    pool = string.ascii_letters + string.digits + "".join(WEIRD)
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, n)))


def _mutate(rng: random.Random, s: str, rate: float) -> str:
    """With probability ``rate``: a case change, or a weird character in or around ``s``."""
    if rng.random() >= rate:
        return s
    r = rng.random()
    if r < 0.3:
        return rng.choice([s.upper(), s.title()])
    if r < 0.7:
        i = rng.randint(0, len(s))
        return s[:i] + rng.choice(WEIRD) + s[i:]
    return rng.choice(WEIRD) + s + rng.choice(WEIRD)


def hostile_policy(rng: random.Random) -> str:
    """A policy body: about half nearly right (one defect at most, often none), half thoroughly wrong."""
    if rng.random() < 0.05:  # bytes nobody meant as text, read the ways a fetcher might
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        return raw.decode(rng.choice(["latin-1", "utf-8"]), errors="surrogateescape")
    rate = 0.25 if rng.random() < 0.5 else 0.02
    lines: list[str] = []
    if rng.random() < 1 - rate / 2:
        lines.append("version:" + rng.choice(["", " ", "\t", "  "]) + _mutate(rng, "STSv1", rate))
    if rng.random() < 1 - rate / 2:
        lines.append("mode: " + _mutate(rng, rng.choice((*MODES, *MODES, "Enforce", "strict", "")), rate))
    if rng.random() < 1 - rate / 2:
        age = rng.choice(AGES) if rng.random() < rate * 2 else str(rng.randrange(10 ** rng.randint(1, 12)))
        lines.append("max_age: " + age)
    for _ in range(rng.randint(0, 4)):
        host = rng.choice(HOSTS) if rng.random() < rate * 2 else rng.choice(HOSTS[:6])
        lines.append(rng.choice(["mx:", "mx: ", "mx:\t", "MX: ", " mx : "]) + _mutate(rng, host, rate))
    for _ in range(rng.randint(0, 2)):  # duplicates, unknown fields, junk
        lines.append(rng.choice([
            "mode: " + rng.choice(MODES), "version: STSv2", "max_age: " + rng.choice(AGES),
            "ext_" + _word(rng, 5) + ": " + _word(rng), "", *([_word(rng, 30), ":", "mx"] if rate > 0.1 else [])]))
    if rng.random() < 0.3:
        rng.shuffle(lines)
    ends = ["\n", "\r\n", "\r", "\n\r", "\r\r\n", "\x85", "\u2028"]
    out = "".join(line + (rng.choice(ends) if rng.random() < rate else rng.choice(["\n", "\r\n"])) for line in lines)
    return out if rng.random() >= rate else out.replace("\n", rng.choice(ends))


def _check_policy(text: str) -> StsPolicy | None:
    """Parse ``text``; assert it agrees with the reference and the invariants. None when refused."""
    want = ref_policy(text)
    t0 = time.perf_counter()
    try:
        got: StsPolicy | None = parse_policy(text)
    except PolicyError:
        got = None
    assert time.perf_counter() - t0 < PARSE_BUDGET, f"slow parse of {text[:80]!r}"
    if got is None:
        assert want is None, f"valid policy refused: {text!r}"
        return None
    assert want is not None, f"invalid policy accepted as {got.mode}: {text!r}"
    assert (got.mode, got.mx, got.max_age) == want, text
    assert got.mode in MODES and 0 <= got.max_age <= MAX_AGE_LIMIT
    for p in got.mx:
        assert p.isascii() and p == p.lower() and not p.endswith(".") and p == mta_sts.mx_pattern(p)
    return got


# --- 1. MTA-STS policy and TXT records, in memory -----------------------------------------------
def test_policy_parser_against_seeded_hostile_text() -> None:
    rng = random.Random(8461)
    outcomes = {"refused": 0, **dict.fromkeys(MODES, 0)}
    for _ in range(2500):
        got = _check_policy(hostile_policy(rng))
        outcomes["refused" if got is None else got.mode] += 1
    assert all(n > 20 for n in outcomes.values()), outcomes  # the generator reaches every outcome


@pytest.mark.parametrize(("age", "want"), [
    ("0", 0), ("86400", 86400), ("31557600", MAX_AGE_LIMIT), ("31557601", MAX_AGE_LIMIT),
    ("9999999999", MAX_AGE_LIMIT), ("0000000001", 1),
    ("99999999999", None), (str(2**64 + 1), None), (str(10**40), None),    # 1*10DIGIT (§3.2)
    ("²", None), (ARABIC_INDIC_123, None), ("\u0663" * 10, None), (FULLWIDTH_86400, None),  # int() takes, not DIGIT
    ("-1", None), ("+5", None), ("1_000", None), ("1e5", None), ("", None), ("86400\x0b", None),
])
def test_max_age(age: str, want: int | None) -> None:
    got = _check_policy(f"version: STSv1\nmode: enforce\nmx: mx.example\nmax_age: {age}\n")
    assert (got.max_age if got else None) == want


@pytest.mark.parametrize(("mx", "want"), [
    ("MX.Example.COM.", "mx.example.com"), ("*.Example.com", "*.example.com"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("", None), ("*.", None), ("*.*.example", None), ("**", None), ("*", None), (".", None), ("a..b", None),
    ("bücher.example", None), ("\u212a.example", None), ("a\x00b.example", None), ("a b", None),
    ("a\\.b.example", None), ("mx.example..", None), ("a" * 64 + ".example", None),
])
def test_mx_patterns(mx: str, want: str | None) -> None:
    got = _check_policy(f"version: STSv1\nmode: enforce\nmx: {mx}\nmax_age: 86400\n")
    assert (got.mx[0] if got else None) == want


@pytest.mark.parametrize("text", [
    "version: STSv1\r\nmode: enforce\r\nmx: mx.example\r\nmax_age: 86400\r\n",
    "version: STSv1\nmode: enforce\nmx: mx.example\nmax_age: 86400",
    "version: STSv1\rmode: enforce\rmx: mx.example\rmax_age: 86400\r",           # CR alone ends no line
    "version: STSv1\nmode: enforce\x0b\nmx: mx.example\nmax_age: 86400\n",        # VT is no WSP
    "version: STSv1\nmode: enforce\u00a0\nmx: mx.example\nmax_age: 86400\n",
    "version: STSv1\nmode:\tenforce \t\nmx: mx.example\nmax_age: 86400\n",
    "version: STSv1\nmode: testing\nmode: enforce\nmx: mx.example\nmax_age: 86400\n",  # the first counts
    "mode: enforce\nmx: mx.example\nmax_age: 86400\n",
    "version: STSv1\nversion: STSv2\nmode: enforce\nmx: mx.example\nmax_age: 86400\n",
    "\ufeffversion: STSv1\nmode: enforce\nmx: mx.example\nmax_age: 86400\n",
    "version: STSv1\nmode: enforce\nmx: mx.example\nmax_age: 86400\nnote: \x00\x7f ☃\n",
    "version: STSv1\nmode: none\nmax_age: 86400\n",
    "version: STSv1\nmode: enforce\nmax_age: 86400\n",
])
def test_line_ends_whitespace_duplicates(text: str) -> None:
    _check_policy(text)


def test_huge_policies_parse_in_bounded_time() -> None:
    head = "version: STSv1\nmode: enforce\nmax_age: 86400\n"
    many = head + "".join(f"mx: mx{i}.example.com\n" for i in range(5000))
    got = _check_policy(many)
    assert got is not None and len(got.mx) == 5000
    t0 = time.perf_counter()
    assert host_allowed(got, "MX4999.example.com.") and not host_allowed(got, "mx5000.example.com")
    assert time.perf_counter() - t0 < 0.5
    rng = random.Random(3)
    megabytes = [
        head + "mx: mx.example\nnote: " + "x" * 3_000_000 + "\n",     # one long line
        head + "mx: " + "a" * 2_000_000 + "\n",                        # one long mx
        head + "mx: mx.example\n" * 30_000,                            # many short lines
        head + rng.randbytes(2_000_000).decode("latin-1"),             # anything, CR and LF included
        "\r\n" * 200_000, "\x00" * 2_000_000, ":" * 2_000_000,
    ]
    for text in megabytes:
        _check_policy(text)


@pytest.mark.parametrize(("texts", "want"), [
    (["v=STSv1; id=abc"], "abc"),
    (["v=STSv1; id=١٢٣"], None), (["v=STSv1; id=ab\x00"], None), (["v=STSv1; id=" + "a" * 33], None),
    (["v=STSv1; id=a; id=b"], "a"), (["v=STSv1", "v=STSv1; id=a"], None), (["V=STSV1; id=a"], None),
    (["v=STSv1; id=a\n"], "a"), (["v=STSv1;\u00a0id=a"], "a"),
])
def test_txt_edges(texts: list[str], want: str | None) -> None:
    assert parse_txt(texts) == want


ALNUM = string.ascii_letters + string.digits


def _is_sts(record: str) -> bool:
    """Does the record start like an STSv1 record (§3.1: all others are discarded)?"""
    return record.startswith("v=STSv1") and (record[7:].lstrip().startswith(";") or not record[7:].strip())


def test_txt_parser_against_seeded_hostile_records() -> None:
    rng = random.Random(3461)
    found = 0
    for _ in range(2000):
        strings = []
        for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
            parts = [rng.choice(["v=STSv1", "v=STSv1", "v=STSv1 ", "V=STSv1", "v=STSv2", "v=spf1 -all", " v=STSv1"])]
            for _ in range(rng.randint(0, 4)):
                parts.append(rng.choice([
                    "id=" + "".join(rng.choice(ALNUM) for _ in range(rng.randint(1, 34))),
                    "id=" + _word(rng), "id=", "ext=" + _word(rng), _word(rng), "", "=", "id = x"]))
            sep = rng.choice([";", "; ", " ;", ";;", ";\t"])
            strings.append(_mutate(rng, sep.join(parts), 0.2))
        got = parse_txt(strings)
        if got is None:
            continue
        found += 1
        assert got.isascii() and got.isalnum() and 1 <= len(got) <= 32, (strings, got)
        (record,) = [s for s in strings if _is_sts(s)]
        assert re.search(rf"(^|;)\s*id\s*=\s*{got}\s*(;|$)", record), (record, got)
    assert found > 100


# --- TLS-RPT rua ---------------------------------------------------------------------------------
def test_rua_against_seeded_hostile_records() -> None:
    """RFC 8460 §3 record -> parse_rua -> the report's recipients: whatever the record holds, each
    recipient is one mailbox, once, and the report mail's To header reads back as exactly them."""
    rng = random.Random(8460)
    report = {"report-id": "2026-01-01_d.test@relay.test", "policies": []}
    kept = 0
    for _ in range(300):
        uris = []
        for _ in range(rng.choice([0, 1, 2, 3, 40])):
            local = rng.choice(["tls", "a.b+c", "x" * 70, "", "a b", "%22q%20x%22", "\"q\"", _word(rng, 6)])
            extra = rng.choice(["", "%0D%0ABcc:%20victim@evil.test", "%0A", "%2Cother@d.test", "%3E%20NOTIFY=NEVER",
                                "%00", "%20", "?subject=x", "%ZZ", "%E2%80%A8", "%FF", "@"])
            domain = rng.choice(["d.test", "D.TEST", "[127.0.0.1]", "", "bücher.test", "a..b", "d.test."])
            uris.append(rng.choice([f"mailto:{local}@{domain}{extra}", f"MAILTO:{local}{extra}@{domain}",
                                    f"https://rpt.{domain}/v1{extra}", f"ftp://{domain}", f"mailto:{extra}",
                                    _word(rng)]))
        record = rng.choice(["v=TLSRPTv1;rua=", "v=TLSRPTv1; rua=", "v=TLSRPTv1 ;rua="]) + ",".join(uris)
        got = tlsrpt.parse_rua([record] if rng.random() < 0.9 else [record, record])
        for uri in got:
            assert uri.partition(":")[0].lower() in ("mailto", "https") and uri in record, uri
        rcpts = mailto_recipients(got, "d.test")
        assert len(set(rcpts)) == len(rcpts) <= len(got)
        if not rcpts:
            continue
        kept += len(rcpts)
        for addr in rcpts:
            assert not any(c in addr for c in "\r\n\x00") and "@" in addr, addr
        mail = tlsrpt.report_mail(report, to=rcpts, domain="d.test", submitter="relay.test",
                                  from_addr="postmaster@relay.test", filename="r.json.gz")
        to = message_from_bytes(mail, policy=email_default)["To"]
        assert [a.addr_spec for a in to.addresses] == rcpts, record
    assert kept > 30


# --- 3. the mx-pattern decision ------------------------------------------------------------------
def ref_matches(pattern: str, host: str) -> bool:
    """§4.1 on the reference names: the same labels, or "*" standing for exactly one leftmost label."""
    h, p = ref_host(host), ref_pattern(pattern)
    if h is None or p is None:
        return False
    hl, pl = h.split("."), p.split(".")
    if pl[0] == "*":
        return len(hl) == len(pl) and hl[1:] == pl[1:]
    return hl == pl


def _random_host(rng: random.Random) -> str:
    labels = [rng.choice(["mx", "a", "b", "MX1", "mail", "x-y", "ex_ample", "*", "", "a\\.b", "a\\000", "\u212a",
                          "ü", "xn--bcher-kva", "0", "a" * 63, "a" * 64, _word(rng, 4)])
              for _ in range(rng.randint(1, 5))]
    return ".".join(labels) + rng.choice(["", "", ".", ".."])


def test_mx_matching_against_seeded_hosts_and_patterns() -> None:
    rng = random.Random(41)
    matched = 0
    for _ in range(4000):
        host = _random_host(rng)
        r = rng.random()
        if r < 0.35:  # a wildcard over the host's parent, or over its grandparent (one label too deep)
            parts = host.split(".")
            pattern = "*." + ".".join(parts[rng.choice([1, 1, 2]):])
        elif r < 0.6:
            pattern = rng.choice([host, host.upper(), host.lower() + ".", host.rstrip(".")])
        else:
            pattern = _random_host(rng)
            pattern = rng.choice([pattern, "*." + pattern, "*" + pattern, "*.*." + pattern])
        got = mx_matches(pattern, host)
        assert got is ref_matches(pattern, host), (pattern, host)
        matched += got
        if pattern.isascii() and host.isascii():  # case never matters (in ASCII: RFC 4343)
            assert mx_matches(pattern.upper(), host.lower()) is got and mx_matches(pattern.lower(), host.upper()) is got
    assert matched > 200


@pytest.mark.parametrize(("pattern", "host", "want"), [
    ("*.example.com", "mx.example.com", True), ("*.example.com", "MX.EXAMPLE.COM.", True),
    ("*.example.com", "example.com", False), ("*.example.com", "a.mx.example.com", False),
    ("*.example.com", "a\\.mx.example.com", False),        # one label holding a dot, not two labels
    ("*.b.example", "a\\.b.example", False), ("a.b.example", "a\\.b.example", False),
    ("*.example.com", ".example.com", False), ("mx.example.com", "mx.example.com..", False),
    ("k.example", "\u212a.example", False),                # KELVIN SIGN lowercases to "k"; DNS does not
    ("*.", "com", False), ("*", "com", False), ("**.example", "a.example", False),
    ("*.*.example", "a.b.example", False),
    ("", "", False),
])
def test_mx_matching_edges(pattern: str, host: str, want: bool) -> None:
    assert mx_matches(pattern, host) is want
    assert host_allowed(StsPolicy("enforce", (pattern,), 1), host) is want


def test_invalid_policy_never_enforces() -> None:
    """The decision: a refused policy leaves the domain without one (RFC 8461 §5: deliver as if it
    had none), so plan_host never refuses an MX on its account; an accepted one refuses exactly the
    MX hosts it does not list."""
    rng = random.Random(5)
    for _ in range(800):
        text = hostile_policy(rng)
        try:
            sts: StsPolicy | None = parse_policy(text)
        except PolicyError:
            sts = None
        host = _random_host(rng) if rng.random() < 0.5 else "mx1.example.com"
        plan = plan_host("may", "example.com", host, sts if sts and sts.mode != "none" else None, None)
        if sts is None or sts.mode != "enforce":
            assert plan.mode == "may" and not plan.refuse, text
        else:
            assert ref_policy(text) is not None
            assert bool(plan.refuse) is not any(ref_matches(p, host) for p in sts.mx), (text, host)


# --- 2. MX and TLSA answers from a DNS responder on loopback ---------------------------------------
LOOP = dns.name.from_text("loop.test.")
BAD_TLSA = dns.name.from_text("_25._tcp.badtlsa.test.")


class HostileDns(DnsServer):
    """The test responder, plus what it cannot be told to serve: names under loop.test answer with
    CNAME chains that come back on themselves (a.loop.test -> b.loop.test -> a.loop.test ...), and
    _25._tcp.badtlsa.test with a DNSSEC-validated TLSA RRset holding a SHA-256 digest of 31 bytes."""

    def answer(self, wire: bytes) -> bytes | None:
        query = dns.message.from_wire(wire)
        if query.edns >= 0:
            # Render answers of any size (the UDP side truncates past 512 bytes, then TCP carries
            # them); the base class would fail on an answer larger than the query's EDNS payload.
            query.use_edns(query.edns, query.ednsflags, 65535)
            wire = query.to_wire()
        if query.question and query.question[0].name == BAD_TLSA:
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AD
            rrset = dns.rrset.RRset(BAD_TLSA, dns.rdataclass.IN, dns.rdatatype.TLSA)
            for data in (bytes([3, 1, 1]) + b"\x00" * 31, bytes([3, 1, 1]) + b"\x01" * 32):
                rrset.add(dns.rdata.GenericRdata(dns.rdataclass.IN, dns.rdatatype.TLSA, data), 60)
            response.answer.append(rrset)
            return response.to_wire()
        if not query.question or not query.question[0].name.is_subdomain(LOOP):
            return super().answer(wire)
        q = query.question[0].name
        other = dns.name.from_text("b.loop.test.") if q.labels[0] != b"b" else dns.name.from_text("a.loop.test.")
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(q, 60, "IN", "CNAME", other.to_text()))
        response.answer.append(dns.rrset.from_text(other, 60, "IN", "CNAME", q.to_text()))
        return response.to_wire()


@pytest.fixture(scope="module")
def dns_srv() -> Iterator[HostileDns]:
    with HostileDns() as srv:
        yield srv


def _mx(srv: DnsServer) -> MxResolver:
    return MxResolver(DnsConfig(nameservers=[HostPort("127.0.0.1", srv.port)], timeout=2.0))


def ref_target(target: str) -> str | None:
    """What an MX target must be to be used: a host name (labels as dnspython reads them), not an IP."""
    labels = [lb.lower() for lb in dns.name.from_text(target).labels if lb]
    if not labels or not all(1 <= len(lb) <= 63 and set(lb.decode("latin-1")) <= LDH for lb in labels):
        return None
    name = b".".join(labels).decode()
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    return None


async def _resolve(r: MxResolver, domain: str, family: str = "any") -> list[MxHost] | DnsPermanentError | \
        DnsTemporaryError:
    t0 = time.perf_counter()
    try:
        hosts: list[MxHost] | DnsPermanentError | DnsTemporaryError = await r.resolve(domain, 2525, family)
    except (DnsPermanentError, DnsTemporaryError) as e:
        hosts = e
    assert time.perf_counter() - t0 < 3.0, f"slow resolve of {domain}"
    if isinstance(hosts, list):
        assert 0 < len(hosts) <= MAX_MX_HOSTS
        names = [h.name for h in hosts]
        assert len(set(names)) == len(names) or family.startswith("prefer-"), names
        prefs = [h.preference for h in hosts]
        assert prefs == sorted(prefs) or family.startswith("prefer-"), prefs
        for h in hosts:
            assert h.port == 2525 and h.addresses and ref_host(h.name) == h.name, h
            for a in h.addresses:
                ipaddress.ip_address(a)
    return hosts


async def test_null_mx_among_others(dns_srv: DnsServer) -> None:
    """RFC 7505 §3: a domain with a null MX MUST NOT publish others. One that does is read the same
    way every time: the null MX is ignored and the real ones are used; alone, it means no mail."""
    dns_srv.add("mixed.test.", "MX", "0 .")
    dns_srv.add("mixed.test.", "MX", "10 mx.mixed.test.")
    dns_srv.add("mx.mixed.test.", "A", "127.0.0.2")
    dns_srv.add("alone.test.", "MX", "0 .")
    dns_srv.add("alone.test.", "A", "127.0.0.2")    # a null MX also stops the implicit MX
    dns_srv.add("late.test.", "MX", "65535 .")
    r = _mx(dns_srv)
    for _ in range(3):
        got = await _resolve(r, "mixed.test")
        assert isinstance(got, list) and [h.name for h in got] == ["mx.mixed.test"]
    for domain in ("alone.test", "late.test"):
        got = await _resolve(r, domain)
        assert isinstance(got, DnsPermanentError) and got.enhanced == "5.1.10"


async def test_mx_target_that_is_an_ip_address_is_not_used(dns_srv: DnsServer) -> None:
    """RFC 1035 §3.3.9: the exchange is a domain name. "192.0.2.1." is a name that no one would look
    up, so it is not taken as an address (Postfix and Exim refuse it too)."""
    dns_srv.add("ipmx.test.", "MX", "10 192.0.2.1.")
    dns_srv.add("ipmx2.test.", "MX", "10 127.0.0.9.")
    dns_srv.add("ipmx2.test.", "MX", "20 mx.ipmx2.test.")
    dns_srv.add("mx.ipmx2.test.", "A", "127.0.0.3")
    r = _mx(dns_srv)
    got = await _resolve(r, "ipmx.test")
    assert isinstance(got, DnsTemporaryError)
    got = await _resolve(r, "ipmx2.test")
    assert isinstance(got, list) and [(h.name, h.addresses) for h in got] == [("mx.ipmx2.test", ("127.0.0.3",))]


async def test_mx_names_are_normalised_and_deduplicated(dns_srv: DnsServer) -> None:
    dns_srv.add("dup.test.", "MX", "30 MX.Dup.TEST.")
    dns_srv.add("dup.test.", "MX", "10 mx.dup.test.")
    dns_srv.add("dup.test.", "MX", "20 mx.dup.test.")
    dns_srv.add("dup.test.", "MX", "65535 last.dup.test.")
    dns_srv.add("dup.test.", "MX", "0 first.dup.test.")
    dns_srv.add("dup.test.", "MX", "5 a\\.b.dup.test.")     # a label with a dot in it: not a host name
    dns_srv.add("dup.test.", "MX", "6 x\\000y.dup.test.")
    for name in ("mx", "last", "first", "a\\.b", "x\\000y"):
        dns_srv.add(f"{name}.dup.test.", "A", "127.0.0.4")
    got = await _resolve(_mx(dns_srv), "DUP.test.")
    assert isinstance(got, list)
    assert [(h.name, h.preference) for h in got] == [("first.dup.test", 0), ("mx.dup.test", 10),
                                                     ("last.dup.test", 65535)]


async def test_hundreds_of_mx_records_cost_a_bounded_number_of_lookups(dns_srv: DnsServer) -> None:
    for i in range(300):
        dns_srv.add("many.test.", "MX", f"{i % 3} mx{i}.many.test.")
        dns_srv.add(f"mx{i}.many.test.", "A", f"127.0.1.{i % 250 + 1}")
    before = len(dns_srv.queries)
    got = await _resolve(_mx(dns_srv), "many.test")
    assert isinstance(got, list) and {h.preference for h in got} == {0}
    lookups = [q for q in dns_srv.queries[before:] if q[1] in ("A", "AAAA")]
    assert len(lookups) <= 2 * MAX_MX_HOSTS


async def test_cname_chains_and_loops(dns_srv: DnsServer) -> None:
    dns_srv.add("alias.test.", "CNAME", "real.test.")
    dns_srv.add("real.test.", "MX", "10 mxalias.real.test.")
    dns_srv.add("mxalias.real.test.", "CNAME", "mxhost.real.test.")
    dns_srv.add("mxhost.real.test.", "A", "127.0.0.5")
    dns_srv.add("loopmx.test.", "MX", "10 a.loop.test.")
    r = _mx(dns_srv)
    got = await _resolve(r, "alias.test")
    assert isinstance(got, list) and [(h.name, h.addresses) for h in got] == [("mxalias.real.test", ("127.0.0.5",))]
    assert isinstance(await _resolve(r, "a.loop.test"), DnsTemporaryError)     # the MX lookup loops
    assert isinstance(await _resolve(r, "loopmx.test"), DnsTemporaryError)     # the MX host's lookup loops


TARGETS = ["mx{i}.{d}.", "MX{i}.{D}.", ".", ".", "192.0.2.{i}.", "127.0.0.{i}.", "a\\.b{i}.{d}.",
           "x\\000{i}.{d}.", "\\195\\188{i}.{d}.", "alias{i}.{d}.", "gone{i}.{d}.", "*.{d}.", "a.loop.test.",
           "-x{i}.{d}.", "under_{i}.{d}."]


async def test_seeded_random_mx_rrsets(dns_srv: DnsServer) -> None:
    rng = random.Random(5321)
    r = _mx(dns_srv)
    seen: dict[str, int] = {"list": 0, "perm": 0, "temp": 0}
    for n in range(50):
        d = f"r{n}.rand.test"
        wanted: dict[str, int] = {}    # usable host -> lowest preference
        addressed: set[str] = set()
        nulls = others = 0
        for _ in range(rng.choice([1, 1, 2, 3, 5, 12])):
            i = rng.randint(1, 9)
            target = rng.choice(TARGETS).format(i=i, d=d, D=d.upper())
            pref = rng.choice([0, 0, 10, 20, 65535, rng.randrange(65536)])
            dns_srv.add(f"{d}.", "MX", f"{pref} {target}")
            if target == ".":
                nulls += 1
                continue
            others += 1
            name = ref_target(target if target.endswith(".") else target + ".")
            if name is not None and rng.random() < 0.8 and not name.startswith("gone"):
                owner = target if target.endswith(".") else target + "."
                if name.startswith("alias"):
                    dns_srv.add(owner, "CNAME", f"mx1.{d}.")
                    dns_srv.add(f"mx1.{d}.", "A", "127.0.2.1")
                    addressed.update((name, f"mx1.{d}"))
                elif name != "a.loop.test":
                    dns_srv.add(owner, *rng.choice([("A", "127.0.3.1"), ("AAAA", "::1")]))
                    addressed.add(name)
            if name is not None:
                wanted[name] = min(pref, wanted.get(name, pref))
        family = rng.choice(["any", "ipv4", "ipv6", "prefer-ipv4", "prefer-ipv6"])
        got = await _resolve(r, d, family)
        if isinstance(got, DnsPermanentError):
            seen["perm"] += 1
            assert others == 0 and nulls > 0 and got.enhanced == "5.1.10", d
        elif isinstance(got, DnsTemporaryError):
            seen["temp"] += 1
        else:
            seen["list"] += 1
            for h in got:
                assert h.name in wanted and h.preference == wanted[h.name], (d, h, wanted)
            if family == "any":
                want = {n for n in wanted if n in addressed}
                assert {h.name for h in got} == want, (d, got, wanted)
    assert all(v >= 3 for v in seen.values()), seen


async def test_seeded_random_tlsa_rrsets(dns_srv: DnsServer) -> None:
    """Unknown usages, selectors and matching types, digests of the wrong length, many records:
    the lookup says usable/unusable by RFC 7672 §3.1.3 and RFC 7671 §5.2, and the plan follows."""
    dns_srv.set_ad(True)
    resolver = dane.make_dnssec(_mx(dns_srv).resolver)
    rng = random.Random(7672)
    try:
        for n in range(40):
            host = f"mx{n}.tlsa.test"
            records = []
            for _ in range(rng.choice([1, 1, 2, 4, 60])):
                usage = rng.choice([2, 3, 3, 0, 1, 4, 255])
                selector = rng.choice([0, 1, 1, 2, 255])
                mtype = rng.choice([0, 1, 1, 2, 3, 255])
                # dnspython (2.9) refuses SHA-256/512 data of the wrong length even on the wire: see
                # test_wrong_length_digest_on_the_wire; other matching types carry any length.
                size = {1: 32, 2: 64}.get(mtype) or rng.choice([32, 64, 31, 33, 1, 200])
                records.append((usage, selector, mtype, bytes(rng.randrange(256) for _ in range(size))))
                dns_srv.add(f"_25._tcp.{host}.", "TLSA", f"{usage} {selector} {mtype} {records[-1][3].hex()}")
            t0 = time.perf_counter()
            got = await dane.lookup(resolver, host, 25)
            assert time.perf_counter() - t0 < 3.0
            want_usable = {Tlsa(*rec) for rec in records if rec[0] in (2, 3) and rec[1] in (0, 1)
                           and {0: len(rec[3]) > 0, 1: len(rec[3]) == 32, 2: len(rec[3]) == 64}.get(rec[2], False)}
            assert set(got.records) == {Tlsa(*rec) for rec in records}, got.detail
            assert set(got.usable_records) == want_usable
            assert got.state == ("usable" if want_usable else "unusable")
            plan = plan_host("dane", "tlsa.test", host, None, got)
            assert plan.require_tls and not plan.refuse
            assert (plan.auth, set(plan.tlsa)) == (("dane", want_usable) if want_usable else ("none", set()))
    finally:
        dns_srv.set_ad(False)


async def test_wrong_length_digest_on_the_wire(dns_srv: DnsServer) -> None:
    """A TLSA RRset with a SHA-256 digest of 31 bytes next to a good record. RFC 7672 §2.2: the bad
    record is unusable and the good one is used (dnspython cannot parse such an answer whole: the
    answer is read record by record, see tolerantdns.py). Bounded, and TLS stays mandatory."""
    dns_srv.set_ad(True)
    try:
        resolver = dane.make_dnssec(MxResolver(DnsConfig(nameservers=[HostPort("127.0.0.1", dns_srv.port)],
                                                         timeout=0.3)).resolver)
        t0 = time.perf_counter()
        got = await dane.lookup(resolver, "badtlsa.test", 25)
        assert time.perf_counter() - t0 < 2.0
    finally:
        dns_srv.set_ad(False)
    assert got.state == "usable" and "1 malformed record(s) ignored" in got.detail, got
    assert all(r.usable for r in got.usable_records)
    plan = plan_host("dane", "badtlsa.test", "badtlsa.test", None, got)
    assert plan.require_tls and (plan.refuse or plan.auth == "none" or plan.tlsa == got.usable_records)


def test_tlsa_usability_against_seeded_records() -> None:
    """RFC 7672 §3.1.3 (DANE-TA and DANE-EE only; Cert or SPKI) and the digest length of the matching type."""
    rng = random.Random(6698)
    for _ in range(5000):
        usage, selector, mtype = (rng.choice([0, 1, 2, 3, 4, 255]) for _ in range(3))
        data = rng.randbytes(rng.choice([0, 1, 31, 32, 33, 63, 64, 65, 300]))
        want = usage in (2, 3) and selector in (0, 1) and \
            {0: len(data) > 0, 1: len(data) == 32, 2: len(data) == 64}.get(mtype, False)
        assert Tlsa(usage, selector, mtype, data).usable is want


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_dane_matching_against_mangled_chains(tmp_path: Path) -> None:
    """The chain is the MX's to choose: bytes OpenSSL took may still be refused by cryptography's
    parser, or carry a key it cannot load. That is "no match", never an exception out of DANE."""
    ca = TestCA(tmp_path)
    leaf = ca.issue("leaf", ["mx.example"])
    ca_der = ca.cert.public_bytes(Encoding.DER)
    spki = leaf.cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    records = [Tlsa(2, 0, 1, hashlib.sha256(ca_der).digest()), Tlsa(3, 1, 1, hashlib.sha256(spki).digest()),
               Tlsa(3, 0, 0, leaf.der), Tlsa(2, 1, 2, b"\x00" * 64), Tlsa(3, 1, 1, b"\x00" * 31)]
    assert dane.verify_chain(records, [leaf.der, ca_der], ["mx.example"])[0]
    rng = random.Random(7671)

    def mangle(der: bytes) -> bytes:
        b = bytearray(der)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return rng.choice([bytes(b), bytes(b), der[:rng.randrange(len(der))], bytes(rng.randrange(256) for _ in
                                                                                  range(rng.randint(0, 64)))])
    for _ in range(1000):
        chain = [mangle(leaf.der) if rng.random() < 0.8 else leaf.der,
                 *([rng.choice([ca_der, mangle(ca_der)])] if rng.random() < 0.8 else [])]
        ok, detail = dane.verify_chain(rng.sample(records, rng.randint(1, len(records))), chain, ["mx.example"])
        assert isinstance(ok, bool) and detail
        for rec in records:
            assert isinstance(dane.record_matches(rec, chain[0]), bool)


# --- the policy as fetched over HTTPS ------------------------------------------------------------
@pytest.fixture
async def policy_host(tmp_path: Path, dns_srv: DnsServer) -> AsyncIterator[tuple[PolicyServer, TestCA]]:
    """The shared policy host (tests/support/policyserver.py) for mta-sts.f0-f7.fetch.test."""
    why = cannot_bind_443()
    if why:
        pytest.skip(why)
    ca = TestCA(tmp_path)
    names = [f"mta-sts.f{i}.fetch.test" for i in range(8)]
    for n in names:
        dns_srv.add(f"{n}.", "A", "127.0.0.1")
    srv = await PolicyServer(ca.issue("policy", names)).start()
    yield srv, ca
    await srv.stop()


async def test_fetched_hostile_policies_are_fetch_errors_and_never_enforced(
        policy_host: tuple[PolicyServer, TestCA], dns_srv: DnsServer) -> None:
    srv, ca = policy_host
    good = b"version: STSv1\nmode: enforce\nmx: mx.example\nmax_age: 86400\n"
    cases = {
        "f0.fetch.test": good,
        "f1.fetch.test": good.replace(b"86400", "²".encode()),            # int() refuses what isdigit() took
        "f2.fetch.test": good.replace(b"86400", ARABIC_INDIC_123.encode()),
        "f3.fetch.test": good.replace(b"mx.example", b""),                  # enforce that would match no MX
        "f4.fetch.test": good.replace(b"mx.example", "bücher.example".encode()),
        "f5.fetch.test": b"\xff\xfe" + good,                                  # not UTF-8
        "f6.fetch.test": good + b"note: " + b"x" * mta_sts.MAX_POLICY_BYTES,  # too large
        "f7.fetch.test": good.replace(b"\n", b"\r"),                          # CR alone ends no line
    }
    srv.policies.update(cases)
    resolver = _mx(dns_srv).resolver
    ctx = client_context(True, ca.ca_file)

    async def fetch(domain: str) -> StsPolicy:
        return await mta_sts.fetch_policy(domain, resolver, ctx, timeout=5.0)

    async def txt(domain: str) -> str | None:
        return "1"

    cache = MtaSts(None, txt, fetch)
    try:
        entries = await asyncio.gather(*(cache.lookup(d) for d in cases))
    finally:
        await cache.close()
    for domain, entry in zip(cases, entries, strict=True):
        if domain == "f0.fetch.test":
            assert entry.policy is not None and entry.policy.mode == "enforce"
            continue
        assert entry.policy is None, domain
        err = cache.fetch_errors[domain]
        assert isinstance(err, FetchError) and err.result_type == "sts-policy-invalid", (domain, err)
