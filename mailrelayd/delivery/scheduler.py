"""The delivery loop: decides when each queued message is tried, and by which destination.

Per recipient: pending -> (in flight) -> delivered | deferred (retry later) | bounced | expired |
suppressed; or held (see :mod:`mailrelayd.delivery.queuemanager`, which records every outcome).
The spool is the source of truth; in memory there is only a heap of (next attempt, queue id), the
set of messages in flight, the parked (held) messages and the destinations, so a queue of 100,000
deferred messages costs a few megabytes and one indexed query at start-up.

Destinations (:mod:`mailrelayd.delivery.shaping`): each transaction goes to one destination (the
recipient domain, or its ``[[shaping]]`` MX group). A destination at its connection limit makes the
message wait in its FIFO; one at its rate gives the message a reserved slot; a suspended one defers
it to the end of the suspension without contacting anyone. Each decision is O(1); the heap makes
the per-message work O(log n).

Ordering of durability (promise 1): a recipient's result is written to the spool as soon as the
transaction that produced it ends, before anything else is done about it. A crash after the
remote's 250 but before that write re-sends the message (at-least-once); a crash after the write
never does. A DSN is committed in the same transaction that marks its recipients bounced, so a
bounce is neither lost nor sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from mailrelayd import metrics
from mailrelayd.config import Config
from mailrelayd.delivery.queuemanager import (  # re-exported: the daemon and feedback import them from here
    PARKED,
    DsnBuilder,
    FailedRecipient,
    Hooks,
    LocalResult,
    Outcome,
    Postponed,
    QueueManager,
    RcptOutcome,
    _diagnostic,
    _Missing,
    _reply_text,
)
from mailrelayd.delivery.shaping import Destination, Destinations, is_throttling
from mailrelayd.errors import SpoolError
from mailrelayd.log import get_logger
from mailrelayd.spool.store import MessageRecord, NewMessage, RecipientRecord, Spool, Suspension, record_of_new

log = get_logger()

__all__ = ["RUNBOOK_SPOOL", "DsnBuilder", "FailedRecipient", "Hooks", "LocalDelivery", "LocalResult", "RcptOutcome",
           "Scheduler", "TransportLike", "_diagnostic", "_reply_text"]


class TransportLike(Protocol):
    async def deliver(self, domain: str, mail_from: str, recipients: Sequence[str], data: bytes, *,
                      max_messages: int | None = None, max_connections: int | None = None,
                      max_recipients: int | None = None) -> Sequence[RcptOutcome]: ...


LocalDelivery = Callable[[MessageRecord, bytes, Sequence[RecipientRecord]], Awaitable[Sequence[LocalResult]]]
"""Processes messages addressed to our own domains (feedback: bounces and complaints)."""

MxNames = Callable[[str], Awaitable[list[str]]]
"""MX host names of a recipient domain (only asked when [[shaping]] groups by MX suffix)."""

RUNBOOK_SPOOL = "docs/runbooks/MailrelaydSpoolDamaged.md"

FRESH_MAX = 10_000
"""Just-committed messages kept in memory for their first attempt (about 1 KB each)."""

WAIT_RECHECK = 300.0
"""A message waiting for a connection slot is looked at again after this long even if no slot
was handed to it (a safety net, not the normal path: a freed slot wakes the first waiter)."""


class Scheduler:
    """Runs deliveries for everything in the spool. ``start()`` loads the schedule."""

    def __init__(self, cfg: Config, spool: Spool, transport: TransportLike, *, dsn_builder: DsnBuilder,
                 local: LocalDelivery | None = None, hooks: Hooks | None = None,
                 clock: Callable[[], float] = time.time, body_cache_bytes: int = 64 * 1024 * 1024,
                 mx_names: MxNames | None = None, queue: QueueManager | None = None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.transport = transport
        self.local = local
        self.clock = clock
        self.queue = queue or QueueManager(cfg, spool, dsn_builder=dsn_builder, hooks=hooks, clock=clock)
        self.queue.listener = self
        self.hooks = self.queue.hooks
        self.mx_names = mx_names
        self.destinations = Destinations(cfg)
        self._heap: list[tuple[float, str]] = []
        self._scheduled: dict[str, float] = {}  # qid -> due time of its live heap entry
        self._inflight: set[str] = set()
        self._parked: set[str] = set()  # only held recipients left: out of the heap until released
        # Spool state of recipients being attempted right now, so the queue gauges count each once.
        self.inflight_by_state: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        # Messages just committed, as the spool holds them, for their first attempt: delivering
        # them needs no read back from the spool (the read was ~15% of the daemon's CPU at load).
        # Dropped whenever something else changes them (stale()), so the spool stays the truth.
        self._fresh: OrderedDict[str, MessageRecord] = OrderedDict()
        # The one recipient domain of a queued message, where it has one: a message due while its
        # destination is suspended goes back in the heap without a spool read or a task (100
        # suspended destinations' backlog coming due at once made accept 0.55x as fast).
        self._domain_of: dict[str, str] = {}
        # Waiting messages handed a freed connection slot, until their attempt takes it: one that
        # does not (deleted, held, finished meanwhile) hands it on, or the rest wait WAIT_RECHECK.
        self._handed: dict[str, Destination] = {}
        self._domain_names: dict[str, str] = {}  # one string object per domain
        self._body_bytes = 0
        self._body_cache_max = body_cache_bytes
        self._limit = asyncio.Semaphore(self._max_inflight(cfg))
        # destination -> (end of suspension, its gauge label as counted when it began)
        self._suspended: dict[str, tuple[float, str]] = {}
        self._next_unsuspend = math.inf
        self._last_prune = 0.0
        self.loaded = False
        # Set when an attempt's outcome could not be written: no delivery starts until the spool
        # takes the pending outcomes again (never retry into duplicates; promise 1).
        self.halted: str | None = None
        self._unrecorded: list[Outcome] = []
        self.record_retry_interval = 30.0
        self._export_configured()

    def _export_configured(self) -> None:
        """Configured destinations are exported from the first scrape (0 = not suspended)."""
        metrics.destination_label.set_always(self.destinations.configured)
        for name in (*self.destinations.configured, metrics.BoundedLabel.OTHER):
            metrics.DESTINATION_SUSPENDED.labels(name).inc(0)  # create at 0, keep a live count

    @staticmethod
    def _max_inflight(cfg: Config) -> int:
        return max(1, cfg.delivery.max_concurrency * 2)

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.queue.reconfigure(cfg)
        self.destinations.reconfigure(cfg)
        self._export_configured()

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Load every unfinished message from the spool and start working."""
        t0 = time.perf_counter()
        await self.queue.load()
        await self._restore_suspensions()
        rows = await self.spool.active_schedule_domains()
        for due, qid, domain in rows:
            if domain:
                self._domain_of[qid] = self._intern(domain)
            self._push(qid, due)
        self.loaded = True
        metrics.QUEUE_HELD.set(len(self.queue.rules))
        log.info("scheduler.started", queued=len(rows), hold_rules=len(self.queue.rules),
                 load_seconds=round(time.perf_counter() - t0, 3))
        self._runner = asyncio.create_task(self._run(), name="scheduler")

    async def stop(self, timeout: float) -> None:
        """Stop starting deliveries; wait up to ``timeout`` for those in flight. Anything cut off
        stays active in the spool and is retried after restart."""
        self._stopping = True
        self._wake.set()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for _, label in self._suspended.values():  # the gauge counts live suspensions only
            metrics.DESTINATION_SUSPENDED.labels(label).dec()
        self._suspended.clear()
        if self._unrecorded:
            # Still active in the spool: delivered again after the restart (at least once).
            log.error("delivery.unrecorded_at_stop", queue_ids=[u.msg.queue_id for u in self._unrecorded])

    # --- inputs (also the queue manager's QueueListener) ----------------------------------
    def submit(self, msg: NewMessage) -> None:
        """A message was just committed: deliver it now (its body is kept in memory for that)."""
        self._cache_body(msg.queue_id, msg.data)
        self._fresh[msg.queue_id] = record_of_new(msg)
        if len(self._fresh) > FRESH_MAX:
            self._fresh.popitem(last=False)
        self._push(msg.queue_id, msg.received_at)

    def wake(self, qids: Sequence[str], when: float) -> None:
        """Look at these messages again at ``when`` (a release, a flush, a free connection slot)."""
        for q in qids:
            self._parked.discard(q)
            self._fresh.pop(q, None)
            self._push(q, when)

    def stale(self, qids: Sequence[str]) -> None:
        """These messages changed in the spool (an administrative hold, bounce or delete): read
        them from there on their next attempt."""
        for q in qids:
            self._fresh.pop(q, None)

    def poke(self) -> None:
        """Re-evaluate the schedule now (tests with a fake clock call this after moving it)."""
        self._wake.set()

    def flush(self, qid: str | None = None) -> None:
        """Retry now (all deferred messages, or one)."""
        now = self.clock()
        if qid is None:
            self.wake(list(self._scheduled), now)
        else:
            self.wake([qid], now)

    def forget(self, qid: str) -> None:
        self._scheduled.pop(qid, None)
        self._parked.discard(qid)
        self._fresh.pop(qid, None)
        self._domain_of.pop(qid, None)
        handed = self._handed.pop(qid, None)
        if handed is not None:
            self._hand_on(handed)

    def suspended(self, domains: Sequence[str] | None = None) -> list[str]:
        """Destinations suspended now: all, or those ``domains`` go to (a domain, its MX group as
        far as known, or a destination named directly, like ``.google.com``)."""
        now = self.clock()
        live = {n for n, (until, _) in self._suspended.items() if until > now}
        if domains is None:
            return sorted(live)
        names = {n for d in domains for n in (d, self.destinations.cached_name(d, now)) if n in live}
        return sorted(names)

    def resume(self, names: Sequence[str]) -> None:
        """End these suspensions now (``queue flush``; the caller removes them from the spool)."""
        for name in names:
            entry = self._suspended.pop(name, None)
            if entry is not None:
                metrics.DESTINATION_SUSPENDED.labels(entry[1]).dec()
            dest = self.destinations.peek(name)
            if dest is not None:
                dest.suspended_until = 0.0
            log.info("destination.resumed", destination=name, by="admin")
        self._next_unsuspend = min((u for u, _ in self._suspended.values()), default=math.inf)
        # Mail that was told to wait for the end of the suspension goes now (a flush by a group's
        # name selects no recipient domain). Only messages with one known domain; a rare scan.
        now, lifted = self.clock(), set(names)
        self.wake([q for q, d in self._domain_of.items() if q in self._scheduled and
                   (d in lifted or self.destinations.cached_name(d, now) in lifted)], now)
        self._wake.set()

    async def administrative(self, qid: str, action: str, reason: str = "") -> bool:
        """``queue bounce`` / ``queue delete`` of one message (see QueueManager)."""
        return (await self.queue.administrative(qid, action, reason)).messages > 0

    @property
    def inflight(self) -> frozenset[str]:
        return frozenset(self._inflight)

    @property
    def parked(self) -> frozenset[str]:
        return frozenset(self._parked)

    def quiescent(self) -> bool:
        """Nothing in flight and nothing due now (tests with a fake clock wait for this)."""
        if self._tasks or self._wake.is_set():
            return False
        now = self.clock()
        if now >= min(self._next_unsuspend, self.queue.next_rule_expiry):
            return False
        return not any(due <= now and self._scheduled.get(q) == due for due, q in self._heap)

    def queued_count(self) -> int:
        return len(self._scheduled) + len(self._inflight) + len(self._parked)

    def destination_name(self, domain: str) -> str:
        """The destination a recipient domain goes to, as far as known without a lookup."""
        return self.destinations.cached_name(domain, self.clock()) or domain

    def destinations_json(self) -> list[dict[str, Any]]:
        """Destinations with something to show: busy, waiting, rate-limited, suspended or held."""
        now = self.clock()
        out = []
        for d in sorted(self.destinations.all(), key=lambda d: d.name):
            held = self.queue.domain_held(d.name)
            if d.idle(now) and not held and d.name not in self.destinations.configured:
                continue
            out.append({"destination": d.name, "active": d.active, "waiting": len(d.waiting),
                        "max_connections": d.limits.max_connections,
                        "max_rate_per_s": round(1 / d.limits.rate_interval, 3) if d.limits.rate_interval else None,
                        "suspended_until": d.suspended_until if d.suspended(now) else None,
                        "suspend_reply": d.suspend_reply if d.suspended(now) else None,
                        "held": held, "sent": d.sent})
        for rule in self.queue.rules:
            if rule.kind == "domain" and self.destinations.peek(rule.value) is None:
                out.append({"destination": rule.value, "active": 0, "waiting": 0, "held": True,
                            "suspended_until": None})
        return out

    def _push(self, qid: str, due: float) -> None:
        if qid in self._inflight:
            return
        cur = self._scheduled.get(qid)
        if cur is not None and cur <= due:
            return
        self._scheduled[qid] = due
        heapq.heappush(self._heap, (due, qid))
        self._wake.set()

    def _cache_body(self, qid: str, data: bytes) -> None:
        if len(data) > self._body_cache_max // 8:
            return
        self._bodies[qid] = data
        self._body_bytes += len(data)
        while self._body_bytes > self._body_cache_max and self._bodies:
            _, old = self._bodies.popitem(last=False)
            self._body_bytes -= len(old)

    def _take_body(self, qid: str) -> bytes | None:
        data = self._bodies.pop(qid, None)
        if data is not None:
            self._body_bytes -= len(data)
        return data

    # --- the loop -----------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._stopping:
            now = self.clock()
            await self._timers(now)
            if self.halted is None and self.spool.corrupt is not None:
                # Damage seen by any read or write: whatever we deliver now could not be recorded.
                self.halted = f"the spool is damaged ({self.spool.corrupt}); deliveries are stopped"
                log.error("delivery.halted", error=str(self.spool.corrupt), runbook=RUNBOOK_SPOOL)
            if self.halted is not None:
                await self._retry_unrecorded()
            # Start everything that is due, up to the in-flight limit.
            while self._heap and not self._stopping and self.halted is None:
                due, qid = self._heap[0]
                if self._scheduled.get(qid) != due:
                    heapq.heappop(self._heap)  # stale entry (rescheduled or forgotten)
                    continue
                if due > now:
                    break
                if self._limit.locked():
                    break
                heapq.heappop(self._heap)
                del self._scheduled[qid]
                later = self._still_suspended(qid, now)
                if later is not None:
                    self._push(qid, later)
                    continue
                await self._limit.acquire()
                self._inflight.add(qid)
                t = asyncio.create_task(self._attempt(qid), name=f"deliver-{qid}")
                self._tasks.add(t)
                t.add_done_callback(self._done)
            self._wake.clear()
            timeout: float | None = None
            nxt = min(self._next_unsuspend, self.queue.next_rule_expiry)
            if self.halted is not None:
                nxt = min(nxt, now + self.record_retry_interval)
            elif self._heap and not self._limit.locked():
                nxt = min(nxt, self._heap[0][0])
            elif self._limit.locked():
                nxt = min(nxt, now + 1.0)
            if nxt < math.inf:
                timeout = max(0.0, min(nxt - self.clock(), 60.0))
            # A timer that sets the event, not wait_for (which wraps the wait in a task of its own:
            # this loop turns about once per message under load).
            timer = asyncio.get_running_loop().call_later(timeout, self._wake.set) if timeout is not None else None
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()

    async def _timers(self, now: float) -> None:
        """Ends of suspensions (for the gauge), hold rules that run out, idle destinations."""
        if now >= self._next_unsuspend:
            ended = []
            for name, (until, label) in list(self._suspended.items()):
                if until <= now:
                    del self._suspended[name]
                    metrics.DESTINATION_SUSPENDED.labels(label).dec()
                    log.info("destination.resumed", destination=name)
                    ended.append(name)
            self._next_unsuspend = min((u for u, _ in self._suspended.values()), default=math.inf)
            await self._forget_suspensions(ended, now)
        if now >= self.queue.next_rule_expiry:
            try:
                await self.queue.expire_rules()
            except Exception as e:  # a spool outage: try again on the next turn
                log.exception("queue.hold_expiry_failed", error=str(e))
            metrics.QUEUE_HELD.set(len(self.queue.rules))
        if now - self._last_prune > 60:
            self._last_prune = now
            self.destinations.prune(now)

    def _done(self, t: asyncio.Task[Any]) -> None:
        self._tasks.discard(t)
        self._limit.release()
        self._wake.set()
        if not t.cancelled() and t.exception() is not None:
            log.error("scheduler.attempt_crashed", error=repr(t.exception()))

    async def _attempt(self, qid: str) -> None:
        next_due: float | None = None
        try:
            next_due = await self._attempt_inner(qid)
        except Exception as e:
            # A bug or a spool outage: leave the recipients active and try again later.
            log.exception("delivery.error", queue_id=qid, error=str(e))
            next_due = self.clock() + 60
        finally:
            self._inflight.discard(qid)
            handed = self._handed.pop(qid, None)
            if handed is not None:  # handed a slot it did not take
                self._hand_on(handed)
            if next_due is None:
                self._domain_of.pop(qid, None)
            if next_due is PARKED or next_due == PARKED:
                self._parked.add(qid)
                self._take_body(qid)
            elif next_due is not None and not self._stopping:
                self._push(qid, next_due)

    async def _attempt_inner(self, qid: str) -> float | None:
        msg = self._fresh.pop(qid, None) or await self.spool.get(qid)
        if msg is None or not msg.active_recipients():
            self._take_body(qid)
            return None
        now = self.clock()
        plan = self.queue.plan(msg, now, has_local=self.local is not None)
        go: list[tuple[Destination, list[RecipientRecord]]] = []
        postponed: list[Postponed] = []
        domains = {r.domain for r in msg.active_recipients()}
        if len(domains) == 1:
            self._domain_of[qid] = self._intern(domains.pop())
        # Groups for a destination whose connections this message already fills wait for its own
        # transactions there to end (one recipient per transaction with VERP), instead of being
        # postponed: the slot they would wait for is this message's own (see _run_chain).
        mine: dict[str, int] = {}
        queued: dict[str, list[list[RecipientRecord]]] = {}
        for group in self._groups(msg, plan.to_try):
            dest = await self._destination(group[0].domain, now)
            if mine.get(dest.name) and dest.active >= dest.limits.max_connections and not dest.suspended(now):
                queued.setdefault(dest.name, []).append(group)
                continue
            why = self._admit(dest, qid, now)
            if why is None:
                dest.active += 1
                mine[dest.name] = mine.get(dest.name, 0) + 1
                go.append((dest, group))
            else:
                postponed.extend(Postponed(r, why[0], why[1], why[2]) for r in group)
        handed = self._handed.get(qid)
        if handed is not None and mine.get(handed.name):
            del self._handed[qid]  # the slot it was handed is in use
        jobs: list[Awaitable[None]] = []
        results: list[tuple[RecipientRecord, RcptOutcome]] = []
        local_results: list[tuple[RecipientRecord, LocalResult]] = []
        if go or plan.local:
            body = self._take_body(qid)
            if body is None:
                body = await self.spool.body(qid)
            if body is None:
                for dest, _ in go:
                    self._release(dest)
                log.error("delivery.missing_body", queue_id=qid)
                return None
            if plan.local and self.local is not None:
                jobs.append(self._run_local(msg, body, plan.local, local_results))
            for dest, group in go:
                jobs.append(self._run_chain(msg, body, dest, group, queued.get(dest.name, []), results, postponed))
        if jobs:
            trying = [r.state for r in plan.local] + [r.state for _, g in go for r in g] + \
                [r.state for gs in queued.values() for g in gs for r in g]
            for st in trying:
                self.inflight_by_state[st] = self.inflight_by_state.get(st, 0) + 1
            try:
                if len(jobs) == 1:
                    await jobs[0]  # the common case: no gather (it wraps each job in a task of its own)
                else:
                    await asyncio.gather(*jobs)
            finally:
                for st in trying:
                    self.inflight_by_state[st] -= 1
        outcome = self.queue.outcome(msg, plan, results, local_results, postponed, self.clock())
        try:
            return await self.queue.commit(outcome)
        except SpoolError as e:
            # The remote may already have the message: retrying now would deliver it again and
            # again (a damaged spool did: 3 copies in 140 s). Keep the outcome and stop delivering.
            self._halt(outcome, e)
            return None

    def _halt(self, item: Outcome, err: SpoolError) -> None:
        self._unrecorded.append(item)
        if self.halted is None:
            self.halted = f"the outcome of a delivery could not be recorded ({err}); deliveries are stopped"
            log.error("delivery.halted", queue_id=item.msg.queue_id, error=str(err), runbook=RUNBOOK_SPOOL,
                      retry_every=self.record_retry_interval)
        else:
            log.error("delivery.unrecorded", queue_id=item.msg.queue_id, error=str(err))
        self._wake.set()

    async def _retry_unrecorded(self) -> None:
        """Try to write the outcomes the spool refused; resume deliveries once all are in."""
        while self._unrecorded:
            u = self._unrecorded[0]
            try:
                nxt = await self.queue.commit(u)
            except SpoolError:
                return
            self._unrecorded.pop(0)
            if nxt == PARKED:
                self._parked.add(u.msg.queue_id)
            elif nxt is not None:
                self._push(u.msg.queue_id, nxt)
        if self._inflight or self.spool.corrupt is not None:
            return  # an attempt still running may add its own outcome; a damaged spool needs a restore
        log.info("delivery.resumed")
        self.halted = None

    def _intern(self, domain: str) -> str:
        return self._domain_names.setdefault(domain, domain)

    def _still_suspended(self, qid: str, now: float) -> float | None:
        """When to look again at a message all of whose recipients go to a destination suspended
        now (its backlog returns spread out, as in _admit); None: attempt it. Only what needs no
        lookup: a domain grouped by MX whose lookup is not cached is attempted as usual. (A message
        past its lifetime expires when the suspension ends: at most throttle_backoff later.)"""
        domain = self._domain_of.get(qid)
        if domain is None:
            return None
        name = self.destinations.cached_name(domain, now)
        dest = self.destinations.peek(name) if name is not None else None
        if dest is None or not dest.suspended(now):
            return None
        metrics.DESTINATION_POSTPONED.labels("suspended").inc()
        return dest.suspended_until + random.uniform(0, min(30.0, 0.1 * dest.limits.throttle_backoff))

    def _admit(self, dest: Destination, qid: str, now: float) -> tuple[float, str, bool] | None:
        """None: send now. Else (when, reply, durable) for the postponed recipients."""
        if dest.suspended(now):
            metrics.DESTINATION_POSTPONED.labels("suspended").inc()
            # In memory only: no spool write per queued message (a suspension of a big destination
            # must not compete with accepting mail); the suspension itself is in the spool, so
            # after a restart it still holds (see _restore_suspensions).
            # The spread keeps the backlog from returning in one burst.
            spread = random.uniform(0, min(30.0, 0.1 * dest.limits.throttle_backoff))
            return dest.suspended_until + spread, "", False
        if dest.active >= dest.limits.max_connections:
            metrics.DESTINATION_POSTPONED.labels("connections").inc()
            dest.wait(qid)
            return now + WAIT_RECHECK, "", False
        slot = dest.rate_slot(qid, now)
        if slot is not None:
            metrics.DESTINATION_POSTPONED.labels("rate").inc()
            return slot, "", False
        return None

    def _release(self, dest: Destination) -> None:
        """A transaction to ``dest`` ended: hand its slot to the first waiting message."""
        dest.active -= 1
        self._hand_on(dest)

    def _hand_on(self, dest: Destination) -> None:
        """Hand a free slot of ``dest`` to its first waiting message still on the schedule."""
        while dest.active < dest.limits.max_connections and (q := dest.next_waiter()) is not None:
            if q in self._inflight or q in self._parked or q not in self._scheduled:
                continue  # being attempted, held, or gone (deleted, bounced): not waiting any more
            self._handed[q] = dest
            self._push(q, self.clock())
            break

    async def _destination(self, domain: str, now: float) -> Destination:
        name = self.destinations.cached_name(domain, now)
        if name is None:
            mx: list[str] = []
            if self.mx_names is not None and self.cfg.route_for(domain) is None:
                try:
                    mx = await self.mx_names(domain)
                except Exception as e:  # DNS trouble: shape by domain; the transport reports it
                    log.debug("destination.mx_lookup_failed", domain=domain, error=str(e))
            name = self.destinations.name_from_mx(domain, mx, now)
        return self.destinations.get(name)

    def _suspend(self, dest: Destination, reply: str, now: float) -> bool:
        """Suspend ``dest`` for its throttle_backoff; True if that started or extended a suspension
        (the caller then records it in the spool)."""
        backoff = dest.limits.throttle_backoff
        if backoff <= 0:
            return False
        until = now + backoff
        if until <= dest.suspended_until:
            return False
        fresh = not dest.suspended(now)
        self._mark_suspended(dest, until, reply)
        if fresh:
            log.warning("destination.suspended", destination=dest.name, seconds=backoff, reply=reply[:300])
        return True

    def _mark_suspended(self, dest: Destination, until: float, reply: str) -> None:
        dest.suspended_until = until
        dest.suspend_reply = reply[:300]
        if dest.name in self._suspended:
            self._suspended[dest.name] = (until, self._suspended[dest.name][1])
        else:
            label = metrics.destination_label(dest.name)
            self._suspended[dest.name] = (until, label)
            metrics.DESTINATION_SUSPENDED.labels(label).inc()
        self._next_unsuspend = min(self._next_unsuspend, until)
        self._wake.set()

    # --- suspensions in the spool: a restart (or crash) must not forget them ---------------------
    async def _restore_suspensions(self) -> None:
        """Suspensions still in force from before the restart; their mail waits as it did then."""
        now = self.clock()
        for s in await self.spool.suspensions(now):
            self._mark_suspended(self.destinations.get(s.destination), s.until, s.reply)
            log.info("destination.suspension_restored", destination=s.destination,
                     seconds=round(s.until - now, 1), reply=s.reply[:300])
        await self._forget_suspensions(None, now)  # rows of suspensions that ended while we were down

    async def _save_suspension(self, dest: Destination, now: float) -> None:
        try:
            await self.spool.save_suspension(Suspension(dest.name, dest.suspended_until, dest.suspend_reply, now))
        except SpoolError as e:  # it still holds in memory; only a restart would forget it
            log.error("destination.suspension_not_saved", destination=dest.name, error=str(e))

    async def _forget_suspensions(self, names: Sequence[str] | None, now: float) -> None:
        if names is not None and not names:
            return
        try:
            await self.spool.end_suspensions(names, ended_by=now)
        except SpoolError as e:  # an ended row is ignored at the next start anyway
            log.error("destination.suspension_not_removed", destinations=names, error=str(e))

    def _groups(self, msg: MessageRecord, rcpts: Sequence[RecipientRecord]) -> list[list[RecipientRecord]]:
        """One transaction per destination domain; one per recipient when VERP gives each
        recipient its own return path."""
        if self.hooks.verp_enabled(msg):
            return [[r] for r in rcpts]
        by_domain: dict[str, list[RecipientRecord]] = {}
        for r in rcpts:
            by_domain.setdefault(r.domain, []).append(r)
        return list(by_domain.values())

    async def _run_chain(self, msg: MessageRecord, body: bytes, dest: Destination, group: list[RecipientRecord],
                         queued: list[list[RecipientRecord]], results: list[tuple[RecipientRecord, RcptOutcome]],
                         postponed: list[Postponed]) -> None:
        """``group``, then groups of the same message queued for ``dest`` (shared by the message's
        chains there), each in the slot the last one freed, while the destination admits them."""
        while True:
            await self._run_group(msg, body, dest, group, results, postponed)
            if not queued:
                return
            now = self.clock()
            why = self._admit(dest, msg.queue_id, now)  # suspended by a reply meanwhile, or its rate
            if why is not None:
                postponed.extend(Postponed(r, why[0], why[1], why[2]) for g in queued for r in g)
                queued.clear()
                return
            dest.active += 1
            group = queued.pop(0)

    async def _run_group(self, msg: MessageRecord, body: bytes, dest: Destination, group: list[RecipientRecord],
                         out: list[tuple[RecipientRecord, RcptOutcome]], postponed: list[Postponed]) -> None:
        mail_from = self.hooks.return_path(msg, group[0])
        t0 = time.perf_counter()
        try:
            res = await self.transport.deliver(group[0].domain, mail_from, [r.address for r in group], body,
                                               max_messages=dest.limits.max_messages_per_connection,
                                               max_connections=dest.limits.max_connections,
                                               max_recipients=dest.limits.max_recipients_per_transaction)
        finally:
            self._release(dest)
        dest.sent += 1
        by_addr = {x.address: x for x in res}
        now = self.clock()
        mine: list[tuple[RecipientRecord, RcptOutcome]] = []
        for r in group:
            outcome = by_addr.get(r.address)
            if outcome is None:  # a transport bug must not lose the recipient: retry
                outcome = _Missing(r.address)
            mine.append((r, outcome))
        suspended = False
        for r, o in mine:
            # Only the receiver's own reply: our verdicts (TLS failed, a policy refused the host) say
            # nothing about its load, and would suspend every domain the destination groups.
            if not o.ok and not o.permanent and o.code and o.remote_reply and \
                    is_throttling(o.code, o.enhanced, o.remote_reply):
                suspended = self._suspend(dest, _reply_text(o), now) or suspended
                if dest.suspended(now):
                    until = dest.suspended_until + random.uniform(0, min(30.0, 0.1 * dest.limits.throttle_backoff))
                    postponed.append(Postponed(r, until, _reply_text(o), True, attempted=True))
                    continue
            out.append((r, o))
        if suspended:  # durable before the outcome that relies on it is recorded
            await self._save_suspension(dest, now)
        log.info("delivery.attempt", queue_id=msg.queue_id, domain=group[0].domain, destination=dest.name,
                 mail_from=mail_from, duration=round(time.perf_counter() - t0, 4),
                 results=[{"rcpt": r.address, "code": o.code, "status": o.enhanced, "mta": o.remote_mta,
                           "text": o.text[:200]} for r, o in mine])

    async def _run_local(self, msg: MessageRecord, body: bytes, rcpts: list[RecipientRecord],
                         out: list[tuple[RecipientRecord, LocalResult]]) -> None:
        assert self.local is not None
        try:
            res = await self.local(msg, body, rcpts)
        except Exception as e:
            log.exception("feedback.error", queue_id=msg.queue_id, error=str(e))
            res = [LocalResult(False, f"4.3.0 feedback processing failed: {type(e).__name__}", True)] * len(rcpts)
        out.extend(zip(rcpts, res, strict=True))

