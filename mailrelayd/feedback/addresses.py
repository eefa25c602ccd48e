"""Mailbox address helpers: normalisation and finding addresses in free text."""

from __future__ import annotations

import re

# A pragmatic addr-spec: dot-atom or quoted local part, a domain with at least one dot (or an
# address literal). Bounded quantifiers keep every search linear.
_LOCAL = r'(?:"[^"\n]{1,64}"|[A-Za-z0-9!#$%&\'*+/=?^_`{|}~.-]{1,64})'
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?\.){1,10}[A-Za-z0-9-]{2,63}"
ADDRESS_RE = re.compile(rf"(?<![A-Za-z0-9!#$%&'*+/=?^_`{{|}}~.-]){_LOCAL}@{_DOMAIN}(?![A-Za-z0-9-])")
_FULL = re.compile(rf"{_LOCAL}@{_DOMAIN}")

# Local parts that name a mail system, never a person who could be suppressed.
SYSTEM_LOCALS = frozenset(
    {
        "mailer-daemon",
        "mailerdaemon",
        "mail-daemon",
        "maildaemon",
        "postmaster",
        "post_master",
        "root",
        "mdaemon",
        "mail.delivery.system",
        "nobody",
    }
)


def normalise_address(address: str, *, lowercase_local: bool = False) -> str:
    """Canonical form of an address: surrounding ``<>``/space removed, domain lowercased, no trailing dot.

    The local part is kept as given (RFC 5321 section 2.4: it is case-sensitive) unless
    ``lowercase_local``. Returns ``""`` when ``address`` is not ``local@domain``.
    """
    addr = address.strip().strip("<>").strip().strip("'`")
    if addr.lower().startswith("mailto:"):
        addr = addr[7:]
    local, sep, domain = addr.rpartition("@")
    if not sep or not local or not domain:
        return ""
    domain = domain.strip().rstrip(".").lower()
    if not domain or any(ch.isspace() for ch in domain) or any(ch.isspace() for ch in local.strip('"')):
        return ""
    if lowercase_local:
        local = local.lower()
    return f"{local}@{domain}"


def is_plausible_recipient(address: str) -> bool:
    """True for a syntactically usable ``local@domain.tld`` that is not a mail-system mailbox."""
    if not address or not _FULL.fullmatch(address):
        return False
    local = address.rpartition("@")[0].strip('"').lower()
    return local not in SYSTEM_LOCALS and not local.startswith("mailer-daemon")


def find_addresses(text: str) -> list[str]:
    """Addresses in ``text`` in order of appearance (duplicates kept)."""
    return [m.group(0) for m in ADDRESS_RE.finditer(text)]


def address_from_field(value: str) -> str:
    """The address in a DSN/ARF address field: ``rfc822; <user@example.com>`` → ``user@example.com``."""
    _type, sep, rest = value.partition(";")
    text = (rest if sep else value).strip()
    candidate = text
    if candidate.startswith("<") and ">" in candidate:
        candidate = candidate[1 : candidate.index(">")]
    elif not candidate.startswith('"'):
        candidate = candidate.split()[0] if candidate.split() else ""
    candidate = candidate.strip().strip("<>")
    if _FULL.fullmatch(candidate):
        return candidate
    # Mangled values ("|/usr/bin/filter user@example.com /home"): take the one address inside.
    found = find_addresses(text)
    return found[0] if len(found) == 1 else ""
