"""Seeded fuzz of what every accepted message passes through, in memory: the header scan, the From/Sender
rules of submission, the fields the intake inserts (mailrelayd.smtp.headers, .policy, mailrelayd.intake)
and the address parser (mailrelayd.smtp.address), fed values nobody wrote by hand.

Every case comes from a fixed seed; a failure names the case and reproduces. The invariants:

- parsers return a decision or raise AddressError (mapped to 553 with an enhanced code), never another
  exception, in bounded time (1 MB values included: no quadratic or worse path);
- a header From is accepted only if it holds valid mailboxes, and then exactly those, with the domain in
  the one normal form (lowercase, IDNA, config.normalize_domain); anything ambiguous (group, empty,
  ``a@b@c``, undecodable bytes, an encoded word in a domain, unparsable) is refused; the domain reported
  is "" rather than a guess, and the DKIM signer never signs for another domain than it;
- what the intake stores is the original with CRLF-terminated header lines of at most 998 octets
  (RFC 5322 §2.1.1) and no CR, LF or NUL inside them, inserted in the header block, before the empty
  line; and a receiver parsing it sees exactly the From and Sender fields the policy checked;
- an envelope path parses to the normalised mailbox its parts say (a source route, the case of the
  domain or its trailing dot change nothing), which formats and parses back to itself, or is refused.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.header
import email.policy
import ipaddress
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from mailrelayd.config import load_config, normalize_domain
from mailrelayd.dkim import DkimKeySpec, DkimSigner, generate_key, load_key, write_private_key
from mailrelayd.errors import MessageRefused, Reply, address_refusal
from mailrelayd.intake import Intake, Origin
from mailrelayd.smtp.address import (
    MAX_PARSED_VALUE,
    AddressEncodingError,
    AddressError,
    Mailbox,
    header_mailboxes_by_email,
    parse_command_path,
    parse_header_mailboxes,
    parse_mailbox,
    split_path,
)
from mailrelayd.smtp.dataread import BARE_CR_LF
from mailrelayd.smtp.headers import HeaderScan, insert_fields, scan_headers
from mailrelayd.smtp.policy import (
    HEADER_FROM_NOT_OWNED,
    INVALID_FROM,
    INVALID_SENDER,
    MULTIPLE_FROM,
    NO_FROM,
    Policy,
)
from mailrelayd.spool.store import NewMessage, Spool
from mailrelayd.users import User
from tests.conftest import TEST_HASH, base_config, write_config

ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
_DOT_ATOM = re.compile(rf"(?:[{re.escape(ATEXT)}]|[^\x00-\x7f])+(?:\.(?:[{re.escape(ATEXT)}]|[^\x00-\x7f])+)*\Z")
OWN = "example.com"  # the domain alice may send as
ALICE = User("alice", TEST_HASH, ("@" + OWN,))
N_MESSAGES = 400
PM = "pm.example"  # the domain of a bare <Postmaster>
T = TypeVar("T")
SLOW = 1.0  # seconds: no single call may take longer (the slowest, on 1 MB, takes about 0.1 s)



def _v6(ip: ipaddress.IPv6Address) -> str:
    """The one spelling of an IPv6 literal (RFC 5952; IPv4-mapped in the mixed notation of its §5)."""
    return f"::ffff:{ip.ipv4_mapped}" if ip.ipv4_mapped is not None else ip.compressed

def timed(fn: Callable[[], T]) -> T:
    t0 = time.perf_counter()
    try:
        return fn()
    finally:
        assert time.perf_counter() - t0 < SLOW, "too slow"


def canonical_local(content: str) -> str:
    """The one spelling of a local part (RFC 5321 §4.1.2): a dot-atom bare, anything else quoted."""
    if _DOT_ATOM.match(content):
        return content
    return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'


def utf8_bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")  # lone surrogates stand for bytes that are not UTF-8


# --- parts of addresses ----------------------------------------------------------------------------
def atom(rng: random.Random, n: int = 8) -> str:
    while True:
        a = "".join(rng.choice(ATEXT) for _ in range(rng.randint(1, n)))
        if "=?" not in a and "?=" not in a:  # not an encoded word by accident
            return a


def dot_atom(rng: random.Random) -> str:
    return ".".join(atom(rng) for _ in range(rng.randint(1, 3)))


def label(rng: random.Random, n: int = 12) -> str:
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    size = rng.randint(1, n)
    inner = "".join(rng.choice(chars + "-") for _ in range(max(0, size - 2)))
    return rng.choice(chars) + inner + (rng.choice(chars) if size > 1 else "")


def random_case(rng: random.Random, s: str) -> str:
    return "".join(c.upper() if rng.random() < 0.3 else c for c in s)


@dataclass(frozen=True)
class Part:
    """A local part or a domain as written, and what it must parse to (None: it must be refused)."""

    text: str
    want: str | None
    utf8: bool = False  # needs SMTPUTF8
    encoding: bool = False  # refused as an encoding error (5.6.7), not a syntax error


def local_part(rng: random.Random, *, header: bool = False) -> Part:
    kind = rng.randrange(12)
    if kind < 5:
        a = dot_atom(rng)
        return Part(a, a)
    if kind < 8:  # quoted, with escapes, needless ones included
        pool = ATEXT + ' .@,<>()[]:;"\\'
        content = "".join(rng.choice(pool) for _ in range(rng.randint(1, 12)))
        if header and rng.random() < 0.3:
            content += "  x"  # blanks a fold may fall between (unfolding keeps each of them)
        text = '"' + "".join("\\" + c if c in '"\\' or rng.random() < 0.1 else c for c in content) + '"'
        return Part(text, canonical_local(content))
    if kind == 8:
        a = rng.choice(["jörg", "δοκιμή", "用户", "ñ.x"])
        return Part(a, a, utf8=True)
    bad = rng.choice([
        Part("x" * 65, None), Part('"' + "x y" * 22 + '"', None), Part(".a", None), Part("a.", None),
        Part("a..b", None), Part('""', None), Part('"a', None), Part('"a\x01"', None), Part("a b", None),
        Part("a\udcff", None, encoding=True), Part('"\udcfe"', None, encoding=True),
    ])
    if header and bad.text in ("a b", "a."):  # obsolete header syntax reads these differently
        return Part("a\udcff", None, encoding=True)
    return bad


def domain(rng: random.Random, *, literals: bool = True, own: float = 0.0) -> Part:
    kind = rng.randrange(10)
    if rng.random() < own:
        return Part(random_case(rng, OWN), OWN)
    if kind < 5:
        d = ".".join(label(rng) for _ in range(rng.randint(1, 3))) + rng.choice([".example", ".com", ".ORG", ""])
        d = random_case(rng, d)
        if d.rpartition(".")[2].isdigit():  # RFC 1123 §2.1: no all-numeric top label
            return Part(d, None)
        return Part(d, normalize_domain(d))
    if kind == 5:
        d = rng.choice(["Bücher.example", "exämple.COM", "пример.рф", "xn--bcher-kva.example"])
        return Part(d, normalize_domain(d), utf8=not d.isascii())
    if kind == 6 and literals:
        if rng.random() < 0.5:
            v4 = ipaddress.IPv4Address(rng.getrandbits(32))
            return Part(f"[{v4}]", f"[{v4}]")
        v6 = ipaddress.IPv6Address(rng.getrandbits(128) if rng.random() < 0.5 else rng.getrandbits(16))
        text = rng.choice([v6.exploded, v6.compressed, v6.compressed.upper()])
        return Part(f"[{rng.choice(['IPv6', 'ipv6'])}:{text}]", f"[IPv6:{_v6(v6)}]")
    return rng.choice([
        Part("x" * 64 + ".example", None), Part(".".join(["a" * 60] * 5), None), Part("a..b.example", None),
        Part("-a.example", None), Part("a_b.example", None), Part("[300.1.2.3]", None), Part("[1.2.3]", None),
        Part("[IPv6:fe80::1%eth0]", None), Part("[IPv6:zz::1]", None), Part("[tag:x]", None),
        Part("[1.2.3.4", None), Part("ex\udcffample.com", None, encoding=True), Part("", None),
    ])


# --- envelope paths (MAIL FROM / RCPT TO) -------------------------------------------------------------
@dataclass(frozen=True)
class EnvelopeCase:
    arg: str
    want: Mailbox | None  # None: refused
    rest: str
    utf8: bool
    encoding: bool | None  # refused as an encoding error (None: syntax errors too, either code)
    variants: tuple[str, ...] = ()  # the same mailbox written otherwise: another case, a source route


def envelope_path(rng: random.Random) -> EnvelopeCase:
    local, dom = local_part(rng), domain(rng)
    route = rng.choice(["", "", "@r1.example:", "@r1.example,@R2.example:"])
    path = f"{route}{local.text}@{dom.text}"
    if dom.want is not None and not dom.want.startswith("[") and rng.random() < 0.2:
        path += "."  # the root's trailing dot
    params = rng.choice(["", "", " SIZE=100", " BODY=8BITMIME SMTPUTF8"])
    utf8 = rng.random() < 0.7
    want: Mailbox | None = None
    syntax_error = (local.want is None and not local.encoding) or (dom.want is None and not dom.encoding)
    if local.want is not None and dom.want is not None:
        want = Mailbox(local.want, dom.want, dom.want.startswith("["))
        if len(utf8_bytes(local.want)) > 64 or len(path) > 254 or len(utf8_bytes(str(want))) > 254:
            want, syntax_error = None, True  # RFC 5321 §4.5.3.1: local part 64 octets, path 256 with brackets
    encoding: bool | None = local.encoding or dom.encoding or ((local.utf8 or dom.utf8) and not utf8)
    if encoding:
        want = None
    if syntax_error:
        encoding = None
    if rng.random() < 0.1 and " " not in path and '"' not in path:
        return EnvelopeCase(path + params, want, params[1:], utf8, encoding)  # no brackets: old clients
    variants: tuple[str, ...] = ()
    if want is not None and not want.is_literal and dom.text.isascii():
        variants = (f"<{route}{local.text}@{dom.text.swapcase()}>{params}",
                    f"<@relay.example:{local.text}@{dom.text}>{params}")
    return EnvelopeCase(f"<{path}>{params}", want, params, utf8, encoding, variants)


ENVELOPE_EXTRA = [  # (argument, mailbox or None for refused)
    ("<>", None), ("<> SIZE=10", None), ("<@a,@b:u@d.example>", Mailbox("u", "d.example")),
    ('<@a.example:"j d"@D.example>', Mailbox('"j d"', "d.example")), ("<a@b@c.example>", None),
    ("<" + "x" * 64 + "@" + ".".join(["a" * 63] * 3) + ".bb>", None), ("<a@" + "b" * 64 + ".example>", None),
    ("<" + "x" * 64 + "@" + ".".join(["ü" * 10] * 12) + ".de>", None),  # 199 characters, 271 once IDNA-encoded
    ("<" + "a" * 1_000_000 + "@example.com>", None), ("<" + '"' * 1_000_000 + ">", None),
    ("<" + "@a," * 300_000 + "@b:u@d.example>", None), ("<u@" + "a." * 500_000 + "example>", None),
    ("<" + "\\" * 1_000_000, None), ("<a@[IPv6:::ffff:1.2.3.4]>", Mailbox("a", "[IPv6:::ffff:1.2.3.4]", True)),
    ("<a@[IPv6:0:0:0:0:0:ffff:c000:201]>", Mailbox("a", "[IPv6:::ffff:192.0.2.1]", True)),  # RFC 5952 §5
    ("<a@[IPv6:fe80::1%25eth0]>", None), ("<a@[IPv6:fe80::1%]>", None),
    ("<Postmaster>", Mailbox("postmaster", PM)), ("<POSTMASTER>", Mailbox("postmaster", PM)),
    ("<postmaster@>", None), ('<"postmaster">', None),
    ("<a@192.0.2.1>", None), ("<a@example.123>", None), ("<a@123.example>", Mailbox("a", "123.example")),
]


def check_envelope(arg: str, *, utf8: bool, want: Mailbox | str | None, rest: str | None,
                   encoding: bool | None) -> None:
    """``want``: the mailbox, None (refused), or "any" (only the general invariants)."""
    try:
        mb, got_rest = timed(lambda: parse_command_path(arg, allow_null=True, utf8=utf8, postmaster_domain=PM))
    except AddressError as e:
        for sender in (True, False):
            r = address_refusal(e, sender=sender)
            assert r.code == 553
            assert r.enhanced == ("5.6.7" if isinstance(e, AddressEncodingError) else "5.1.7" if sender else "5.1.3")
        if want != "any":
            assert want is None, f"refused ({e}), should be {want}"
        if encoding is not None:
            assert isinstance(e, AddressEncodingError) == encoding, e
        return
    if want != "any":
        assert mb == want
    if rest is not None:  # with or without the blank that separates it from the path
        assert got_rest.lstrip(" ") == rest.lstrip(" ")
    if mb is None:
        assert split_path(arg)[0] == ""
        return
    # The one normal form: the shared domain normaliser, literals in their canonical spelling.
    if mb.is_literal:
        assert mb.domain.startswith("[") and _parse_literal(mb.domain) == mb.domain
    else:
        assert mb.domain == normalize_domain(mb.domain)
    assert len(utf8_bytes(mb.local)) <= 64 and len(utf8_bytes(str(mb))) <= 254
    # Formats and parses back to itself; the fast path and the full parser agree.
    u = not str(mb).isascii()
    assert parse_command_path(f"<{mb}>", allow_null=False, utf8=u) == (mb, "")
    if mb.local != "postmaster" or "@" in arg:
        assert parse_mailbox(split_path(arg)[0], utf8=utf8) == mb


def _parse_literal(text: str) -> str:
    inner = text[1:-1]
    if inner.startswith("IPv6:"):
        return f"[IPv6:{_v6(ipaddress.IPv6Address(inner[5:]))}]"
    return f"[{ipaddress.IPv4Address(inner)}]"


def test_envelope_paths_parse_to_one_normal_form_or_are_refused() -> None:
    rng = random.Random(5321)
    for i in range(2500):
        p = envelope_path(rng)
        try:
            check_envelope(p.arg, utf8=p.utf8, want=p.want, rest=p.rest, encoding=p.encoding)
            for variant in p.variants:  # the domain's case and a source route change nothing
                check_envelope(variant, utf8=p.utf8, want=p.want, rest=p.rest, encoding=False)
        except AssertionError as e:
            raise AssertionError(f"case {i}: {p.arg[:300]!r} utf8={p.utf8}: {e}") from None
    for arg, want in ENVELOPE_EXTRA:
        try:
            check_envelope(arg, utf8=True, want=want, rest=None, encoding=None)
        except AssertionError as e:
            raise AssertionError(f"{arg[:100]!r}: {e}") from None


def test_envelope_paths_of_random_characters() -> None:
    rng = random.Random(6531)
    pieces = ["a", "B", ".", "..", "@", "<", ">", '"', "\\", " ", ",", ":", "[", "]", "IPv6:", "::1", "1.2.3.4",
              "example.com", "ö", "\udcff", "\x00", "\x7f", "%", "xn--", "postmaster", "@r:", "=", "\r\n", "\t"]
    for i in range(3000):
        arg = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 10)))
        arg = rng.choice(["<%s>", "%s", "<%s> SIZE=1", " <%s>"]) % arg
        try:
            check_envelope(arg, utf8=rng.random() < 0.5, want="any", rest=None, encoding=None)
        except AssertionError as e:
            raise AssertionError(f"case {i}: {arg!r}: {e}") from None


# --- header address fields (From, Sender) -------------------------------------------------------------
@dataclass(frozen=True)
class Value:
    """An address field value (lone surrogates for bytes that are not UTF-8) and the mailboxes it holds:
    None if it must be refused; ``sure`` False when either outcome is right, provided an accepted value
    holds ``want`` (when given)."""

    text: str
    want: tuple[Mailbox, ...] | None
    sure: bool = True


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


CLEAN_NAMES = ["Alice", "John Q. Public", '"Smith, J"', '"a \\"b\\" \\\\ c"', "=?utf-8?q?Al=C3=A9?=",
               f"=?utf-8?b?{_b64('Jörg <ceo@victim.example>')}?=", "Jörg Müller", "(comment) Bob", '""', "a.b"]
ODD_NAMES = ["=?utf-8?q?a=0D=0ABcc:_x@victim.example?=", f"=?utf-8?b?{_b64('a' + chr(13) + chr(10) + 'b')}?=",
             "=?utf-8?q?nul=00?=", "=?utf-8?q?broken", "=?bogus?x?y?=", "=?utf-8?b?!!!?=", "Al\x01ice", "\x00",
             "=?utf-8?q?x?==?utf-8?q?y?="]


def comment(rng: random.Random, depth: int) -> str:
    inner = rng.choice(["", "x", "a@evil.example", "<b@evil.example>", '"', "\\)", "=?utf-8?q?c?="])
    return "(" + inner + (comment(rng, depth - 1) if depth > 1 else "") + ")"


def fws(rng: random.Random) -> str:
    return rng.choice(["", "", "", " ", "\t", "  "])


def addr_spec(rng: random.Random, own: float) -> tuple[str, Mailbox | None]:
    """An addr-spec as written, and its mailbox (None: it must be refused)."""
    local, dom = local_part(rng, header=True), domain(rng, own=own)
    kind = rng.randrange(20)
    if kind == 0:  # an encoded word where RFC 2047 §5 forbids one: receivers read it as text
        return f"{local.text}@=?utf-8?q?{dom.text}?=", None
    if kind == 1:
        return f"{local.text}@{dom.text}@{label(rng)}.example", None  # a@b@c
    if kind == 2 and dom.want is not None and not dom.want.startswith("["):
        return f"{local.text}@{dom.text}.", None  # a trailing dot is not RFC 5322 syntax
    if local.want is None or dom.want is None:
        return f"{local.text}@{dom.text}", None
    mb = Mailbox(local.want, dom.want, dom.want.startswith("["))
    if len(utf8_bytes(mb.local)) > 64 or len(utf8_bytes(str(mb))) > 254:
        return f"{local.text}@{dom.text}", None
    if kind == 3:  # CFWS around the parts (RFC 5322 §3.4.1, §4.4)
        written = local.text
        if not written.startswith('"'):
            written = written.replace(".", f"{fws(rng)}.{fws(rng)}")
        return f"{fws(rng)}{written}{fws(rng)}@{fws(rng)}{comment(rng, 2)}{dom.text}{fws(rng)}", mb
    return f"{local.text}@{dom.text}", mb


def mailbox_value(rng: random.Random, own: float = 0.0) -> Value:
    text, mb = addr_spec(rng, own)
    shape = rng.randrange(6)
    if shape == 0:
        out = f"{fws(rng)}{text}{fws(rng)}"
    elif shape == 1:
        out = f"{text} {comment(rng, rng.randint(1, 6))}"
    elif shape == 2:  # obs-route (RFC 5322 §4.4): email.utils.getaddresses, the signer's parser, reads
        # "@r1,@r2:" as two addresses; the field is then ambiguous and may be refused.
        route = rng.choice(["", "@r.example:", "@r1.example,@r2.example:"])
        out = f"{fws(rng)}<{route}{text}>{fws(rng)}"
        if "," in route:
            return Value(out, (mb,) if mb else None, sure=mb is None)
    else:
        name = rng.choice(CLEAN_NAMES)
        # RFC 2047 §5: an encoded word is followed by a blank, not by a special such as "<".
        out = f"{fws(rng)}{name}{fws(rng) if not name.endswith('?=') else ' '}<{text}>{fws(rng)}"
        if rng.random() < 0.2:
            odd = rng.choice(ODD_NAMES)
            return Value(f"{odd} <{text}>", (mb,) if mb else None, sure=mb is None)
    return Value(out, (mb,) if mb else None)


def address_value(rng: random.Random, own: float = 0.0) -> Value:
    kind = rng.randrange(20)
    if kind < 12:
        return mailbox_value(rng, own)
    if kind < 14:  # two authors
        a, b = mailbox_value(rng, own), mailbox_value(rng, own)
        both = a.want + b.want if a.want and b.want else None
        return Value(f"{a.text},{fws(rng)}{b.text}", both, a.sure and b.sure)
    if kind == 14:  # groups: no mailbox of their own
        members = ", ".join(mailbox_value(rng, own).text for _ in range(rng.randint(0, 2)))
        return Value(rng.choice(["undisclosed-recipients:;", f"Team: {members};", ":;", "g:;, a@b.example"]), None)
    if kind == 15:
        return Value(rng.choice(["", " ", "\t", "<>", "Alice <>", "<", "a <", "a@", "@b.example", "alice",
                                 "ceo@victim.example <alice@example.com>", "a@b.example c@d.example",
                                 "a@example.com\udcff", "J\udcf6rg <j@example.com>", '"J\udcf6rg" <j@example.com>',
                                 "(" * 10_000 + "a@example.com", "(" * 480 + "x" + ")" * 480 + "a@example.com",
                                 "a@example.com " + "(" * 10_000]), None)
    if kind == 16:  # a route before a whole mailbox: valid (RFC 5322 §4.4) if that is a bare addr-spec
        mb = mailbox_value(rng, own)
        return Value(f"{fws(rng)}<@a.example:{mb.text.strip()}>", mb.want, sure=False)
    pieces = ["a", "@", "<", ">", "(", ")", '"', "\\", ",", ";", ":", ".", "[", "]", " ", "\t", "=?utf-8?q?x?=",
              "=?", "?=", "example.com", "ö", "\udcff", "\x00", "IPv6:", "::1", "1.2.3.4", "\x7f", "\r", "\n"]
    return Value("".join(rng.choice(pieces) for _ in range(rng.randint(1, 14))), None, sure=False)


def outcome(fn: Callable[[str], list[Mailbox]], value: str) -> tuple[Mailbox, ...] | None:
    try:
        got = timed(lambda: fn(value))
    except AddressError:
        return None
    assert isinstance(got, list) and got and all(isinstance(m, Mailbox) for m in got)
    return tuple(got)


def check_value(v: Value) -> tuple[Mailbox, ...] | None:
    got = outcome(parse_header_mailboxes, v.text)
    if v.sure or (got is not None and v.want is not None):
        assert got == v.want, f"got {got}, want {v.want}"
    if got is not None:
        for mb in got:
            if mb.is_literal:
                assert _parse_literal(mb.domain) == mb.domain
            else:
                assert mb.domain == normalize_domain(mb.domain)
            assert outcome(parse_header_mailboxes, str(mb)) == (mb,), "does not parse back to itself"
    if len(v.text) <= MAX_PARSED_VALUE:  # the fast path decides as the email package's parser does
        assert outcome(header_mailboxes_by_email, v.text) == got, "fast path and email parser disagree"
    return got


def test_header_address_fields_hold_exactly_their_valid_mailboxes() -> None:
    rng = random.Random(5322)
    seen = {"accepted": 0, "refused": 0}
    for i in range(1200):
        v = address_value(rng)
        try:
            got = check_value(v)
        except AssertionError as e:
            raise AssertionError(f"case {i}: {v.text[:300]!r}: {e}") from None
        seen["accepted" if got else "refused"] += 1
    assert min(seen.values()) > 300, seen  # the generator exercises both outcomes


@pytest.mark.parametrize("value", [
    "a@example.com" + " " * 1_000_000, " " * 1_000_000 + "x", "Alice " * 200_000 + "<a@example.com>",
    "a." * 500_000 + "<a@example.com>", "a" * 1_000_000 + " x", '"' + "x" * 1_000_000 + '" <a@example.com>',
    "(" * 1_000_000, "a" + " (x)" * 250_000 + " <a@example.com>", ", ".join(["a@example.com"] * 70_000),
    "," * 1_000_000 + "a@example.com", "a " * 500_000 + "<", "=?utf-8?q?x?= " * 70_000 + "<a@example.com>",
])
def test_one_megabyte_address_field_is_decided_quickly(value: str) -> None:
    outcome(parse_header_mailboxes, value)


def test_deeply_nested_comments_are_decided_alike_at_any_stack_depth() -> None:
    """The email parser recurses once per nested comment (RFC 5322 §3.2.2): the decision must not depend on
    how deep the caller already is (the SMTP edge, the HTTP API, a test runner)."""
    value = "(" * 200 + ")" * 200 + "a@example.com"

    def at_depth(n: int) -> tuple[Mailbox, ...] | None:
        return outcome(parse_header_mailboxes, value) if n == 0 else at_depth(n - 1)

    assert {at_depth(n) for n in (0, 300, 600)} == {None}


# --- messages through the intake -----------------------------------------------------------------------
class MemorySpool(Spool):
    """Keeps what the intake commits in a list: no database, no disk."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.messages: list[NewMessage] = []

    def start_commit(self, msg: NewMessage) -> Awaitable[None]:
        self.messages.append(msg)
        return asyncio.sleep(0)


