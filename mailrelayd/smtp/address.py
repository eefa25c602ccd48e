"""Envelope address parsing for MAIL FROM / RCPT TO (RFC 5321 §4.1.2, RFC 6531 for SMTPUTF8).

Hand-written because it is the hot path (the generic RFC 5322 parser in ``email`` costs more
than the rest of a transaction) and because relay safety depends on exactly where the domain
is: source routes are stripped (§4.1.1.3 / §C: "@a,@b:user@c" means user@c), a ``%`` in the
local part is just a character (never a routing hint), a quoted local part may contain ``@``,
and the domain is compared lowercased without a trailing dot.
"""

from __future__ import annotations

import email.errors
import email.policy
import email.utils
import inspect
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from mailrelayd.config import normalize_domain

# RFC 5321 §4.5.3.1: local part 64 octets, domain 255, path 256 including the angle brackets.
MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
# Common case: <dot-atom@hostname> followed by optional parameters.
_FAST = re.compile(rf"<([{_ATEXT}]+(?:\.[{_ATEXT}]+)*)@([A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\.?)>(.*)\Z",
                   re.DOTALL)
_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_DOT_ATOM_UTF8 = re.compile(rf"(?:[{_ATEXT}]|[^\x00-\x7f])+(?:\.(?:[{_ATEXT}]|[^\x00-\x7f])+)*\Z")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_SOURCE_ROUTE = re.compile(r"@[^,:@<>\s]+(?:,@[^,:@<>\s]+)*:")


class AddressError(ValueError):
    """The path is not a valid RFC 5321 mailbox. ``enhanced_sender``/``enhanced_rcpt`` are the RFC 3463
    codes for a bad MAIL FROM / RCPT TO path (mapped to a reply in :mod:`mailrelayd.errors`)."""

    enhanced_sender = "5.1.7"
    enhanced_rcpt = "5.1.3"


class AddressEncodingError(AddressError):
    """The address is not valid UTF-8, or is non-ASCII without SMTPUTF8 (RFC 6531 §3.5: 553 5.6.7)."""

    enhanced_sender = enhanced_rcpt = "5.6.7"


