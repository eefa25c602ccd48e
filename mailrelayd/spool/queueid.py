"""Queue ids: 13 characters of Crockford base32, time-sortable, unique within a spool.

48 bits of milliseconds since the Unix epoch followed by a 17-bit sequence that starts at a
random value each millisecond, so ids sort by acceptance time, stay unique across restarts,
and survive being lowercased by remote MTAs (VERP tokens carry them).
"""

from __future__ import annotations

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
        out = []
        for _ in range(LENGTH):
            out.append(ALPHABET[n & 31])
            n >>= 5
        return "".join(reversed(out))


def is_queue_id(value: str) -> bool:
    """True if ``value`` looks like a queue id (case-insensitive)."""
    return len(value) == LENGTH and all(c in _DECODE for c in value)


def queue_id_time(qid: str) -> float:
    """Acceptance time encoded in a queue id, as a Unix time."""
    n = 0
    for c in qid:
        n = (n << 5) | _DECODE[c]
    return (n >> _SEQ_BITS) / 1000.0