@dataclass
class Message:
    data: bytes
    froms: list[Value]  # the From fields in the header block, in order
    senders: list[Value]
    clean: bool  # every field well-formed and in the header block: the policy's decision is known


def fold(rng: random.Random, value: bytes) -> bytes:
    """Fold at some of the blanks (RFC 5322 §2.2.3): CRLF before a space, which unfolding keeps."""
    parts = value.split(b" ")
    out = parts[0]
    for p in parts[1:]:
        out += (b"\r\n " if rng.random() < 0.3 else b" ") + p
    return out


OTHER_FIELDS = [b"Subject: hello", b"To: bob@example.net", b"X-Mailer: fuzz", b"Received: from x by y; now",
                b"Subject: =?utf-8?q?=0D=0AFrom:_evil@victim.example?=", b"X-Empty:", b"Cc: a@b.example, c@d.example",
                b"Subject: caf\xc3\xa9", b"Subject: caf\xe9", b"Comments: (((((((((x", b"MIME-Version: 1.0"]
JUNK_LINES = [b"just a body line", b"Bad Name: x", b"Subject : obsolete space before the colon", b"no colon here",
              b":no name", b"From alice@example.com Mon Jan  1 00:00:00 2026", b"\x00", b"\xff\xfe"]


def message(rng: random.Random) -> Message:
    clean = rng.random() < 0.5
    lines: list[bytes] = []
    froms: list[Value] = []
    senders: list[Value] = []
    n_from = rng.choice([1, 1, 1, 1, 0, 2]) if clean else rng.choice([0, 1, 1, 2, 3])
    n_sender = rng.choice([0, 0, 0, 1, 2])
    fields: list[tuple[str, Value | bytes]] = []
    fields += [("From", address_value(rng, own=0.7)) for _ in range(n_from)]
    fields += [("Sender", address_value(rng, own=0.7)) for _ in range(n_sender)]
    if rng.random() < 0.6:
        fields.append(("Message-ID", b"<%d@client.example>" % rng.getrandbits(32)))
    if rng.random() < 0.6:
        fields.append(("Date", b"Mon, 1 Jan 2026 00:00:00 +0000"))
    fields += [("", rng.choice(OTHER_FIELDS)) for _ in range(rng.randint(0, 4))]
    rng.shuffle(fields)
    for name, val in fields:
        if isinstance(val, Value):
            if any(c in val.text for c in "\r\n"):
                clean = False
            (froms if name == "From" else senders).append(val)
            raw = utf8_bytes(val.text).strip(b" \t")
            line = rng.choice([name, name.lower(), name.upper()]).encode() + b":" + rng.choice([b" ", b"", b"\t"]) + raw
        else:
            line = val if not name else name.encode() + b": " + val
        lines.append(fold(rng, line))
    if not clean and lines and rng.random() < 0.3:  # bare line ends, NUL and whitespace lines in the header
        i = rng.randrange(len(lines))
        lines[i] += rng.choice([b"\n", b"\r", b"\nFrom: evil@victim.example", b"\x00", b"\r\n ", b"\r\n\t\r\n "])
    head = b"\r\n".join(lines)
    if clean and not all(v.sure for v in froms + senders):
        clean = False
    body = rng.choice([b"", b"body\r\n", b"From: evil@victim.example\r\n\r\nx\r\n", b"line\r\n" * 3, b"\r\n"])
    ending = rng.randrange(6) if not clean else rng.choice([0, 0, 1])
    if ending == 0:
        data = head + b"\r\n\r\n" + body if head else b"\r\n" + body
    elif ending == 1:  # header only
        data = head + b"\r\n" if head else b""
    elif ending == 2:  # no empty line: the body begins at the first line that is not a field
        data = head + b"\r\n" + rng.choice(JUNK_LINES) + b"\r\n" + body
    elif ending == 3:  # a "blank" line of whitespace: a continuation line, not the end of the header
        data = head + b"\r\n \t\r\n" + rng.choice([*JUNK_LINES, b""]) + b"\r\n" + body
    elif ending == 4:  # no CRLF at the very end
        data = head
    else:  # other line ends throughout
        data = (head + b"\r\n\r\n" + body).replace(b"\r\n", rng.choice([b"\n", b"\r", b"\n\r"]))
    return Message(data, froms, senders, clean)


