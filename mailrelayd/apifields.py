"""The header fields of the HTTP API's JSON form: which a client may set in ``headers``, and how every
field the API writes is folded so that no line passes 998 octets (RFC 5322 §2.1.1).

Pure functions: :func:`headers_refusal` decides, :func:`header_field` writes. The rest of a message
(addresses, body, MIME) is built in :mod:`mailrelayd.api`.
"""

from __future__ import annotations

import base64
import email.utils
import re
from collections.abc import Mapping
from email.header import Header

from mailrelayd.errors import Reply

MAX_LINE = 998  # octets per line without the CRLF (RFC 5322 §2.1.1)

FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 §3.6.8
# Made from the JSON fields of the same names (and the MIME fields of the body): never from "headers".
RESERVED = frozenset({"from", "to", "cc", "bcc", "subject", "content-type", "content-transfer-encoding",
                      "mime-version"})
# Trace and signature fields are written by the hops and signers that vouch for them (RFC 5321 §4.4,
# RFC 5322 §3.6.7, RFC 6376, RFC 8601, RFC 8617, RFC 7208 §9.1): from a client they are forgeries a
# receiver may trust. Blind copies are never transmitted (RFC 5322 §3.6.3): "bcc" is the field for them.
FORBIDDEN = frozenset({"return-path", "received", "received-spf", "authentication-results", "dkim-signature",
                       "domainkey-signature", "bcc", "resent-bcc"})
FORBIDDEN_PREFIXES = ("arc-",)  # ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results (RFC 8617)
# RFC 5322 §3.6: each at most once. Names are compared case-insensitively (§1.2.2) and each may appear
# once in "headers" anyway; listed to say why a second spelling is refused.
SINGLE = frozenset({"date", "from", "sender", "reply-to", "to", "cc", "message-id", "in-reply-to", "references",
                    "subject"})
# Fields whose value is unstructured text (RFC 5322 §3.6.5, §3.6.8), where RFC 2047 encoded words may
# carry what does not fit a line; elsewhere (§5) they would change the value (a Message-ID, a URL).
_TEXT_FIELDS = frozenset({"subject", "comments", "keywords", "organization"})


def bad_header(name: str, why: str) -> Reply:
    return Reply(501, "5.5.4", f"header {name[:80]!r} {why}")


def headers_refusal(headers: Mapping[str, str]) -> Reply | None:
    """Why the ``headers`` object of a JSON request is refused, or None. Values are strings already
    checked for controls; this decides on names and, for Date, on the value."""
    seen: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if not FIELD_NAME.fullmatch(name):
            return bad_header(name, "is not a field name (RFC 5322 §3.6.8)")
        if key in seen:
            single = " and may occur once (RFC 5322 §3.6)" if key in SINGLE else ""
            return bad_header(name, f"is given twice ({seen[key]!r}): field names are case-insensitive{single}")
        seen[key] = name
        if key in RESERVED:
            return bad_header(name, f"is not allowed: use the JSON field {key!r}" if key in ("from", "to", "cc",
                                    "bcc", "subject") else "is not allowed: the API writes the MIME fields")
        if key in ("bcc", "resent-bcc"):
            return bad_header(name, "is not allowed: blind copies are never transmitted (RFC 5322 §3.6.3); "
                                    "use the JSON field 'bcc'")
        if key in FORBIDDEN or key.startswith(FORBIDDEN_PREFIXES):
            return bad_header(name, "is not allowed: trace and signature fields are added by the relays and "
                                    "signers that vouch for them")
        if key == "date" and not _is_date(value):
            return bad_header(name, "is not an RFC 5322 §3.3 date-time (e.g. 'Mon, 30 Nov 2026 16:18:00 +0000')")
    return None


def _is_date(value: str) -> bool:
    try:
        email.utils.parsedate_to_datetime(value)
    except (ValueError, TypeError, IndexError):
        return False
    return True


class FieldTooLong(ValueError):
    """A value with a word that cannot be folded into 998-octet lines, in a field where encoded words
    are not allowed."""


def header_field(name: str, value: str) -> bytes:
    """``Name: value``, folded at blanks, non-ASCII as RFC 2047 encoded words. A word too long for a line
    (a long token with no blank) is written as encoded words in text fields, which a reader decodes back
    to the same text; elsewhere it raises :class:`FieldTooLong`.

    Built with ``email.header`` rather than the ``email.policy`` folder, which takes seconds per kilobyte
    of non-ASCII text (blocking the event loop) and decodes encoded words it is given before refolding."""
    folded = Header(value, "us-ascii" if value.isascii() else "utf-8", header_name=name).encode(linesep="\r\n")
    if _fits(name, folded):
        return f"{name}: {folded}\r\n".encode("ascii")
    if name.lower() in _TEXT_FIELDS or name.lower().startswith("x-"):
        folded = "\r\n ".join(encoded_words(value))
        if _fits(name, folded):
            return f"{name}: {folded}\r\n".encode("ascii")
    raise FieldTooLong(f"{name}: a word too long for a {MAX_LINE}-octet line (RFC 5322 §2.1.1)")


def _fits(name: str, folded: str) -> bool:
    lines = folded.split("\r\n")
    return len(name) + 2 + len(lines[0]) <= MAX_LINE and all(len(line) <= MAX_LINE for line in lines[1:])


def encoded_words(text: str, max_octets: int = 42) -> list[str]:
    """``text`` as RFC 2047 "B" encoded words of whole characters (§5), ``max_octets`` of UTF-8 each: 42
    gives 68-character words, under the 75 of §2 and short enough for a line with its field name."""
    words: list[str] = []
    chunk = bytearray()
    for ch in text:
        b = ch.encode("utf-8")
        if len(chunk) + len(b) > max_octets:
            words.append(_word(chunk))
            chunk.clear()
        chunk += b
    if chunk or not words:
        words.append(_word(chunk))
    return words


def _word(data: bytes | bytearray) -> str:
    return f"=?utf-8?b?{base64.b64encode(data).decode('ascii')}?="