# RFC 5321 §4.5.1: every SMTP server MUST accept "<Postmaster>" (case-insensitive, no domain) in RCPT.
POSTMASTER = "postmaster"


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A parsed envelope mailbox. ``domain`` is lowercase, without a trailing dot, ASCII (IDNA)."""

    local: str
    domain: str
    is_literal: bool = False

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def split_path(arg: str) -> tuple[str, str]:
    """Split ``"<path> params"`` into (path without brackets, params). Raises AddressError."""
    arg = arg.lstrip(" ")
    if not arg.startswith("<"):
        # RFC 5321 requires brackets; accept a bare mailbox (many old clients), params after a space.
        path, sep, rest = arg.partition(" ")
        if not path:
            raise AddressError("missing address")
        return path, sep + rest
    if '"' not in arg:
        end = arg.find(">")
        if end < 0:
            raise AddressError("missing '>'")
        return arg[1:end], arg[end + 1:]
    # Quoted local part: '>' may occur inside the quotes.
    i, n, quoted = 1, len(arg), False
    while i < n:
        c = arg[i]
        if quoted and c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return arg[1:i], arg[i + 1:]
        i += 1
    raise AddressError("missing '>'")


def parse_mailbox(path: str, *, utf8: bool = False) -> Mailbox:
    """Parse a path (without angle brackets) into a :class:`Mailbox`. Raises AddressError.

    A quoted local part is kept in its canonical form: without quotes when its content is a
    dot-atom (``"alice"@x`` is ``alice@x``, RFC 5321 §4.1.2), else quoted with only ``"`` and
    ``\\`` escaped."""
    check_encoding(path, utf8=utf8)
    if len(path) > MAX_PATH - 2:
        raise AddressError("address too long")
    if path.startswith("@"):
        m = _SOURCE_ROUTE.match(path)
        if not m:
            raise AddressError("malformed source route")
        path = path[m.end():]
    if path.startswith('"'):
        local, rest = _quoted_local(path)
        if not rest.startswith("@"):
            raise AddressError("missing '@' after quoted local part")
        domain = rest[1:]
    else:
        local, at, domain = path.partition("@")
        if not at:
            raise AddressError("missing '@domain'")
        pattern = _DOT_ATOM_UTF8 if utf8 else _DOT_ATOM
        if not pattern.match(local):
            raise AddressError("invalid character in local part")
    if not local or local == '""':
        raise AddressError("empty local part")
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL:
        raise AddressError("local part longer than 64 octets")
    dom, literal = _parse_domain(domain, utf8=utf8)
    # Again on the normal form: IDNA makes a domain longer, and what we return must parse again.
    if len(local.encode("utf-8", "surrogateescape")) + 1 + len(dom) > MAX_PATH - 2:
        raise AddressError("address too long")
    return Mailbox(local, dom, literal)


def check_encoding(text: str, *, utf8: bool) -> None:
    """Raise AddressEncodingError if ``text`` came from bytes that were not UTF-8 (the session decodes
    with ``surrogateescape``, so such bytes are lone surrogates here: they could never be stored or
    sent), or is non-ASCII when SMTPUTF8 was not asked for."""
    if text.isascii():
        return
    if not utf8:
        raise AddressEncodingError("non-ASCII address without SMTPUTF8")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise AddressEncodingError("address is not valid UTF-8") from None


def parse_command_path(arg: str, *, allow_null: bool, utf8: bool = False,
                       postmaster_domain: str | None = None) -> tuple[Mailbox | None, str]:
    """Parse the argument of MAIL FROM:/RCPT TO: after the keyword.

    Returns (mailbox, params); mailbox is None for the null reverse-path ``<>`` (only when
    ``allow_null``). With ``postmaster_domain`` (RCPT only), the bare ``<Postmaster>`` of RFC 5321
    §4.5.1 is ``postmaster@postmaster_domain``. Raises AddressError for anything else that is not a
    valid mailbox (AddressEncodingError when the bytes were not UTF-8).
    """
    # Any byte that is not UTF-8 anywhere in the arguments: refused here, before it can reach a log
    # line, a policy lookup or the spool (the spool stores text and would fail with a 4xx).
    check_encoding(arg, utf8=True)
    m = _FAST.match(arg.lstrip(" "))
    if m is not None:
        local, domain, rest = m.groups()
        # The path limit as parse_mailbox() applies it (the fast path must not accept what it refuses).
        if len(local) <= MAX_LOCAL and len(local) + 1 + len(domain) <= MAX_PATH - 2 and ".." not in domain:
            d = domain.lower().rstrip(".")  # = normalize_domain() for ASCII host names (hot path)
            if all(_LABEL.match(lbl) for lbl in d.split(".")) and not d.rpartition(".")[2].isdigit():
                return Mailbox(local, d), rest
    path, rest = split_path(arg)
    if path == "":
        if allow_null:
            return None, rest
        raise AddressError("null address not allowed here")
    if postmaster_domain is not None and path.lower() == POSTMASTER:
        return Mailbox(POSTMASTER, postmaster_domain), rest
    # A quoted local part may hold spaces (RFC 5321 qtextSMTP); _quoted_local checks its characters. What
    # is around it may not: the source route before it (§4.1.2 Path = "<" [ A-d-l ":" ] Mailbox ">") and
    # the domain after it.
    quote = path.find('"')
    unquoted = path if quote < 0 else path[:quote] + path.rpartition('"')[2]
    if any(c in unquoted for c in " \t\r\n\x00"):
        raise AddressError("whitespace or control character in address")
    return parse_mailbox(path, utf8=utf8), rest


# The shapes nearly every From has, parsed without the generic parser (an order of magnitude faster):
# "addr-spec", or an optional display name of atoms, spaces and periods, or one plain quoted string,
# then "<addr-spec>". Anything else (comments, groups, lists, encoded words, escapes) takes the email path.
_HDR_ADDR = rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?"
# No two adjacent parts may match the same blanks: backtracking over them was cubic in the length of the
# value (4,000 spaces and an "x" took 45 s). A quoted name holds no undecodable byte (a lone surrogate
# from surrogateescape), which the email path refuses.
_HDR_SIMPLE = re.compile(rf'[ \t]*(?:({_HDR_ADDR})|(?:[.{_ATEXT}][ \t.{_ATEXT}]*|"[^"\\\r\n\udc80-\udcff]*"[ \t]*)?'
                         rf'<({_HDR_ADDR})>)[ \t]*\Z')


def parse_header_mailboxes(value: str) -> list[Mailbox]:
    """The mailboxes of an address header field such as From or Sender (RFC 5322 §3.6.2 mailbox-list),
    parsed with the ``email`` package's RFC 5322 parser and then held to the envelope rules above.

    Raises AddressError unless every entry is a valid mailbox: a group (``undisclosed-recipients:;``),
    an invalid entry (``ceo@victim.com@example.com``, which receivers read differently) or an
    undecodable byte refuses the whole field, so no receiver can see a different author than we check.
    Obsolete but unambiguous syntax (a period in a display name, a route) is accepted. So is a value of
    any length in the simple shapes; any other longer than MAX_PARSED_VALUE is refused."""
    m = _HDR_SIMPLE.match(value)
    # An RFC 2047 encoded word takes the email path, which decodes it and refuses a name that decodes to
    # a CR or LF (a header injected into whoever decodes and writes it again) or touches a "<" (§5).
    if m is not None and "=?" not in value:
        return [parse_mailbox(m.group(1) or m.group(2), utf8=True)]
    return header_mailboxes_by_email(value)


# Longest value given to the ``email`` parsers, one line's worth (RFC 5322 §2.1.1): they copy the rest of
# the value for every token they take, so their time grows with the square of the length (a 64 KB From of
# commas took 20 s, 1 KB takes 20 ms). Only the shapes _HDR_SIMPLE takes, in linear time, may be longer.
MAX_PARSED_VALUE = 998
# Comments nest (RFC 5322 §3.2.2) and the email parser recurses into each: at some depth it fails with
# RecursionError or not, as deep as its caller's stack already is. This bound decides the same every time.
MAX_COMMENTS = 50

# What email's header parser raises, instead of recording a defect, for some malformed values (its bugs
# in Python 3.11: IndexError for "a <", AttributeError for "a@[1.2.3.4", TypeError, UnboundLocalError),
# for a CR or LF in the value or a display name decoded to one (ValueError), or when the stack is already
# nearly full (RecursionError).
_PARSER_FAILURES = (AttributeError, IndexError, NameError, TypeError, ValueError, RecursionError,
                    email.errors.HeaderParseError)


_GETADDRESSES_STRICT = "strict" in inspect.signature(email.utils.getaddresses).parameters


def header_addresses(values: Iterable[str]) -> list[tuple[str, str]]:
    """(display name, address) of each entry of address header values (To, Cc, From...), as
    :func:`email.utils.getaddresses` reads them in its lenient mode: the only mode before Python 3.13,
    whose strict default drops domain literals (``user@[192.0.2.1]``) and more. Every reader of such
    values goes through here, so that each Python decides alike."""
    if _GETADDRESSES_STRICT:
        return email.utils.getaddresses(list(values), strict=False)  # type: ignore[call-arg]
    return email.utils.getaddresses(list(values))


def header_mailboxes_by_email(value: str) -> list[Mailbox]:
    """:func:`parse_header_mailboxes` without its fast path: every value through the ``email`` parser."""
    if len(value) > MAX_PARSED_VALUE:
        raise AddressError("address field too long")
    if value.count("(") > MAX_COMMENTS:
        raise AddressError("too many comments in address field")
    try:
        field = email.policy.default.header_factory("From", value)
        # The older, simpler parser (what many receivers' code still uses); it reads RFC 2047 encoded
        # words as text. Its lenient mode, the only one before Python 3.13 (3.13's strict default also
        # refuses domain literals), so that the decision is the same on every version.
        others = [addr for _, addr in header_addresses([value]) if addr]
    except _PARSER_FAILURES:
        raise AddressError("unparsable address field") from None
    for defect in field.defects:
        if isinstance(defect, email.errors.InvalidHeaderDefect | email.errors.UndecodableBytesDefect):
            raise AddressError(f"invalid address field: {defect}")
    out: list[Mailbox] = []
    for group in field.groups:
        if group.display_name is not None:
            raise AddressError("a group is not a mailbox")
        for a in group.addresses:
            if not a.username or not a.domain:
                raise AddressError("incomplete address")
            local = a.username if _DOT_ATOM_UTF8.match(a.username) else _canonical_quoted(a.username)
            out.append(parse_mailbox(f"{local}@{a.domain}", utf8=True))
    if not out:
        raise AddressError("no mailbox")
    # Both parsers must find the same author domains. They differ where the value is ambiguous: the email
    # package decodes an encoded word in a domain ("a@=?utf-8?q?victim.example?=" is a@victim.example to
    # it), which RFC 2047 §5 forbids in an addr-spec and which receivers, DMARC and our signer read as text.
    theirs = [_parse_domain(addr.rpartition("@")[2], utf8=True)[0] if "@" in addr else "" for addr in others]
    if theirs != [m.domain for m in out]:
        raise AddressError("ambiguous address field")
    return out


def _ipv6_text(ip: ipaddress.IPv6Address) -> str:
    """One spelling whatever the Python version: an IPv4-mapped address in the mixed notation RFC 5952
    §5 recommends (``::ffff:192.0.2.1``; Python 3.13 writes it so, 3.11 as ``::ffff:c000:201``)."""
    return f"::ffff:{ip.ipv4_mapped}" if ip.ipv4_mapped is not None else ip.compressed


def _quoted_local(path: str) -> tuple[str, str]:
    """(canonical local part, rest after the closing quote) for a path starting with a quote."""
    i, n = 1, len(path)
    content: list[str] = []
    while i < n:
        c = path[i]
        if c == "\\":
            if i + 1 >= n or not (" " <= path[i + 1] <= "~"):
                raise AddressError("bad quoted-pair in local part")
            content.append(path[i + 1])
            i += 2
            continue
        if c == '"':
            return _canonical_quoted("".join(content)), path[i + 1:]
        if ord(c) < 32 or c == "\x7f":
            raise AddressError("control character in quoted local part")
        content.append(c)
        i += 1
    raise AddressError("unterminated quoted local part")


def _canonical_quoted(content: str) -> str:
    # RFC 5321 §4.1.2: a local part that is a dot-atom SHOULD NOT be quoted; one spelling per mailbox
    # keeps policy, suppression and duplicate checks from seeing two addresses.
    if _DOT_ATOM_UTF8.match(content):
        return content
    return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'



def _parse_domain(domain: str, *, utf8: bool) -> tuple[str, bool]:
    if not domain:
        raise AddressError("empty domain")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError("malformed address literal")
        inner = domain[1:-1]
        try:
            ip = ipaddress.IPv6Address(inner[5:]) if inner.lower().startswith("ipv6:") \
                else ipaddress.IPv4Address(inner)
        except ValueError:
            raise AddressError("malformed address literal") from None
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            # ipaddress takes "fe80::1%<anything>"; the IPv6-addr of RFC 5321 §4.1.3 has no zone index.
            raise AddressError("malformed address literal")
        return (f"[IPv6:{_ipv6_text(ip)}]" if isinstance(ip, ipaddress.IPv6Address) else f"[{ip}]"), True
    if not domain.isascii() and not utf8:
        raise AddressError("non-ASCII domain without SMTPUTF8")
    if len(domain) > MAX_DOMAIN:
        raise AddressError("domain too long")
    try:
        d = normalize_domain(domain)  # the same normal form as config values (routes, local domains)
    except ValueError:
        raise AddressError("invalid domain" if domain.isascii() else "invalid internationalized domain") from None
    if len(d) > MAX_DOMAIN:
        raise AddressError("domain too long")
    if d.rpartition(".")[2].isdigit():
        # RFC 1123 §2.1: a host name's top label is never all digits; "a@192.0.2.1" is an address
        # literal without its brackets, and would only bounce later, for want of an MX.
        raise AddressError("all-numeric top-level domain (an IP address is written in [brackets])")
    return d, False