def big_messages() -> Iterator[tuple[str, bytes]]:
    mb = b"alice@example.com"
    yield "10,000 fields", b"".join(b"X-F%d: v\r\n" % i for i in range(10_000)) + b"From: " + mb + b"\r\n\r\nb\r\n"
    yield "10,000 From", (b"From: (x) <" + mb + b">\r\n") * 10_000 + b"\r\nb\r\n"
    yield "10,000 Sender", b"From: " + mb + b"\r\n" + (b"Sender: (x) <" + mb + b">\r\n") * 10_000 + b"\r\nb\r\n"
    yield "From folded into 20,000 lines", b"From: " + mb + b"\r\n" + b" (cc)\r\n" * 20_000 + b"\r\nb\r\n"
    yield "1 MB From line", b"From: " + b"(" * 1_000_000 + mb + b"\r\n\r\nb\r\n"
    yield "1 MB simple From", b"From: Alice" + b" " * 1_000_000 + b"<" + mb + b">\r\n\r\nb\r\n"
    yield "1 MB Subject", b"From: " + mb + b"\r\nSubject: " + b"x" * 1_000_000 + b"\r\n\r\nb\r\n"
    yield "10,000 nested comments", b"From: " + b"(" * 10_000 + mb + b")" * 10_000 + b"\r\n\r\nb\r\n"
    yield "1 MB of one body line", b"x" * 1_000_000
    yield "20,000 blank-looking lines", b"From: " + mb + b"\r\n" + b" \t \r\n" * 20_000 + b"b\r\n"
    yield "no header block", b"\r\nFrom: evil@victim.example\r\n"
    yield "empty", b""
    yield "first line a field, then body", b"Hello: this is the body\r\nof a message\r\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tls_files: tuple[Path, Path]) -> tuple[Policy, DkimSigner]:
    d = tmp_path_factory.mktemp("headers_fuzz")
    # The largest header section allowed, so that the big messages reach the parsers behind the limit
    # (the limit itself is tested in test_smtp_limits).
    data = base_config(tls_files)
    data.setdefault("limits", {})["max_header_size"] = data.get("limits", {}).get("max_message_size", "25MB")
    cfg = load_config(write_config(d / "cfg", data))
    submission = next(lst for lst in cfg.listeners if lst.name == "submission")
    pem, _ = generate_key("ed25519-sha256")
    write_private_key(d / "k.pem", pem)
    keys = [load_key(DkimKeySpec(dom, "s1", d / "k.pem", "ed25519-sha256"))
            for dom in (OWN, "example.org", "victim.example", "xn--bcher-kva.example", "xn--exmple-cua.com")]
    return Policy(cfg, submission, lambda _a: False), DkimSigner(keys)


