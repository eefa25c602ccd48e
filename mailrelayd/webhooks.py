"""Delivery-event webhooks: POST the events stored in the spool to each ``[[webhooks]]`` URL.

The spool writes an event in the same transaction as the outcome it describes (accepted,
delivered, deferred, bounced, expired, suppressed; complained and asynchronous bounces from
feedback processing). Each webhook has a durable position in the event log; a sender reads the
next batch after it, POSTs it, and moves the position only after a 2xx. So delivery is at least
once (a receiver de-duplicates by the event ``id``), in order (strictly: a failing batch is
retried before anything after it), and survives restarts. Failed POSTs back off exponentially
from ``events.retry_initial`` to ``events.retry_max``. Storage is bounded by
``events.max_backlog``: past it the oldest events are dropped, counted and logged.

Signature (like Stripe's): ``Mailrelayd-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

from mailrelayd import __version__, metrics
from mailrelayd.config import Config
from mailrelayd.errors import SpoolError
from mailrelayd.log import get_logger
from mailrelayd.spool.store import Event, Spool

log = get_logger()

SIGNATURE_HEADER = "Mailrelayd-Signature"
IDLE_POLL = 0.5
PRUNE_EVERY = 5.0


def sign(secret: bytes, body: bytes, t: int) -> str:
    """The ``Mailrelayd-Signature`` header value for ``body`` sent at Unix time ``t``."""
    mac = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, *, tolerance: float = 300, now: float | None = None) -> bool:
    """Check a signature header (what a receiver does; used by the tests and shown in the docs)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    want = sign(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(want, parts.get("v1", ""))


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_json(e: Event) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": e.id, "event": e.kind, "time": rfc3339(e.time), "queue_id": e.queue_id,
        "message_id": e.message_id or None, "sender": e.sender, "recipient": e.recipient,
        "user": e.user or None, "reply": e.reply or None, "attempts": e.attempts,
    }
    if e.fb_kind or e.kind in ("complained",):
        out["kind"] = e.fb_kind
        out["reason"] = e.reason
    return out


def encode_body(events: Sequence[Event], batch_size: int) -> bytes:
    payload: Any = event_json(events[0]) if batch_size == 1 else {"events": [event_json(e) for e in events]}
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    secret: bytes
    kinds: tuple[str, ...]
    batch_size: int
    timeout: float


def targets(cfg: Config, secrets: Sequence[bytes]) -> list[Target]:
    return [Target(cfg.webhook_name(i), w.url, secrets[i], tuple(dict.fromkeys(w.events)), w.batch_size, w.timeout)
            for i, w in enumerate(cfg.webhooks)]


def read_secret(path: Any) -> bytes:
    """The secret is the file's content with surrounding whitespace stripped, as bytes."""
    data: bytes = path.read_bytes().strip()
    if not data:
        raise ValueError("empty secret")
    return data


def url_redactions(url: str) -> list[tuple[str, str]]:
    """(text, replacement) pairs that keep a webhook URL's credentials out of error messages.

    The user info and the query (``?token=...``) are often the receiver's credentials, and some
    aiohttp errors quote the request URL (a malformed answer: ``url='...'``); every way aiohttp
    writes it (user info stripped, fragment dropped) becomes the URL's origin.
    """
    u = yarl.URL(url)
    bare = u.with_user(None)
    forms = {url, str(u), str(bare), str(bare.with_fragment(None))}
    return [(form, str(u.origin())) for form in sorted(forms, key=len, reverse=True)]


