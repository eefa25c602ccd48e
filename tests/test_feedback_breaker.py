"""The circuit breaker as a pure component: a fake clock, a recording hold callback."""

from __future__ import annotations

from mailrelayd.feedback.breaker import BreakerSettings, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _breaker(**settings: float) -> tuple[CircuitBreaker, list[tuple[str, float, str]], Clock]:
    holds: list[tuple[str, float, str]] = []
    clock = Clock()
    s = BreakerSettings(**{"window": 3600.0, "min_volume": 100, "pause_for": 600.0, **settings})
    return CircuitBreaker(s, lambda d, until, why: holds.append((d, until, why)), clock=clock), holds, clock


def test_pauses_a_domain_above_the_bounce_pause_level() -> None:
    b, holds, clock = _breaker(bounce_pause_rate=0.10)
    b.set_volume({"example.com": 200, "example.org": 200})
    for _ in range(19):
        b.record("example.com", "hard_bounce")
    assert b.evaluate() == [] and holds == []  # 9.5 %
    b.record("Example.COM.", "hard_bounce")
    for _ in range(50):
        b.record("example.org", "soft_bounce")  # soft bounces are not part of the bounce rate
    trips = b.evaluate()
    assert [(t.domain, t.reason, t.volume) for t in trips] == [("example.com", "bounce_rate", 200)]
    assert holds == [("example.com", clock.now + 600.0, "circuit breaker: bounce_rate 10.00% of 200")]
    # Counting starts afresh after a trip: a release is not undone by the same events.
    assert b.evaluate() == []


def test_complaint_rate_and_minimum_volume() -> None:
    b, holds, _clock = _breaker(complaint_pause_rate=0.005)
    b.set_volume({"small.example": 50, "big.example": 1000})
    for _ in range(5):
        b.record("small.example", "complaint")  # 10 %, but below the minimum volume
        b.record("big.example", "complaint")  # 0.5 %
    assert [t.domain for t in b.evaluate()] == ["big.example"]
    assert [h[0] for h in holds] == ["big.example"]


def test_events_leave_the_window() -> None:
    b, holds, clock = _breaker(bounce_pause_rate=0.10)
    b.set_volume({"example.com": 100})
    for _ in range(9):
        b.record("example.com", "hard_bounce")
    clock.now += 3601  # those nine are old now
    for _ in range(5):
        b.record("example.com", "hard_bounce")
    assert b.rates("example.com")[0] == 0.05
    assert b.evaluate() == [] and holds == []


def test_pause_until_released_and_disabled_levels() -> None:
    b, holds, _clock = _breaker(bounce_pause_rate=0.0, complaint_pause_rate=0.001, pause_for=0.0)
    b.set_volume({"example.com": 1000})
    for _ in range(500):
        b.record("example.com", "hard_bounce")  # bounce pausing is off (0)
    b.record("example.com", "complaint")
    assert holds == []
    trips = b.evaluate()
    assert [(t.reason, t.until) for t in trips] == [("complaint_rate", 0.0)]
    assert holds[0][1] == 0.0  # 0: held until `mailrelayd queue release`