def _lines(block: bytes) -> list[bytes]:
    assert block.endswith(b"\r\n"), block[-80:]
    return block[:-2].split(b"\r\n")


def check_stored(data: bytes, scan: HeaderScan, out: bytes, outbound: bool, mail_from: str) -> None:
    """What the intake stored is ``data`` with CRLF-terminated lines inserted at the end of its header."""
    assert out.startswith(b"Received: ")
    trace_end = out.index(b"\r\n") + 2
    while out.startswith(b"\t", trace_end):  # the Received field's continuation lines
        trace_end = out.index(b"\r\n", trace_end) + 2
    rest = out[trace_end:]
    assert rest[:scan.end] == data[:scan.end] and rest.endswith(data[scan.end:])
    inserted = rest[scan.end:len(rest) - (len(data) - scan.end)]
    for line in _lines(out[:trace_end]) + (_lines(inserted) if inserted else []):
        assert len(line) <= 998 and not any(c in line for c in b"\r\n\x00"), line[:100]
        assert line == b"" or re.match(rb"[!-9;-~]+:|[ \t]", line), line[:100]
    if inserted:
        assert (inserted == b"\r\n" or inserted.endswith(b"\r\n\r\n")) == scan.needs_separator
        assert data[:scan.end] == b"" or data[:scan.end].endswith(b"\r\n") or inserted.startswith(b"\r\n")
        assert b"\r\n\r\n" not in inserted[:-2]  # no empty line before the last of our fields
    else:
        assert not scan.needs_separator
    if b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"") and \
            (data == b"" or data.endswith(b"\r\n")):
        # Every line of what we store is CRLF-terminated.
        assert out.endswith(b"\r\n") and not any(c in out.replace(b"\r\n", b"") for c in b"\r\n")
    names = [line.split(b":", 1)[0].lower() for line in _lines(inserted or b"\r\n") if line[:1] not in b" \t"]
    assert (b"from" in names) == (outbound and not scan.from_values)
    assert (b"message-id" in names) == (outbound and not scan.has_message_id)
    assert (b"date" in names) == (outbound and not scan.has_date)
    if b"from" in names:
        assert b"From: <" + utf8_bytes(mail_from) + b">\r\n" in inserted
    # A receiver sees exactly the From and Sender fields that the policy saw: none hides in a line that the
    # scan took for another field, none of ours lands in the body.
    msg = email.message_from_bytes(out, policy=email.policy.compat32)

    def seen(name: str) -> list[bytes]:
        values = []
        for v in msg.get_all(name, []):
            if isinstance(v, str):
                raw = v.encode("ascii", "surrogateescape")
            else:  # compat32 hands a value with 8-bit bytes over as a Header in charset unknown-8bit
                raw = b"".join(p if isinstance(p, bytes) else p.encode() for p, _ in email.header.decode_header(v))
            values.append(b" ".join(raw.split()))
        return values

    want_from = [b" ".join(utf8_bytes(v).split()) for v in scan.from_values]
    if b"from" in names:
        want_from.append(b"<" + utf8_bytes(mail_from) + b">")
    assert sorted(seen("From")) == sorted(want_from)
    assert sorted(seen("Sender")) == sorted(b" ".join(utf8_bytes(v).split()) for v in scan.sender_values)
    assert len(seen("Received")) >= 1


