"""VERP return paths: ``bounces+<token>@<bounce_domain>``.

The envelope sender of every outgoing message names the queue entry and the recipient it was
sent to, so a bounce (or an ARF report quoting the original ``Return-Path``) identifies the
failed recipient without having to trust what the bounce text says.

Token layout (lowercase only, so it survives MTAs that lowercase the local part)::

    <queue id: 13 Crockford base32 chars>-<recipient index: base32>-<MAC: 10 base32 chars>
    01jd3k5q8z7xm-a-7k2p9x4mwq

* the queue id is carried as is (it is already Crockford base32), lowercased;
* the recipient **index** in the queue entry, not the address: RFC 5321 section 4.5.3.1.1
  limits a local part to 64 octets, and ``bounces+`` plus an address would not fit;
* the MAC is HMAC-SHA256 (key: the secret) over ``"<QUEUE ID>.<index>"``, truncated to 50
  bits: forging a token takes ~2^50 tries against a server that does not answer whether a
  guess was right, and it keeps the whole local part at ``bounces+`` + 28 characters.

Secrets rotate: :func:`parse_return_path` accepts a token made with any secret in
``secrets`` (the current one first, then the previous ones).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

# Crockford's base32 alphabet (no I, L, O, U), lowercased for the wire.
_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_VALUE = {ch: i for i, ch in enumerate(_ALPHABET)}
QUEUE_ID_LENGTH = 13
MAX_RCPT_INDEX = 32**3 - 1  # three base32 characters
MAC_CHARS = 10  # 50 bits
MAX_LOCAL_PART = 64  # RFC 5321 section 4.5.3.1.1


@dataclass(frozen=True)
class VerpToken:
    """What a VERP return path identifies: a queue entry and one of its recipients."""

    queue_id: str  # uppercase Crockford base32, as the spool writes it
    rcpt_index: int


def _is_queue_id(value: str) -> bool:
    return len(value) == QUEUE_ID_LENGTH and all(ch in _VALUE for ch in value.lower())


def _encode_int(value: int) -> str:
    if value == 0:
        return "0"
    out = []
    while value:
        value, digit = divmod(value, 32)
        out.append(_ALPHABET[digit])
    return "".join(reversed(out))


def _decode_int(text: str) -> int | None:
    if not text or len(text) > 3 or (len(text) > 1 and text[0] == "0"):
        return None  # one canonical spelling per index
    value = 0
    for ch in text:
        digit = _VALUE.get(ch)
        if digit is None:
            return None
        value = value * 32 + digit
    return value


def _mac(secret: bytes, queue_id: str, rcpt_index: int) -> str:
    digest = hmac.new(secret, f"{queue_id.upper()}.{rcpt_index}".encode("ascii"), hashlib.sha256).digest()
    bits = int.from_bytes(digest[:8], "big") >> (64 - 5 * MAC_CHARS)
    return "".join(_ALPHABET[(bits >> (5 * i)) & 31] for i in reversed(range(MAC_CHARS)))


def make_token(queue_id: str, rcpt_index: int, secret: bytes) -> str:
    """The token part of a VERP local part (see the module docstring)."""
    if not _is_queue_id(queue_id):
        raise ValueError(f"queue id must be {QUEUE_ID_LENGTH} Crockford base32 characters: {queue_id!r}")
    if not 0 <= rcpt_index <= MAX_RCPT_INDEX:
        raise ValueError(f"recipient index out of range 0..{MAX_RCPT_INDEX}: {rcpt_index}")
    if not secret:
        raise ValueError("VERP secret must not be empty")
    return f"{queue_id.lower()}-{_encode_int(rcpt_index)}-{_mac(secret, queue_id, rcpt_index)}"


def make_return_path(
    queue_id: str, rcpt_index: int, bounce_domain: str, secret: bytes, prefix: str = "bounces"
) -> str:
    """The envelope sender for one recipient: ``bounces+<token>@<bounce_domain>``.

    Raises ``ValueError`` for a malformed queue id, an index outside 0..32767, an empty
    secret, or a prefix so long that the local part would exceed 64 octets.
    """
    domain = bounce_domain.strip().rstrip(".").lower()
    if not domain or "@" in domain or not prefix or "@" in prefix or "+" in prefix:
        raise ValueError("bounce domain and prefix must be non-empty, without '@' (and '+' in the prefix)")
    local = f"{prefix.lower()}+{make_token(queue_id, rcpt_index, secret)}"
    if len(local) > MAX_LOCAL_PART:
        raise ValueError(f"VERP local part would be {len(local)} octets (RFC 5321 limit {MAX_LOCAL_PART})")
    return f"{local}@{domain}"


def parse_return_path(
    address: str, bounce_domain: str, secrets: Sequence[bytes], prefix: str = "bounces"
) -> VerpToken | None:
    """Decode and authenticate a VERP address; ``None`` for anything invalid, forged or truncated.

    Case-insensitive (MTAs may lowercase or uppercase the local part); accepts surrounding
    ``<>``. The MAC is compared with :func:`hmac.compare_digest` against every secret in
    ``secrets`` (current first, then previous ones during a rotation). Never raises.
    """
    try:
        return _parse(address, bounce_domain, secrets, prefix)
    except (TypeError, ValueError, AttributeError, UnicodeError):
        return None


def _parse(address: str, bounce_domain: str, secrets: Sequence[bytes], prefix: str) -> VerpToken | None:
    text = address.strip().strip("<>").strip().lower()
    local, sep, domain = text.rpartition("@")
    if not sep or domain.rstrip(".") != bounce_domain.strip().rstrip(".").lower():
        return None
    head = f"{prefix.lower()}+"
    if not local.startswith(head) or len(local) > MAX_LOCAL_PART:
        return None
    parts = local[len(head) :].split("-")
    if len(parts) != 3:
        return None
    queue_id, index_text, mac = parts
    if not _is_queue_id(queue_id) or len(mac) != MAC_CHARS or any(ch not in _VALUE for ch in mac):
        return None
    rcpt_index = _decode_int(index_text)
    if rcpt_index is None:
        return None
    matched = False
    for secret in secrets:
        if secret and hmac.compare_digest(_mac(secret, queue_id, rcpt_index), mac):
            matched = True
    return VerpToken(queue_id.upper(), rcpt_index) if matched else None
