"""Limits counted across a fleet through the shared PostgreSQL database (``[feedback] store``).

:class:`PgRateLimiter`: the per-user sending limit (:mod:`mailrelayd.ratelimit`) counted in
``mailrelayd_rate_counters`` by every node together, with the same sliding-window arithmetic as
:class:`~mailrelayd.ratelimit.SlidingWindow`: a limit of 10/h over two nodes allows 10, not 20. One
round trip per MAIL of a limited user. While the database is unreachable each node counts on its
own (:class:`~mailrelayd.ratelimit.MemoryRateLimiter`): mail keeps flowing, the limit is per node
for that time.

:class:`SharedAuthThrottle`: the AUTH-failure lockout of :class:`~mailrelayd.smtp.auth.AuthThrottle`,
counted over every node. Each node still decides locally first (so a node cut off from the database
keeps its own protection, and the SMTP session never waits for the network); every failure is also
written to ``mailrelayd_auth_failures``, and when the failures of one IP on all nodes together reach
``auth.max_failures`` within ``auth.failure_window``, a lockout row is written and announced with
``NOTIFY mailrelayd_auth``: every node applies it to its local throttle. Times are wall-clock, so the
nodes' clocks must agree (NTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable

from mailrelayd.log import get_logger
from mailrelayd.pg import Conn, PgClient, PgUnavailable
from mailrelayd.ratelimit import MemoryRateLimiter, Rate, Verdict
from mailrelayd.smtp.auth import AuthThrottle

log = get_logger()

AUTH_CHANNEL = "mailrelayd_auth"
_LOCK_CLASS = 2  # pg_advisory_xact_lock(2, hashtext(ip))


class SharedAuthThrottle(AuthThrottle):
    """An :class:`AuthThrottle` whose counts and lockouts are shared by every node on ``client``.

    ``loop`` is the daemon's event loop: lockouts from the database are applied there, so the local
    state is only ever touched from one thread."""

    def __init__(self, client: PgClient, loop: asyncio.AbstractEventLoop, max_failures: int, window: float,
                 lockout: float) -> None:
        super().__init__(max_failures, window, lockout)
        self._client = client
        self._loop = loop
        self._last_prune = 0.0
        client.listen(AUTH_CHANNEL, self._notified)
        client.on_connect(self._load)
        client.on_poll(self._prune)
        client.submit(lambda: self._send(self._load))  # lockouts already in force

    def failure(self, ip: str, now: float | None = None) -> bool:
        locked = super().failure(ip, now)
        at = time.time()
        max_failures, window, lockout = self.max_failures, self.window, self.lockout
        self._client.submit(lambda: self._send(lambda c: self._failure_db(c, ip, at, max_failures, window, lockout,
                                                                         locked)))
        return locked

    def success(self, ip: str) -> None:
        had_failures = self.failures(ip) > 0
        super().success(ip)
        if had_failures:  # most successes follow no failure: no database write for those
            self._client.submit(lambda: self._send(
                lambda c: c.execute("DELETE FROM mailrelayd_auth_failures WHERE ip = $1", ip)))

    async def _send(self, fn: object) -> None:
        try:
            await self._client.acall(fn)  # type: ignore[arg-type]
        except PgUnavailable:
            pass  # the local count still applies; the database's view is lost for this failure only
        except Exception as e:
            log.exception("auth.shared_failed", error=str(e))

    async def _failure_db(self, conn: Conn, ip: str, at: float, max_failures: int, window: float, lockout: float,
                          locked_here: bool) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _LOCK_CLASS, ip)
            await conn.execute("DELETE FROM mailrelayd_auth_failures WHERE ip = $1 AND at <= $2", ip, at - window)
            await conn.execute("INSERT INTO mailrelayd_auth_failures (ip, at) VALUES ($1, $2)", ip, at)
            n = await conn.fetchval("SELECT count(*) FROM mailrelayd_auth_failures WHERE ip = $1", ip)
            if n < max_failures and not locked_here:
                return
            until = at + lockout
            await conn.execute("INSERT INTO mailrelayd_auth_lockouts (ip, until) VALUES ($1, $2) ON CONFLICT (ip)"
                               " DO UPDATE SET until = greatest(mailrelayd_auth_lockouts.until, EXCLUDED.until)",
                               ip, until)
            await conn.execute("DELETE FROM mailrelayd_auth_failures WHERE ip = $1", ip)
            await conn.execute("SELECT pg_notify($1, $2)", AUTH_CHANNEL, json.dumps({"ip": ip, "until": until}))
        log.info("auth.shared_lockout", ip=ip, failures=n, lockout_s=lockout)

    def _notified(self, payload: str) -> None:
        try:
            data = json.loads(payload)
            ip, until = str(data["ip"]), float(data["until"])
        except (ValueError, KeyError, TypeError):
            return
        self._apply(ip, until)

    def _apply(self, ip: str, until: float) -> None:
        remaining = until - time.time()
        if remaining > 0:
            with contextlib.suppress(RuntimeError):  # the daemon's loop is closing
                self._loop.call_soon_threadsafe(self.lock, ip, remaining)

    async def _load(self, conn: Conn) -> None:
        """After (re)connecting: lockouts decided while we were away."""
        for ip, until in await conn.fetch("SELECT ip, until FROM mailrelayd_auth_lockouts WHERE until > $1",
                                          time.time()):
            self._apply(ip, until)

    async def _prune(self, conn: Conn) -> None:
        now = time.time()
        if now - self._last_prune < 60:
            return
        self._last_prune = now
        await conn.execute("DELETE FROM mailrelayd_auth_failures WHERE at <= $1", now - self.window)
        await conn.execute("DELETE FROM mailrelayd_auth_lockouts WHERE until <= $1", now)


_RATE_LOCK_CLASS = 3  # pg_advisory_xact_lock(3, hashtext(key))


class PgRateLimiter:
    """:class:`~mailrelayd.ratelimit.RateLimiter` counted in PostgreSQL across every node.

    ``take`` runs on the database loop and is awaited from the daemon's loop (never blocking it);
    ``fallback`` answers while the database is unreachable."""

    def __init__(self, client: PgClient, fallback: MemoryRateLimiter, clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._fallback = fallback
        self.clock = clock
        self._refused: dict[str, float] = {}  # key -> window of its last logged refusal (this node)
        self._last_prune = 0.0

    async def take(self, key: str, rate: Rate) -> Verdict:
        now = self.clock()
        fut = self._client.submit(lambda: self._client.acall(lambda c: self._take_db(c, key, rate, now)))
        try:
            allowed, count, start, retry = await asyncio.wrap_future(fut)
        except PgUnavailable:
            return await self._fallback.take(key, rate)
        if allowed:
            return Verdict(True, count, start)
        first = self._refused.get(key) != start
        self._refused[key] = start
        return Verdict(False, count, start, first, retry)

    def forget(self, keep: set[str]) -> None:
        self._fallback.forget(keep)
        for k in [k for k in self._refused if k not in keep]:
            del self._refused[k]

    async def _take_db(self, conn: Conn, key: str, rate: Rate, now: float) -> tuple[bool, float, float, float]:
        period = rate.period
        start = math.floor(now / period) * period  # the same window boundaries on every node
        k = f"{key}/{period:g}"
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _RATE_LOCK_CLASS, k)
            rows = await conn.fetch("SELECT window_start, count FROM mailrelayd_rate_counters"
                                    " WHERE key = $1 AND window_start >= $2", k, start - period)
            current = sum(int(c) for ws, c in rows if ws == start)
            previous = sum(int(c) for ws, c in rows if ws == start - period)
            count = previous * (1.0 - (now - start) / period) + current
            if count + 1 > rate.limit:
                if previous:
                    retry = min(start + period - now, (count + 1 - rate.limit) / previous * period)
                else:
                    retry = start + period - now
                return False, count, start, max(0.0, retry)
            await conn.execute("INSERT INTO mailrelayd_rate_counters (key, window_start, count) VALUES ($1, $2, 1)"
                               " ON CONFLICT (key, window_start) DO UPDATE"
                               " SET count = mailrelayd_rate_counters.count + 1", k, start)
            if now - self._last_prune > 60:
                self._last_prune = now
                await conn.execute("DELETE FROM mailrelayd_rate_counters"
                                   " WHERE window_start < $1::float8 - 2 * $2::float8"
                                   " AND key LIKE '%/' || $3::text", now, period, f"{period:g}")
        return True, count + 1, start, 0.0