def author_domain(values: list[str]) -> str:
    """That of the single From field when all its mailboxes share it, else "" (RFC 7489 §6.6.1)."""
    if len(values) != 1:
        return ""
    try:
        domains = {mb.domain for mb in parse_header_mailboxes(values[0])}
    except AddressError:
        return ""
    return domains.pop() if len(domains) == 1 else ""


def expected_refusal(m: Message) -> Reply | None:
    """The policy's decision for a clean message submitted by alice (RFC 5322 §3.6.2, RFC 6409 §8)."""
    if len(m.froms) > 1:
        return MULTIPLE_FROM
    if m.froms and m.froms[0].want is None:
        return INVALID_FROM
    if len(m.senders) > 1 or (m.senders and (m.senders[0].want is None or len(m.senders[0].want) > 1)):
        return INVALID_SENDER
    authors = m.froms[0].want if m.froms and m.froms[0].want else ()
    if len(authors) > 1 and not m.senders:
        return MULTIPLE_FROM
    sender = m.senders[0].want if m.senders and m.senders[0].want else ()
    if any(mb.domain != OWN for mb in (*authors, *sender)):
        return HEADER_FROM_NOT_OWNED
    return None


def check_decision(m: Message | None, data: bytes, scan: HeaderScan, refusal: Reply | None,
                   stored: NewMessage | None, outbound: bool, mail_from: str, signer: DkimSigner) -> None:
    """The intake's decision on ``data`` (``refusal``, or what it ``stored``) for alice (outbound) or a
    relay client (inbound), against what the message is."""
    if m is not None and m.clean:  # the scan finds each field, unfolded as written (RFC 5322 §2.2.3)
        assert [outcome(parse_header_mailboxes, v) for v in scan.from_values] == [v.want for v in m.froms]
        assert [outcome(parse_header_mailboxes, v) for v in scan.sender_values] == [v.want for v in m.senders]
    if any(c in data[:scan.end].replace(b"\r\n", b"") for c in b"\r\n"):
        assert refusal == BARE_CR_LF
    if refusal is not None:
        assert stored is None
        assert refusal.code == 550 and refusal.enhanced in ("5.7.1", "5.6.0"), refusal
        assert outbound or refusal == BARE_CR_LF  # inbound mail has no header policy
        if refusal == NO_FROM:
            assert not scan.from_values and mail_from == ""
        if m is not None and m.clean and outbound:
            assert refusal == (expected_refusal(m) or (NO_FROM if not m.froms and not mail_from else None))
        return
    assert stored is not None
    check_stored(data, scan, stored.data, outbound, mail_from)
    if not outbound:
        assert stored.sender_domain == author_domain(scan.from_values)
        return
    if m is not None and m.clean:
        assert expected_refusal(m) is None and (m.froms or mail_from)
    assert len(scan.from_values) <= 1
    authors = [Mailbox(*mail_from.rpartition("@")[::2])]  # the From we insert
    if scan.from_values:
        authors = parse_header_mailboxes(scan.from_values[0])  # the policy took it: it is valid
        assert all(mb.domain == OWN for mb in authors)
        assert len(authors) == 1 or len(scan.sender_values) == 1
    assert stored.sender_domain == authors[0].domain
    # The DKIM signer signs for the domain we checked or not at all (it reads the From on its own).
    result = signer.compute(stored.data, now=0)
    assert result.domain in (None, stored.sender_domain), result
    if m is not None and m.clean and len(authors) == 1:
        assert result.domain == OWN, result


