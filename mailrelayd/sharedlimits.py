"""Limits counted across a fleet through the shared PostgreSQL database (``[feedback] store``).

:class:`PgRateLimiter`: the per-user sending limit (:mod:`mailrelayd.ratelimit`) counted in
``mailrelayd_rate_counters`` by every node together, with the same sliding-window arithmetic as
:class:`~mailrelayd.ratelimit.SlidingWindow`: a limit of 10/h over two nodes allows 10, not 20.
Decided from each node's view of the fleet's counts (no database round trip at MAIL), kept current
with LISTEN/NOTIFY.

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
import secrets
import time
from collections.abc import Callable
from typing import Any

from mailrelayd.log import get_logger
from mailrelayd.pg import Conn, PgClient, PgUnavailable
from mailrelayd.ratelimit import Rate, Verdict
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


RATE_CHANNEL = "mailrelayd_rates"


class PgRateLimiter:
    """:class:`~mailrelayd.ratelimit.RateLimiter` counted in PostgreSQL across every node.

    ``take`` is synchronous (it runs inside the SMTP protocol at MAIL) and never waits for the
    database: it decides on this node's view of the fleet's counts, the same sliding window as
    :class:`~mailrelayd.ratelimit.SlidingWindow`. What it admits is added to
    ``mailrelayd_rate_counters`` in the background (``UPDATE ... count + n``), and every update is
    announced with ``NOTIFY mailrelayd_rates`` carrying the new total, which the other nodes take
    into their view at once. The limit therefore holds over the fleet up to what several nodes
    admit within one propagation delay (milliseconds); while the database is unreachable each node
    adds only its own counts, and writes them when it returns (nothing admitted is forgotten).

    All state lives on the daemon's event loop (``loop``): database results and notifications are
    handed over with ``call_soon_threadsafe``, so no lock is needed.
    """

    def __init__(self, client: PgClient, loop: asyncio.AbstractEventLoop, clock: Callable[[], float] = time.time
                 ) -> None:
        self._client = client
        self._loop = loop
        self.clock = clock
        self._node = secrets.token_hex(8)  # our own notifications are already counted
        self._known: dict[tuple[str, float], int] = {}  # (key, window start) -> total in the database
        self._in_flight: dict[tuple[str, float], int] = {}  # being added to the database
        self._unflushed: dict[tuple[str, float], int] = {}  # admitted here, not yet sent
        self._refused: dict[str, float] = {}  # key -> window of its last logged refusal (this node)
        self._last_prune = 0.0
        client.listen(RATE_CHANNEL, self._notified)
        client.on_connect(self._on_connect)
        client.submit(lambda: self._client.acall(self._load))

    # --- RateLimiter ---------------------------------------------------------------------------
    def take(self, key: str, rate: Rate) -> Verdict:
        now = self.clock()
        period = rate.period
        start = math.floor(now / period) * period  # the same window boundaries on every node
        k = f"{key}/{period:g}"
        cur, prev = (k, start), (k, start - period)
        count = self._total(prev) * (1.0 - (now - start) / period) + self._total(cur)
        if count + 1 > rate.limit:
            previous = self._total(prev)
            if previous:
                retry = min(start + period - now, (count + 1 - rate.limit) / previous * period)
            else:
                retry = start + period - now
            first = self._refused.get(key) != start
            self._refused[key] = start
            return Verdict(False, count, start, first, max(0.0, retry))
        self._unflushed[cur] = self._unflushed.get(cur, 0) + 1
        if cur not in self._in_flight:
            self._flush(cur)
        if now - self._last_prune > 60:
            self._prune(now)
        return Verdict(True, count + 1, start)

    def forget(self, keep: set[str]) -> None:
        for k in [k for k in self._refused if k not in keep]:
            del self._refused[k]

    # --- bookkeeping (event loop) ----------------------------------------------------------------
    def _total(self, kw: tuple[str, float]) -> int:
        return self._known.get(kw, 0) + self._in_flight.get(kw, 0) + self._unflushed.get(kw, 0)

    def _flush(self, kw: tuple[str, float]) -> None:
        n = self._unflushed.pop(kw, 0)
        if not n:
            return
        self._in_flight[kw] = n
        fut = self._client.submit(lambda: self._client.acall(lambda c: self._add_db(c, kw, n)))
        fut.add_done_callback(lambda f: self._call_soon(self._flushed, kw, n, f))

    def _flushed(self, kw: tuple[str, float], n: int, fut: Any) -> None:
        self._in_flight.pop(kw, None)
        exc = fut.exception() if not fut.cancelled() else PgUnavailable("cancelled")
        if exc is None:
            self._known[kw] = max(self._known.get(kw, 0), int(fut.result()))
        else:  # kept, and sent again after the next (re)connection
            self._unflushed[kw] = self._unflushed.get(kw, 0) + n
            if not isinstance(exc, PgUnavailable):
                log.error("ratelimit.shared_failed", error=str(exc))
            return
        if kw in self._unflushed:
            self._flush(kw)

    def _seen(self, kw: tuple[str, float], total: int) -> None:
        if total > self._known.get(kw, 0):
            self._known[kw] = total

    def _prune(self, now: float) -> None:
        self._last_prune = now
        for kw in [kw for kw in self._known if kw[1] < now - 2 * 86400 - 1]:
            del self._known[kw]

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the daemon's loop is closing
            self._loop.call_soon_threadsafe(fn, *args)

    # --- database (its loop) ---------------------------------------------------------------------
    async def _add_db(self, conn: Conn, kw: tuple[str, float], n: int) -> int:
        k, start = kw
        async with conn.transaction():
            total = int(await conn.fetchval(
                "INSERT INTO mailrelayd_rate_counters (key, window_start, count) VALUES ($1, $2, $3)"
                " ON CONFLICT (key, window_start) DO UPDATE SET count = mailrelayd_rate_counters.count + $3"
                " RETURNING count", k, start, n))
            await conn.execute("SELECT pg_notify($1, $2)", RATE_CHANNEL,
                               json.dumps({"n": self._node, "k": k, "w": start, "c": total}))
        return total

    def _notified(self, payload: str) -> None:
        try:
            data = json.loads(payload)
            if data["n"] == self._node:
                return
            kw, total = (str(data["k"]), float(data["w"])), int(data["c"])
        except (ValueError, KeyError, TypeError):
            return
        self._call_soon(self._seen, kw, total)

    async def _load(self, conn: Conn) -> None:
        """The fleet's counts of the last two days (the longest period is a day: two windows)."""
        now = time.time()
        await conn.execute("DELETE FROM mailrelayd_rate_counters WHERE window_start < $1::float8", now - 3 * 86400)
        for k, w, c in await conn.fetch("SELECT key, window_start, count FROM mailrelayd_rate_counters"
                                        " WHERE window_start >= $1::float8", now - 2 * 86400 - 1):
            self._call_soon(self._seen, (str(k), float(w)), int(c))

    async def _on_connect(self, conn: Conn) -> None:
        await self._load(conn)
        self._call_soon(self._flush_all)

    def _flush_all(self) -> None:
        for kw in list(self._unflushed):
            if kw not in self._in_flight:
                self._flush(kw)
