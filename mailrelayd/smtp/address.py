"""Envelope address parsing for MAIL FROM / RCPT TO (RFC 5321 §4.1.2, RFC 6531 for SMTPUTF8).

Hand-written because it is the hot path (the generic RFC 5322 parser in ``email`` costs more
than the rest of a transaction) and because relay safety depends on exactly where the domain
is: source routes are stripped (§4.1.1.3 / §C: "@a,@b:user@c" means user@c), a ``%`` in the
local part is just a character (never a routing hint), a quoted local part may contain ``@``,
and the domain is compared lowercased without a trailing dot.
"""

from __future__ import annotations

import ipaddress
import re
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
    """The path is not a valid RFC 5321 mailbox."""


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A parsed envelope mailbox. ``domain`` is lowercase, without a trailing dot, ASCII (IDNA)."""

    local: str
    domain: str
    is_literal: bool = False

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def needs_smtputf8(self) -> bool:
        return not self.local.isascii()


def split_path(arg: str) -> tuple[str, str]:
    """Split ``"<path> params"`` into (path without brackets, params). Raises AddressError."""
    arg = arg.lstrip(" ")
    if not arg.startswith("<"):
        # RFC 5321 requires brackets; accept a bare mailbox (many old clients), params after a space.
        path, _, rest = arg.partition(" ")
        if not path:
            raise AddressError("missing address")
        return path, rest
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
    """Parse a path (without angle brackets) into a :class:`Mailbox`. Raises AddressError."""
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
    if not local:
        raise AddressError("empty local part")
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL:
        raise AddressError("local part longer than 64 octets")
    dom, literal = _parse_domain(domain, utf8=utf8)
    return Mailbox(local, dom, literal)


def parse_command_path(arg: str, *, allow_null: bool, utf8: bool = False) -> tuple[Mailbox | None, str]:
    """Parse the argument of MAIL FROM:/RCPT TO: after the keyword.

    Returns (mailbox, params); mailbox is None for the null reverse-path ``<>`` (only when
    ``allow_null``). Raises AddressError for anything else that is not a valid mailbox.
    """
    m = _FAST.match(arg.lstrip(" "))
    if m is not None:
        local, domain, rest = m.groups()
        if len(local) <= MAX_LOCAL and len(domain) <= MAX_DOMAIN and ".." not in domain:
            d = domain.lower().rstrip(".")  # = normalize_domain() for ASCII host names (hot path)
            if all(_LABEL.match(lbl) for lbl in d.split(".")):
                return Mailbox(local, d), rest
    path, rest = split_path(arg)
    if path == "":
        if allow_null:
            return None, rest
        raise AddressError("null address not allowed here")
    if any(c in path for c in " \t\r\n\x00"):
        raise AddressError("whitespace or control character in address")
    return parse_mailbox(path, utf8=utf8), rest


def _quoted_local(path: str) -> tuple[str, str]:
    i, n = 1, len(path)
    while i < n:
        c = path[i]
        if c == "\\":
            if i + 1 >= n or not (" " <= path[i + 1] <= "~"):
                raise AddressError("bad quoted-pair in local part")
            i += 2
            continue
        if c == '"':
            return path[: i + 1], path[i + 1:]
        if ord(c) < 32 or c == "\x7f":
            raise AddressError("control character in quoted local part")
        i += 1
    raise AddressError("unterminated quoted local part")


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
        return (f"[IPv6:{ip.compressed}]" if ip.version == 6 else f"[{ip}]"), True
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
    return d, False