class DaemonThreadResolver(AbstractResolver):
    """getaddrinfo(3), as aiohttp's default resolver (so /etc/hosts and nsswitch apply), but in a
    daemon thread rather than the loop's executor, whose threads process exit waits for: a lookup
    that hangs (an unreachable nameserver: glibc tries for up to 30 s) held SIGTERM past
    ``server.shutdown_timeout``. A cancelled lookup is left to finish on its own; one runs per
    (host, port, family) at a time, so a receiver that never resolves does not pile up threads."""

    def __init__(self) -> None:
        self._inflight: dict[tuple[str, int, int], asyncio.Future[list[ResolveResult]]] = {}

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        key = (host, port, int(family))
        fut = self._inflight.get(key)
        if fut is None:
            fut = self._inflight[key] = self._start(host, port, family)
            fut.add_done_callback(lambda f: self._finished(key, f))
        return await asyncio.shield(fut)

    def _finished(self, key: tuple[str, int, int], fut: asyncio.Future[list[ResolveResult]]) -> None:
        if self._inflight.get(key) is fut:
            del self._inflight[key]
        if not fut.cancelled():
            fut.exception()  # retrieved: nobody may be waiting any more

    @staticmethod
    def _start(host: str, port: int, family: socket.AddressFamily) -> asyncio.Future[list[ResolveResult]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[ResolveResult]] = loop.create_future()

        def settle(result: list[ResolveResult] | None, error: OSError | None) -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result or [])

        def lookup() -> None:
            try:
                result, error = _getaddrinfo(host, port, family), None
            except OSError as e:
                result, error = None, e
            with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is exiting
                loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=lookup, name="webhook-lookup", daemon=True).start()
        return fut

    async def close(self) -> None:
        return None


