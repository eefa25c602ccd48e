"""Queue ids: 13 characters of Crockford base32, time-sortable, unique within a spool.

48 bits of milliseconds since the Unix epoch followed by a 17-bit sequence that starts at a
random value each millisecond, so ids sort by acceptance time, stay unique across restarts,
and survive being lowercased by remote MTAs (VERP tokens carry them).
"""

from __future__ import annotations

import base64
import secrets
import threading
import time

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {c: i for i, c in enumerate(ALPHABET)} | {c.lower(): i for i, c in enumerate(ALPHABET)}
LENGTH = 13
_SEQ_BITS = 17


class QueueIdGenerator:
    """Thread-safe monotonic generator of queue ids."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._seq = 0

    def new(self) -> str:
        with self._lock:
            ms = int(time.time() * 1000)
            if ms <= self._last_ms:
                # Same millisecond (or the clock stepped back): keep counting from the last id.
                ms = self._last_ms
                self._seq += 1
                if self._seq >= 1 << _SEQ_BITS:
                    ms += 1
                    self._seq = secrets.randbelow(1 << (_SEQ_BITS - 1))
            else:
                self._seq = secrets.randbelow(1 << (_SEQ_BITS - 1))
            self._last_ms = ms
            n = (ms << _SEQ_BITS) | self._seq
        return _encode(n)


# RFC 4648 base32hex has the digits in order like Crockford's alphabet; only the letters differ.
_FROM_B32HEX = bytes.maketrans(b"0123456789ABCDEFGHIJKLMNOPQRSTUV", ALPHABET.encode())


def _encode(n: int) -> str:
    """The 65-bit id as 13 Crockford characters, most significant first (in C, not 13 Python steps)."""
    # Padded to 80 bits (10 bytes, 16 characters): the first 13 characters carry the 65 bits.
    raw = base64.b32hexencode((n << 15).to_bytes(10, "big"))
    return raw[:LENGTH].translate(_FROM_B32HEX).decode("ascii")


def is_queue_id(value: str) -> bool:
    """True if ``value`` looks like a queue id (case-insensitive)."""
    return len(value) == LENGTH and all(c in _DECODE for c in value)


def queue_id_time(qid: str) -> float:
    """Acceptance time encoded in a queue id, as a Unix time."""
    n = 0
    for c in qid:
        n = (n << 5) | _DECODE[c]
    return (n >> _SEQ_BITS) / 1000.0