async def test_messages_through_the_intake(world: tuple[Policy, DkimSigner], tmp_path: Path) -> None:
    policy, signer = world
    spool = MemorySpool(tmp_path)
    intake = Intake(policy.cfg, check_headers=policy.check_headers, signer=None, spool=spool,
                    on_accepted=lambda _m: None)
    submission = Origin(listener="submission", peer_ip="192.0.2.7", helo="client.example\r\nX: y",
                        protocol="ESMTPSA", tls="TLSv1.3", user=ALICE)
    relay = Origin(listener="relay", peer_ip="192.0.2.8", helo="x" * 2000, protocol="ESMTP", tls=None, user=None)
    rng = random.Random(6409)
    cases: list[tuple[str, bytes, Message | None]] = [(name, data, None) for name, data in big_messages()]
    cases += [(f"case {i}", m.data, m) for i, m in ((i, message(rng)) for i in range(N_MESSAGES))]
    decided = {"accepted": 0, "refused": 0}
    for name, data, m in cases:
        scan = scan_headers(data)
        for outbound, origin in ((True, submission), (False, relay)):
            mail_from = rng.choice(["alice@example.com", '"a b"@example.com', "jörg@example.com", ""])
            before = len(spool.messages)
            t0 = time.perf_counter()
            try:
                intake.submit(origin, mail_from, ["r@example.net"], data, outbound=outbound)
                refusal = None
            except MessageRefused as e:
                refusal = e.reply
            elapsed = time.perf_counter() - t0
            stored = spool.messages[-1] if len(spool.messages) > before else None
            decided["refused" if refusal else "accepted"] += 1
            try:
                assert elapsed < SLOW, f"took {elapsed:.2f} s"
                check_decision(m, data, scan, refusal, stored, outbound, mail_from, signer)
            except (AssertionError, AddressError) as e:
                raise AssertionError(f"{name} (outbound={outbound}, mail_from={mail_from!r}): {data[:300]!r}: "
                                     f"{type(e).__name__}: {e}") from None
    await asyncio.gather(*intake.committing)
    assert min(decided.values()) > 150, decided


