"""Per-sending-domain circuit breaker: pause a domain whose bounce or complaint rate is too high.

What Amazon SES does for its customers: when the share of hard bounces or complaints among the
recipients a sending domain mailed over a window passes a pause level, that domain's outbound
mail is **held** in the queue (not refused, not bounced) until an operator releases it
(``mailrelayd queue release --sender @<domain>``) or the pause time runs out. Above the warning
level (2 % bounces, 0.1 % complaints: what mailbox providers tolerate) it only logs.

Pure and clock-injected: the daemon feeds it trusted outcomes (:meth:`CircuitBreaker.record`,
from the feedback processor), the number of recipients each domain was sent to in the window
(:meth:`CircuitBreaker.set_volume`, from the spool's history), and calls
:meth:`CircuitBreaker.evaluate` now and then. Pausing is one narrow callable,
``hold_sender_domain(domain, until, reason)``; ``until`` is a Unix time, 0 for "until released".
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mailrelayd.log import get_logger

log = get_logger()

HoldSenderDomain = Callable[[str, float, str], None]


@dataclass(frozen=True)
class BreakerSettings:
    """Thresholds (shares, 0..1) and windows (seconds); see ``[feedback] circuit_breaker_*``."""

    window: float = 86400.0
    min_volume: int = 200
    bounce_warn_rate: float = 0.02
    bounce_pause_rate: float = 0.10
    complaint_warn_rate: float = 0.001
    complaint_pause_rate: float = 0.005
    pause_for: float = 6 * 3600.0


def settings_from(fb: Any) -> BreakerSettings:
    """The settings of ``[feedback] circuit_breaker_*`` (a :class:`mailrelayd.config.FeedbackConfig`)."""
    return BreakerSettings(
        window=fb.circuit_breaker_window, min_volume=fb.circuit_breaker_min_volume,
        bounce_warn_rate=fb.circuit_breaker_bounce_warn_rate, bounce_pause_rate=fb.circuit_breaker_bounce_pause_rate,
        complaint_warn_rate=fb.circuit_breaker_complaint_warn_rate,
        complaint_pause_rate=fb.circuit_breaker_complaint_pause_rate, pause_for=fb.circuit_breaker_pause,
    )


@dataclass(frozen=True)
class Trip:
    """One decision to pause a domain."""

    domain: str
    reason: str  # "bounce_rate" or "complaint_rate"
    rate: float
    volume: int
    until: float


@dataclass
class _Domain:
    bounces: deque[float] = field(default_factory=deque)
    complaints: deque[float] = field(default_factory=deque)
    warned_at: float = float("-inf")


class CircuitBreaker:
    """See the module docstring. Not thread-safe: use it from one thread (the event loop)."""

    MAX_DOMAINS = 10_000  # bounds memory against a flood of made-up sending domains
    MAX_EVENTS = 100_000  # per domain and kind; far above any pause level

    def __init__(self, settings: BreakerSettings, hold_sender_domain: HoldSenderDomain, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.hold_sender_domain = hold_sender_domain
        self.clock = clock
        self._domains: dict[str, _Domain] = {}
        self._volume: dict[str, int] = {}

    def reconfigure(self, settings: BreakerSettings) -> None:
        self.settings = settings

    def record(self, domain: str, kind: str) -> None:
        """One trusted outcome for mail from ``domain``: ``hard_bounce`` or ``complaint`` count."""
        domain = domain.strip().rstrip(".").lower()
        if not domain or kind not in ("hard_bounce", "complaint"):
            return
        state = self._domains.get(domain)
        if state is None:
            if len(self._domains) >= self.MAX_DOMAINS:
                return
            state = self._domains[domain] = _Domain()
        events = state.bounces if kind == "hard_bounce" else state.complaints
        if len(events) < self.MAX_EVENTS:
            events.append(self.clock())

    def set_volume(self, volume: Mapping[str, int]) -> None:
        """Recipients each sending domain was sent to (delivered or bounced) within the window."""
        self._volume = {d.lower(): int(n) for d, n in volume.items()}

    def rates(self, domain: str) -> tuple[float, float, int]:
        """(bounce rate, complaint rate, volume) of ``domain`` over the window."""
        domain = domain.lower()
        state = self._domains.get(domain)
        volume = self._volume.get(domain, 0)
        if state is None:
            return 0.0, 0.0, volume
        self._expire(state, self.clock() - self.settings.window)
        # Outcomes may arrive for mail the volume query has not counted yet: never below them.
        base = max(volume, len(state.bounces), 1)
        return len(state.bounces) / base, len(state.complaints) / base, volume

    def evaluate(self) -> list[Trip]:
        """Check every domain; pause (through the callback) those above a pause level."""
        s = self.settings
        now = self.clock()
        trips: list[Trip] = []
        for domain in list(self._domains):
            state = self._domains[domain]
            bounce, complaint, volume = self.rates(domain)
            if not state.bounces and not state.complaints:
                del self._domains[domain]
                continue
            if volume < s.min_volume:
                continue
            reason, rate = "", 0.0
            if s.bounce_pause_rate > 0 and bounce >= s.bounce_pause_rate:
                reason, rate = "bounce_rate", bounce
            elif s.complaint_pause_rate > 0 and complaint >= s.complaint_pause_rate:
                reason, rate = "complaint_rate", complaint
            if reason:
                until = now + s.pause_for if s.pause_for > 0 else 0.0
                trip = Trip(domain, reason, rate, volume, until)
                trips.append(trip)
                # Start counting afresh: a manual release is not undone by the same old events.
                del self._domains[domain]
                log.warning("feedback.circuit_breaker_tripped", sender_domain=domain, reason=reason,
                            rate=round(rate, 5), volume=volume, until=until or None)
                self.hold_sender_domain(domain, until, f"circuit breaker: {reason} {rate:.2%} of {volume}")
            elif (bounce >= s.bounce_warn_rate or complaint >= s.complaint_warn_rate) and \
                    now - state.warned_at >= s.window:
                state.warned_at = now
                log.warning("feedback.circuit_breaker_warning", sender_domain=domain, bounce_rate=round(bounce, 5),
                            complaint_rate=round(complaint, 5), volume=volume)
        return trips

    @staticmethod
    def _expire(state: _Domain, cutoff: float) -> None:
        for events in (state.bounces, state.complaints):
            while events and events[0] <= cutoff:
                events.popleft()
