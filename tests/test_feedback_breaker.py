"""The circuit breaker: as a pure component (a fake clock, a recording hold callback), and over
SMTP against the daemon, pausing through the queue's hold state."""

from __future__ import annotations

import asyncio

import aiosmtplib

from mailrelayd import metrics
from mailrelayd.feedback.breaker import BreakerSettings, CircuitBreaker
from tests.conftest import TEST_PASSWORD, mailrelayd_cmd
from tests.support.sink import Sink


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


async def test_circuit_breaker_holds_the_domain_until_released(start_daemon, client_tls, cli_env) -> None:
    """Over SMTP: most of a domain's recipients bounce (550 5.1.1 at RCPT), the breaker holds the
    domain's next message in the queue (not refused, not bounced); `queue release` lets it go."""
    async def submit(rcpts: list[str]) -> str:
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=d.port("submission"), start_tls=True,
                            tls_context=client_tls, timeout=10)
        await c.connect()
        await c.login("alice", TEST_PASSWORD)
        _e, reply = await c.sendmail("app@example.com", rcpts, b"From: app@example.com\r\nSubject: s\r\n\r\nx\r\n")
        await c.quit()
        return reply.rsplit(" ", 1)[1]

    def trips() -> float:
        return sum(s.value for fam in metrics.CIRCUIT_BREAKER_TRIPS.collect() for s in fam.samples
                   if s.name.endswith("_total") and s.labels.get("domain") == "example.com")

    sink = await Sink().start()
    try:
        for n in range(3):
            sink.rcpt_replies[f"gone{n}@dest.test"] = "550 5.1.1 No such user"
        d = await start_daemon({"routes": [{"domain": "*", "host": f"127.0.0.1:{sink.port}"}],
                                "feedback": {"circuit_breaker": True, "circuit_breaker_window": "60s",
                                             "circuit_breaker_min_volume": 4,
                                             "circuit_breaker_bounce_pause_rate": 0.5,
                                             "circuit_breaker_pause": "0s"}})
        before = trips()
        qid = await submit(["ok@dest.test", "gone0@dest.test", "gone1@dest.test", "gone2@dest.test"])
        for _ in range(500):
            if await d.spool.get(qid) is None and trips() > before:
                break
            await asyncio.sleep(0.02)
        assert trips() == before + 1, "the breaker tripped for example.com"

        delivered = len(sink.messages)
        qid2 = await submit(["later@dest.test"])
        await asyncio.sleep(2.5)  # retry_initial is 1s: chances enough to (wrongly) deliver
        assert len(sink.messages) == delivered
        msg = await d.spool.get(qid2)
        assert msg is not None, "held in the queue, neither refused nor bounced"

        p = await asyncio.create_subprocess_exec(*mailrelayd_cmd(), "queue", "release", "--sender", "@example.com",
                                                 "-c", str(d.config), env=cli_env, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(p.communicate(), 60)
        assert p.returncode == 0, err
        assert out.decode().startswith("released 1 message(s)"), out
        await sink.wait_for(delivered + 1)
        assert sink.messages[-1].rcpts == ["later@dest.test"]
    finally:
        await sink.stop()