def _getaddrinfo(host: str, port: int, family: socket.AddressFamily) -> list[ResolveResult]:
    """Blocking: what aiohttp's ThreadedResolver does with the answer (numeric hosts, IPv6 scope)."""
    out: list[ResolveResult] = []
    for fam, _, proto, _, address in socket.getaddrinfo(host, port, family, socket.SOCK_STREAM,
                                                        flags=socket.AI_ADDRCONFIG):
        if fam == socket.AF_INET6 and len(address) >= 4 and address[3]:  # link-local: keep the scope
            addr, service = socket.getnameinfo(address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
            resolved = (addr, int(service))
        elif fam in (socket.AF_INET, socket.AF_INET6):
            resolved = (str(address[0]), int(address[1]))
        else:
            continue
        out.append(ResolveResult(hostname=host, host=resolved[0], port=resolved[1], family=fam, proto=proto,
                                 flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
    if not out:
        raise OSError(f"{host} has no address")
    return out


class WebhookSender:
    """Sends one webhook's events, in order, until cancelled."""

    def __init__(self, target: Target, spool: Spool, session: aiohttp.ClientSession, cfg: Config) -> None:
        self.t = target
        self.spool = spool
        self.session = session
        self.cfg = cfg
        self._sent = metrics.WEBHOOK_EVENTS_SENT.labels(target.name)
        self._failed = metrics.WEBHOOK_EVENTS_FAILED.labels(target.name)
        self._redactions = url_redactions(target.url)
        self.failures = 0

    async def run(self) -> None:
        while True:
            try:
                got = await self.spool.read_events(self.t.name, self.t.kinds, self.t.batch_size)
            except SpoolError as e:
                log.warning("webhook.read_failed", webhook=self.t.name, error=str(e))
                await asyncio.sleep(1.0)
                continue
            if got is None:  # position not created yet (reload in progress)
                await asyncio.sleep(IDLE_POLL)
                continue
            events, upto, position = got
            if events:
                await self._deliver(events)
            # Deliver first, then move the position (at least once). Events of other kinds
            # up to `upto` are skipped with it.
            if upto > position:
                await self.spool.ack_events(self.t.name, upto)
            if len(events) < self.t.batch_size:
                await asyncio.sleep(IDLE_POLL)

    async def _deliver(self, events: list[Event]) -> None:
        """POST until the receiver takes it (2xx), backing off between failures."""
        body = encode_body(events, self.t.batch_size)
        while True:
            status, error = await self._post(body)
            if error is None:
                if self.failures:
                    log.info("webhook.recovered", webhook=self.t.name, failures=self.failures)
                self.failures = 0
                self._sent.inc(len(events))
                return
            self.failures += 1
            self._failed.inc(len(events))
            ev = self.cfg.events
            delay = min(ev.retry_max, ev.retry_initial * 2 ** min(self.failures - 1, 30))
            log.warning("webhook.post_failed", webhook=self.t.name, status=status, error=error,
                        failures=self.failures, retry_in=round(delay, 3), first_event=events[0].id)
            await asyncio.sleep(delay)

    async def _post(self, body: bytes) -> tuple[int | None, str | None]:
        headers = {"Content-Type": "application/json", "User-Agent": f"mailrelayd/{__version__}",
                   SIGNATURE_HEADER: sign(self.t.secret, body, int(time.time()))}
        try:
            async with self.session.post(self.t.url, data=body, headers=headers, allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=self.t.timeout)) as resp:
                # The status decides; the body is not waited for. One that already arrived is
                # drained on exit and the connection reused, anything else is closed: a receiver
                # streaming an endless 200 neither fills memory nor turns into a timeout.
                if 200 <= resp.status < 300:
                    return resp.status, None
                return resp.status, f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            why = str(e) or f"no answer within {self.t.timeout:g} s"  # aiohttp's total timeout says nothing
            return None, self._redact(f"{type(e).__name__}: {why}")[:300]

    def _redact(self, text: str) -> str:
        for form, replacement in self._redactions:
            text = text.replace(form, replacement)
        return text


class Webhooks:
    """All senders plus the pruning of delivered (or too old) events."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._session: aiohttp.ClientSession | None = None
        self._senders: dict[str, tuple[Target, asyncio.Task[None]]] = {}
        self._pruner: asyncio.Task[None] | None = None
        self.cfg: Config | None = None

    async def configure(self, cfg: Config, secrets: Sequence[bytes]) -> None:
        """Start, keep or stop senders to match the config (at start and on reload)."""
        self.cfg = cfg
        want = {t.name: t for t in targets(cfg, secrets)}
        self.spool.record_events(frozenset(k for t in want.values() for k in t.kinds))
        await self.spool.sync_event_cursors(list(want))
        if want and self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=DaemonThreadResolver()))
        for name in list(self._senders):
            old, task = self._senders[name]
            if want.get(name) != old:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                del self._senders[name]
                if name not in want:
                    with contextlib.suppress(KeyError):
                        metrics.WEBHOOK_BACKLOG.remove(name)
        for name, t in want.items():
            if name not in self._senders:
                assert self._session is not None
                sender = WebhookSender(t, self.spool, self._session, cfg)
                self._senders[name] = (t, asyncio.create_task(self._supervise(sender), name=f"webhook-{name}"))
        if self._pruner is None:
            self._pruner = asyncio.create_task(self._prune_loop(), name="webhook-prune")

    async def _supervise(self, sender: WebhookSender) -> None:
        while True:
            try:
                await sender.run()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug or a spool outage: log, pause, go on
                log.exception("webhook.sender_crashed", webhook=sender.t.name, error=str(e))
                await asyncio.sleep(5.0)

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_EVERY)
            if self.cfg is None:
                continue
            try:
                dropped = await self.spool.prune_events(self.cfg.events.max_backlog)
            except SpoolError as e:
                log.warning("webhook.prune_failed", error=str(e))
                continue
            if dropped:
                metrics.WEBHOOK_EVENTS_DROPPED.inc(dropped)
                log.warning("webhook.events_dropped", dropped=dropped, max_backlog=self.cfg.events.max_backlog,
                            webhooks=[n for n, (_, _t) in self._senders.items()])

    async def update_gauges(self) -> None:
        for name, (t, _) in self._senders.items():
            metrics.WEBHOOK_BACKLOG.labels(name).set(await self.spool.event_backlog(name, t.kinds))

    async def close(self) -> None:
        tasks = [task for _, task in self._senders.values()]
        if self._pruner is not None:
            tasks.append(self._pruner)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._senders.clear()
        self._pruner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
