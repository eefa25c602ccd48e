"""Per-user sending limits: "at most N messages per period", counted when MAIL is accepted.

- :func:`parse_rate` reads ``"500/h"`` (also ``/s``, ``/min``, ``/d``; ``"unlimited"``) once, where
  the value enters (config load, users file, CLI).
- :class:`RateLimiter` is the interface the policy calls. :class:`MemoryRateLimiter` is the
  implementation for one node; a shared backend (several nodes counting together, e.g. in
  PostgreSQL) implements the same two-method protocol. ``take`` is synchronous on purpose: it
  runs inside the sans-I/O SMTP protocol at MAIL, so a shared backend answers from its local view
  and exchanges counts with the database in the background (a bounded overshoot between syncs,
  no database round trip per message).
- :class:`SlidingWindow` is the pure arithmetic: the sliding-window counter (the previous fixed
  window's count, weighted by how much of it still overlaps the last ``period``, plus the current
  window's count). No I/O, no clock of its own: time is passed in, so tests move it by hand.

Over the limit the answer is ``451 4.7.1`` (RFC 3463: delivery not authorized, temporary), and the
refusal is logged once per window per user, not once per message.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# ASCII digits, at most 18: a longer count is no rate, and int() refuses past 4300 digits.
_RATE_RE = re.compile(r"^\s*(\d{1,18})\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$",
                      re.IGNORECASE | re.ASCII)
_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
            "h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
_UNIT_NAMES = {1.0: "s", 60.0: "min", 3600.0: "h", 86400.0: "d"}
UNLIMITED_WORDS = ("unlimited", "none", "off")


@dataclass(frozen=True, slots=True)
class Rate:
    """``limit`` messages per ``period`` seconds."""

    limit: int
    period: float

    def __str__(self) -> str:
        return f"{self.limit}/{_UNIT_NAMES.get(self.period, f'{self.period:g}s')}"


def parse_rate(value: str) -> Rate | None:
    """``"500/h"`` -> Rate(500, 3600); ``"unlimited"`` -> None. Raises ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"must be a rate like \"500/h\", not {type(value).__name__}")
    if value.strip().lower() in UNLIMITED_WORDS:
        return None
    m = _RATE_RE.match(value)
    if not m:
        raise ValueError(f"bad rate {value!r}: use a count per period, like \"500/h\", \"20/min\" or \"5000/d\"")
    n = int(m.group(1))
    if n < 1:
        raise ValueError(f"bad rate {value!r}: the count must be at least 1 (use \"unlimited\" for no limit)")
    return Rate(n, _PERIODS[m.group(2).lower()])


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    count: float
    """Messages counted in the sliding window, this one included when allowed."""
    window_start: float
    """Start of the fixed window this decision falls in (for "log once per window")."""
    first_refusal: bool = False
    """True for the first refusal of this key in this window: the one to log."""
    retry_after: float = 0.0


class RateLimiter(Protocol):
    """What the policy needs. ``take`` counts one message if it is under the limit."""

    def take(self, key: str, rate: Rate) -> Verdict: ...

    def forget(self, keep: set[str]) -> None:
        """Drop state of keys not in ``keep`` (users deleted on reload)."""


@dataclass(slots=True)
class SlidingWindow:
    """State of one key: counts of the current and the previous fixed window."""

    window_start: float = 0.0
    current: int = 0
    previous: int = 0
    refused_in_window: bool = False

    def take(self, rate: Rate, now: float) -> Verdict:
        period = rate.period
        start = now - (now % period)
        if start != self.window_start:
            # Rolled over: one window later the current count becomes the previous one; more
            # than one window later both are empty.
            self.previous = self.current if start - self.window_start == period else 0
            self.current = 0
            self.window_start = start
            self.refused_in_window = False
        overlap = 1.0 - (now - start) / period
        count = self.previous * overlap + self.current
        if count + 1 > rate.limit:
            first = not self.refused_in_window
            self.refused_in_window = True
            # When enough of the previous window has slid out (or the next window starts).
            if self.previous:
                need = count + 1 - rate.limit  # messages that must age out
                retry = min(start + period - now, need / self.previous * period)
            else:
                retry = start + period - now
            return Verdict(False, count, start, first, max(0.0, retry))
        self.current += 1
        return Verdict(True, count + 1, start)


class MemoryRateLimiter:
    """Counts in this process (one node). The clock is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._state: dict[str, SlidingWindow] = {}

    def take(self, key: str, rate: Rate) -> Verdict:
        st = self._state.get(key)
        if st is None:
            st = self._state[key] = SlidingWindow()
        return st.take(rate, self.clock())

    def forget(self, keep: set[str]) -> None:
        for k in [k for k in self._state if k not in keep]:
            del self._state[k]