def test_scan_time_grows_linearly_with_folded_lines() -> None:
    """A field folded into many lines (RFC 5322 §2.2.3 sets no limit): four times the lines may take about
    four times as long, not sixteen (measured as a ratio, so a slow machine does not fail it)."""
    def fastest(n: int) -> float:
        data = b"From: alice@example.com\r\n" + b" (cc)\r\n" * n + b"\r\nbody\r\n"
        best = SLOW
        for _ in range(3):
            t0 = time.perf_counter()
            scan = scan_headers(data)
            best = min(best, time.perf_counter() - t0)
        assert len(scan.from_values) == 1 and len(scan.from_values[0]) == 17 + 5 * n
        return best

    assert fastest(60_000) < 8 * fastest(15_000)


@pytest.mark.parametrize("data", [b"Subject: x", b"Subject: x\r\n y", b"Subject: x\r\n", b"", b"b\r\n",
                                  b"Subject: x\r\n\r\nb", b"Subject: x\r\n \r\nbody", b"Subject: x\r\nbody line\r\n"])
def test_inserted_field_is_a_line_of_its_own_in_the_header_block(data: bytes) -> None:
    """However the header block ends, even in a header-only message without its last CRLF."""
    out = insert_fields(data, scan_headers(data), b"Message-ID: <q@relay.example>\r\n")
    assert b"Message-ID: <q@relay.example>" in out.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert email.message_from_bytes(out, policy=email.policy.compat32)["Message-ID"] == "<q@relay.example>"
