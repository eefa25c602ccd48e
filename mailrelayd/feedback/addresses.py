"""Mailbox address helpers: normalisation and finding addresses in free text."""

from __future__ import annotations

import re
import unicodedata

# A pragmatic addr-spec: dot-atom or quoted local part, a domain with at least one dot (or an
# address literal). Bounded quantifiers keep every search linear.
_LOCAL = r'(?:"[^"\n]{1,64}"|[A-Za-z0-9!#$%&\'*+/=?^_`{|}~.-]{1,64})'
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?\.){1,10}[A-Za-z0-9-]{2,63}"
ADDRESS_RE = re.compile(rf"(?<![A-Za-z0-9!#$%&'*+/=?^_`{{|}}~.-]){_LOCAL}@{_DOMAIN}(?![A-Za-z0-9-])")
# RFC 6531/6532: UTF-8 in the local part and U-labels in the domain.
_U = "\u0080-\U0010ffff"
_LOCAL_UTF8 = rf'(?:"[^"\n]{{1,64}}"|[A-Za-z0-9!#$%&\'*+/=?^_`{{|}}~.{_U}-]{{1,64}})'
_LABELS_UTF8 = rf"(?:[A-Za-z0-9{_U}](?:[A-Za-z0-9{_U}-]{{0,62}}[A-Za-z0-9{_U}])?\.){{1,10}}"
_DOMAIN_UTF8 = rf"{_LABELS_UTF8}[A-Za-z0-9{_U}-]{{2,63}}"
_FULL = re.compile(rf"{_LOCAL_UTF8}@{_DOMAIN_UTF8}")
# In a field that is an address by definition (DSN Final-/Original-Recipient, ARF Original-Rcpt-To,
# Exim's X-Failed-Recipients) a one-letter last label is taken too: reports anonymised by hand
# ("a@b.c") and single-letter internal domains. Free text keeps the two-letter minimum, where a
# shorter one reads "name@host.x" out of prose and paths. Every _FULL address is one of these.
_FIELD_ADDRESS = re.compile(rf"{_LOCAL_UTF8}@{_LABELS_UTF8}[A-Za-z0-9{_U}-]{{1,63}}")
# In free text a UTF-8 address is only taken in angle brackets (Postfix, Exim and Sendmail write
# recipients so): letters of a surrounding non-Latin text would otherwise run into it.
UTF8_ADDRESS = rf"{_LOCAL_UTF8}@{_DOMAIN_UTF8}"
_UTF8_IN_TEXT = re.compile(rf"<({UTF8_ADDRESS})>")
# RFC 6533 section 3: utf-8-addr-xtext / utf-8-addr-unitext escape characters as \x{HEX}.
_EMBEDDED_UNICODE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")

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


def normalise_domain(domain: str) -> str:
    """A domain as the rest of mailrelayd compares it: lowercase ASCII, U-labels IDNA-encoded
    (RFC 5890 A-labels, as :mod:`mailrelayd.smtp.address` does), no trailing dot."""
    d = domain.strip().rstrip(".").lower()
    if not d.isascii():
        try:
            d = d.encode("idna").decode("ascii")
        except UnicodeError:
            return d
    return d


def normalise_address(address: str, *, lowercase_local: bool = False) -> str:
    """Canonical form of an address: surrounding ``<>``/space removed, domain normalised
    (:func:`normalise_domain`), the local part in Unicode NFC (RFC 6532 section 3.1).

    The local part is otherwise kept as given (RFC 5321 section 2.4: it is case-sensitive)
    unless ``lowercase_local``. Returns ``""`` when ``address`` is not ``local@domain``.
    """
    addr = address.strip().strip("<>").strip().strip("'`")
    if addr.lower().startswith("mailto:"):
        addr = addr[7:]
    local, sep, domain = addr.rpartition("@")
    if not sep or not local or not domain:
        return ""
    domain = normalise_domain(domain)
    if not domain or any(ch.isspace() for ch in domain) or any(ch.isspace() for ch in local.strip('"')):
        return ""
    if not local.isascii():
        local = unicodedata.normalize("NFC", local)
    if lowercase_local:
        local = local.lower()
    return f"{local}@{domain}"


def is_plausible_recipient(address: str, *, from_field: bool = False) -> bool:
    """True for a syntactically usable ``local@domain.tld`` that is not a mail-system mailbox.

    ``from_field``: ``address`` was read from an address field (see :func:`address_from_field`),
    where a one-letter top-level label is accepted.
    """
    if not address or not (_FIELD_ADDRESS if from_field else _FULL).fullmatch(address):
        return False
    local = address.rpartition("@")[0].strip('"').lower()
    return local not in SYSTEM_LOCALS and not local.startswith("mailer-daemon")


def find_addresses(text: str) -> list[str]:
    """Addresses in ``text`` in order of appearance (duplicates kept), UTF-8 ones included."""
    found = [(m.start(), m.group(0)) for m in ADDRESS_RE.finditer(text)]
    if not text.isascii():
        ascii_spans = {pos for pos, _a in found}
        for m in _UTF8_IN_TEXT.finditer(text):
            if not m.group(1).isascii() and m.start(1) not in ascii_spans:
                found.append((m.start(1), m.group(1)))
        found.sort()
    return [a for _pos, a in found]


def address_from_field(value: str) -> str:
    """The address in a DSN/ARF address field: ``rfc822; <user@example.com>`` → ``user@example.com``.

    RFC 6533 ``utf-8;`` typed values may carry raw UTF-8 or ``\\x{HEX}`` escapes.
    """
    addr_type, sep, rest = value.partition(";")
    text = (rest if sep else value).strip()
    if sep and addr_type.strip().lower() == "utf-8" and "\\x{" in text:
        text = _EMBEDDED_UNICODE.sub(lambda m: _chr(m.group(1)), text)
    candidate = text
    if candidate.startswith("<") and ">" in candidate:
        candidate = candidate[1 : candidate.index(">")]
    elif not candidate.startswith('"'):
        candidate = candidate.split()[0] if candidate.split() else ""
    candidate = candidate.strip().strip("<>")
    if _FIELD_ADDRESS.fullmatch(candidate):
        return candidate
    # Mangled values ("|/usr/bin/filter user@example.com /home"): take the one address inside.
    found = find_addresses(text)
    return found[0] if len(found) == 1 else ""


def _chr(hex_digits: str) -> str:
    try:
        return chr(int(hex_digits, 16))
    except (ValueError, OverflowError):
        return "\ufffd"
