"""The scheduler: decides when each queued recipient is tried, and records every outcome.

Per recipient: pending -> (in flight) -> delivered | deferred (retry later) | bounced | expired |
suppressed. The spool is the source of truth; in memory there is only a heap of
(next attempt, queue id) and the set of messages in flight, so a queue of 100,000 deferred
messages costs a few megabytes and one indexed query at start-up.

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
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mailrelayd import metrics
from mailrelayd.config import Config
from mailrelayd.errors import SpoolError
from mailrelayd.log import get_logger
from mailrelayd.spool.store import (
    BOUNCED,
    DEFERRED,
    DELETED,
    DELIVERED,
    EXPIRED,
    OUTBOUND,
    PROCESSED,
    SUPPRESSED,
    Event,
    MessageRecord,
    NewMessage,
    RecipientRecord,
    RecipientUpdate,
    Spool,
)

log = get_logger()


class RcptOutcome(Protocol):
    """One recipient's result from a delivery attempt (see delivery.transport.RcptResult)."""

    address: str
    code: int
    enhanced: str
    text: str
    remote_mta: str
    remote_reply: str
    stage: str

    @property
    def ok(self) -> bool: ...
    @property
    def permanent(self) -> bool: ...


class TransportLike(Protocol):
    async def deliver(self, domain: str, mail_from: str, recipients: Sequence[str], data: bytes
                      ) -> Sequence[RcptOutcome]: ...


@dataclass(frozen=True, slots=True)
class LocalResult:
    """Result of handing a local-domain recipient (bounce domain) to the feedback pipeline."""

    ok: bool
    detail: str
    temporary: bool = False
    events: tuple[Event, ...] = ()
    """Events about earlier messages (complaints, asynchronous bounces), stored with this outcome."""


LocalDelivery = Callable[[MessageRecord, bytes, Sequence[RecipientRecord]], Awaitable[Sequence[LocalResult]]]
"""Processes messages addressed to our own domains (feedback: bounces and complaints)."""

DsnBuilder = Callable[..., bytes]


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    address: str
    status: str
    diagnostic: str
    remote_mta: str
    last_attempt: float
    stage: str = ""


@dataclass(slots=True)
class _Unrecorded:
    """The outcome of an attempt that the spool refused to record (kept to retry the write)."""

    msg: MessageRecord
    updates: list[RecipientUpdate]
    failed: list[FailedRecipient]
    now: float
    delayed: Sequence[FailedRecipient]
    events: Sequence[Event] = ()


RUNBOOK_SPOOL = "docs/runbooks/MailrelaydSpoolDamaged.md"


class Hooks:
    """Optional integrations, wired by the daemon (all may be left as no-ops)."""

    def is_suppressed(self, address: str) -> bool:
        return False

    def return_path(self, msg: MessageRecord, rcpt: RecipientRecord) -> str:
        """Envelope sender for one recipient (VERP), or the original sender."""
        return msg.mail_from

    def verp_enabled(self, msg: MessageRecord) -> bool:
        return False

    def is_local(self, domain: str) -> bool:
        return False

    def permanent_failure(self, msg: MessageRecord, rcpt: RecipientRecord, outcome: RcptOutcome) -> None:
        """Called for each synchronous 5xx (feeds the suppression classification)."""


class Scheduler:
    """Runs deliveries for everything in the spool. ``start()`` loads the schedule."""

    def __init__(self, cfg: Config, spool: Spool, transport: TransportLike, *, dsn_builder: DsnBuilder,
                 local: LocalDelivery | None = None, hooks: Hooks | None = None,
                 clock: Callable[[], float] = time.time, body_cache_bytes: int = 64 * 1024 * 1024) -> None:
        self.cfg = cfg
        self.spool = spool
        self.transport = transport
        self.local = local
        self.hooks = hooks or Hooks()
        self.dsn_builder = dsn_builder
        self.clock = clock
        self._heap: list[tuple[float, str]] = []
        self._scheduled: dict[str, float] = {}  # qid -> due time of its live heap entry
        self._inflight: set[str] = set()
        # Spool state of recipients being attempted right now, so the queue gauges count each once.
        self.inflight_by_state: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._body_bytes = 0
        self._body_cache_max = body_cache_bytes
        self._limit = asyncio.Semaphore(self._max_inflight(cfg))
        self.loaded = False
        # Set when an attempt's outcome could not be written: no delivery starts until the spool
        # takes the pending outcomes again (never retry into duplicates; promise 1).
        self.halted: str | None = None
        self._unrecorded: list[_Unrecorded] = []
        self.record_retry_interval = 30.0

    @staticmethod
    def _max_inflight(cfg: Config) -> int:
        return max(1, cfg.delivery.max_concurrency * 2)

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Load every unfinished message from the spool and start working."""
        t0 = time.perf_counter()
        rows = await self.spool.active_schedule()
        for due, qid in rows:
            self._push(qid, due)
        self.loaded = True
        log.info("scheduler.started", queued=len(rows), load_seconds=round(time.perf_counter() - t0, 3))
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
        if self._unrecorded:
            # Still active in the spool: delivered again after the restart (at least once).
            log.error("delivery.unrecorded_at_stop", queue_ids=[u.msg.queue_id for u in self._unrecorded])

    # --- inputs -------------------------------------------------------------------------
    def submit(self, msg: NewMessage) -> None:
        """A message was just committed: deliver it now (its body is kept in memory for that)."""
        self._cache_body(msg.queue_id, msg.data)
        self._push(msg.queue_id, msg.received_at)

    def flush(self, qid: str | None = None) -> None:
        """Retry now (all deferred messages, or one)."""
        now = self.clock()
        if qid is None:
            for q in list(self._scheduled):
                self._push(q, now)
        elif qid not in self._inflight:
            self._push(qid, now)

    def forget(self, qid: str) -> None:
        self._scheduled.pop(qid, None)

    async def administrative(self, qid: str, action: str, reason: str = "") -> bool:
        """``queue bounce`` (DSN to the sender) or ``queue delete`` (silently) for every active
        recipient of one message. A delivery in flight for it cannot undo this: results are only
        recorded for recipients that are still active."""
        msg = await self.spool.get(qid)
        if msg is None or not msg.active_recipients():
            return False
        now = self.clock()
        why = reason or f"{action}d by the administrator"
        updates: list[RecipientUpdate] = []
        failed: list[FailedRecipient] = []
        for r in msg.active_recipients():
            if action == "bounce":
                updates.append(RecipientUpdate(qid, r.index, BOUNCED, f"5.0.0 {why}", attempted=False))
                failed.append(FailedRecipient(r.address, "5.0.0", why, "", now))
            else:
                updates.append(RecipientUpdate(qid, r.index, DELETED, why, attempted=False))
        self.forget(qid)
        await self._record(msg, updates, failed, now)
        log.info("queue.admin", queue_id=qid, action=action, recipients=len(updates))
        return True

    @property
    def inflight(self) -> frozenset[str]:
        return frozenset(self._inflight)

    def queued_count(self) -> int:
        return len(self._scheduled) + len(self._inflight)

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
            # Start everything that is due, up to the in-flight limit.
            if self.halted is None and self.spool.corrupt is not None:
                # Damage seen by any read or write: whatever we deliver now could not be recorded.
                self.halted = f"the spool is damaged ({self.spool.corrupt}); deliveries are stopped"
                log.error("delivery.halted", error=str(self.spool.corrupt), runbook=RUNBOOK_SPOOL)
            if self.halted is not None:
                await self._retry_unrecorded()
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
                await self._limit.acquire()
                self._inflight.add(qid)
                t = asyncio.create_task(self._attempt(qid), name=f"deliver-{qid}")
                self._tasks.add(t)
                t.add_done_callback(self._done)
            self._wake.clear()
            timeout: float | None = None
            if self.halted is not None:
                timeout = self.record_retry_interval
            elif self._heap and not self._limit.locked():
                timeout = max(0.0, min(self._heap[0][0] - self.clock(), 60.0))
            elif self._limit.locked():
                timeout = 1.0
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

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
            if next_due is not None and not self._stopping:
                self._push(qid, next_due)

    async def _attempt_inner(self, qid: str) -> float | None:
        msg = await self.spool.get(qid)
        if msg is None:
            self._take_body(qid)
            return None
        active = msg.active_recipients()
        if not active:
            self._take_body(qid)
            return None
        now = self.clock()
        body = self._take_body(qid)
        if body is None:
            body = await self.spool.body(qid)
            if body is None:
                log.error("delivery.missing_body", queue_id=qid)
                return None
        lifetime = self.cfg.delivery.bounce_queue_lifetime if msg.is_dsn else self.cfg.delivery.max_queue_lifetime
        expired = now - msg.received_at >= lifetime
        updates: list[RecipientUpdate] = []
        failed: list[FailedRecipient] = []
        to_try: list[RecipientRecord] = []
        local: list[RecipientRecord] = []
        for r in active:
            if self.hooks.is_local(r.domain) and self.local is not None:
                local.append(r)
            elif expired:
                reply = r.last_reply or "4.4.7 Delivery time expired"
                updates.append(RecipientUpdate(qid, r.index, EXPIRED, f"expired: {reply}", attempted=False))
                failed.append(FailedRecipient(r.address, _status_of(r.last_reply) or "4.4.7",
                                              r.last_reply or "delivery time expired", "", now))
                metrics.DELIVERY_ATTEMPTS.labels("expired", metrics.destination_domain_label(r.domain)).inc()
            elif msg.queue == OUTBOUND and self.hooks.is_suppressed(r.address):
                updates.append(RecipientUpdate(qid, r.index, SUPPRESSED, "5.7.1 recipient suppressed",
                                               attempted=False))
                failed.append(FailedRecipient(r.address, "5.7.1", "recipient is on the suppression list", "", now))
                metrics.SUPPRESSED_REJECTIONS.labels("delivery").inc()
                metrics.DELIVERY_ATTEMPTS.labels("suppressed", metrics.destination_domain_label(r.domain)).inc()
            else:
                to_try.append(r)
        jobs: list[Awaitable[None]] = []
        results: list[tuple[RecipientRecord, RcptOutcome]] = []
        local_results: list[tuple[RecipientRecord, LocalResult]] = []
        if local and self.local is not None:
            jobs.append(self._run_local(msg, body, local, local_results))
        for group in self._groups(msg, to_try):
            jobs.append(self._run_group(msg, body, group, results))
        if jobs:
            trying = [r.state for r in (*local, *to_try)]
            for st in trying:
                self.inflight_by_state[st] = self.inflight_by_state.get(st, 0) + 1
            try:
                await asyncio.gather(*jobs)
            finally:
                for st in trying:
                    self.inflight_by_state[st] -= 1
        now = self.clock()
        events = [e for _, lr in local_results for e in lr.events]
        for r, lr in local_results:
            if lr.ok:
                updates.append(RecipientUpdate(qid, r.index, PROCESSED, lr.detail))
            elif lr.temporary:
                updates.append(RecipientUpdate(qid, r.index, DEFERRED, lr.detail, self._retry_at(r.attempts + 1, now)))
            else:
                updates.append(RecipientUpdate(qid, r.index, BOUNCED, lr.detail))
        for r, res in results:
            reply = _reply_text(res)
            dom = metrics.destination_domain_label(r.domain)
            if res.ok:
                updates.append(RecipientUpdate(qid, r.index, DELIVERED, reply))
                metrics.DELIVERY_ATTEMPTS.labels("delivered", dom).inc()
            elif res.permanent:
                updates.append(RecipientUpdate(qid, r.index, BOUNCED, reply))
                failed.append(FailedRecipient(r.address, res.enhanced or "5.0.0", _diagnostic(res),
                                              res.remote_mta, now, res.stage))
                metrics.DELIVERY_ATTEMPTS.labels("bounced", dom).inc()
                self.hooks.permanent_failure(msg, r, res)
            else:
                updates.append(RecipientUpdate(qid, r.index, DEFERRED, reply, self._retry_at(r.attempts + 1, now)))
                metrics.DELIVERY_ATTEMPTS.labels("deferred", dom).inc()
        delayed: list[FailedRecipient] = []
        warn_after = self.cfg.delivery.delay_warning
        if warn_after > 0 and not msg.warned and not msg.is_dsn and msg.mail_from and \
                now - msg.received_at >= warn_after:
            delayed = [FailedRecipient(r.address, res.enhanced or "4.0.0", _diagnostic(res), res.remote_mta, now,
                                       res.stage)
                       for r, res in results if not res.ok and not res.permanent]
        try:
            done = await self._record(msg, updates, failed, now, delayed=delayed, events=events)
        except SpoolError as e:
            # The remote may already have the message: retrying now would deliver it again and
            # again (a damaged spool did: 3 copies in 140 s). Keep the outcome and stop delivering.
            self._halt(_Unrecorded(msg, updates, failed, now, delayed, events), e)
            return None
        return self._next_due(qid, updates, done, now)

    def _next_due(self, qid: str, updates: Sequence[RecipientUpdate], done: Sequence[str], now: float
                  ) -> float | None:
        if qid in done:
            return None
        pending = [u.next_attempt for u in updates if u.state == DEFERRED]
        if pending:
            return min(pending)
        # Recipients we did not touch this round (none expected): look again later.
        return now + self.cfg.delivery.retry_initial

    def _halt(self, item: _Unrecorded, err: SpoolError) -> None:
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
                done = await self._record(u.msg, u.updates, u.failed, u.now, delayed=u.delayed, events=u.events)
            except SpoolError:
                return
            self._unrecorded.pop(0)
            nxt = self._next_due(u.msg.queue_id, u.updates, done, u.now)
            if nxt is not None:
                self._push(u.msg.queue_id, nxt)
        if self._inflight or self.spool.corrupt is not None:
            return  # an attempt still running may add its own outcome; a damaged spool needs a restore
        log.info("delivery.resumed")
        self.halted = None

    def _groups(self, msg: MessageRecord, rcpts: Sequence[RecipientRecord]) -> list[list[RecipientRecord]]:
        """One transaction per destination domain; one per recipient when VERP gives each
        recipient its own return path."""
        if self.hooks.verp_enabled(msg):
            return [[r] for r in rcpts]
        by_domain: dict[str, list[RecipientRecord]] = {}
        for r in rcpts:
            by_domain.setdefault(r.domain, []).append(r)
        return list(by_domain.values())

    async def _run_group(self, msg: MessageRecord, body: bytes, group: list[RecipientRecord],
                         out: list[tuple[RecipientRecord, RcptOutcome]]) -> None:
        mail_from = self.hooks.return_path(msg, group[0])
        t0 = time.perf_counter()
        res = await self.transport.deliver(group[0].domain, mail_from, [r.address for r in group], body)
        by_addr = {x.address: x for x in res}
        for r in group:
            outcome = by_addr.get(r.address)
            if outcome is None:  # a transport bug must not lose the recipient: retry
                outcome = _Missing(r.address)
            out.append((r, outcome))
        log.info("delivery.attempt", queue_id=msg.queue_id, domain=group[0].domain, mail_from=mail_from,
                 duration=round(time.perf_counter() - t0, 4),
                 results=[{"rcpt": r.address, "code": o.code, "status": o.enhanced, "mta": o.remote_mta,
                           "text": o.text[:200]} for r, o in out[-len(group):]])

    async def _run_local(self, msg: MessageRecord, body: bytes, rcpts: list[RecipientRecord],
                         out: list[tuple[RecipientRecord, LocalResult]]) -> None:
        assert self.local is not None
        try:
            res = await self.local(msg, body, rcpts)
        except Exception as e:
            log.exception("feedback.error", queue_id=msg.queue_id, error=str(e))
            res = [LocalResult(False, f"4.3.0 feedback processing failed: {type(e).__name__}", True)] * len(rcpts)
        out.extend(zip(rcpts, res, strict=True))

    async def _record(self, msg: MessageRecord, updates: list[RecipientUpdate], failed: list[FailedRecipient],
                      now: float, delayed: Sequence[FailedRecipient] = (), events: Sequence[Event] = ()
                      ) -> list[str]:
        """Write outcomes durably, with the DSN (if any) in the same transaction."""
        new: list[tuple[str, NewMessage]] = []
        if failed and msg.mail_from and not msg.is_dsn:
            new.append(("failed", await self._dsn(msg, failed, "failed", now)))
        if delayed:
            new.append(("delayed", await self._dsn(msg, delayed, "delayed", now)))
        done = await self.spool.update(updates, [m for _, m in new], events)
        if delayed:
            try:
                await self.spool.mark_warned(msg.queue_id)
            except SpoolError as e:  # the outcome is recorded; at worst a second delay warning
                log.error("spool.mark_warned_failed", queue_id=msg.queue_id, error=str(e))
        for action, m in new:
            metrics.DSN_SENT.labels(action).inc()
            self.submit(m)
        final = {DELIVERED: "delivered", BOUNCED: "bounced", EXPIRED: "expired", SUPPRESSED: "suppressed"}
        sdom = metrics.sender_domain_label(msg.sender_domain)
        for u in updates:
            if u.state in final and msg.queue == OUTBOUND and not msg.is_dsn:
                metrics.SENT_RECIPIENTS.labels(sdom, final[u.state]).inc()
                metrics.DELIVERY_LATENCY.labels(final[u.state]).observe(max(0.0, now - msg.received_at))
        if msg.queue_id in done:
            states: dict[str, int] = {}
            for u in updates:
                states[u.state] = states.get(u.state, 0) + 1
            log.info("message.done", queue_id=msg.queue_id, age=round(now - msg.received_at, 3), states=states)
        return done

    async def _dsn(self, msg: MessageRecord, failed: Sequence[FailedRecipient], action: str, now: float
                   ) -> NewMessage:
        original = await self.spool.body(msg.queue_id) or b""
        from mailrelayd.delivery.dsn import DsnRecipient  # delivery.dsn is built alongside

        data = self.dsn_builder(
            reporting_mta=self.cfg.server.hostname, to=msg.mail_from, original=original, queue_id=msg.queue_id,
            arrival_date=msg.received_at, action=action, now=now,
            recipients=[DsnRecipient(f.address, f.status, f.diagnostic, f.remote_mta, f.last_attempt, f.stage)
                        for f in failed],
        )
        qid = self.spool.new_queue_id()
        log.info("dsn.generated", queue_id=qid, original_queue_id=msg.queue_id, action=action, to=msg.mail_from,
                 recipients=[f.address for f in failed])
        return NewMessage(queue_id=qid, mail_from="", recipients=(msg.mail_from,), data=data, received_at=now,
                          queue=OUTBOUND, listener="dsn", sender_domain=self.cfg.server.hostname, is_dsn=True)

    def _retry_at(self, attempts: int, now: float) -> float:
        """Exponential backoff from retry_initial, capped at retry_max, with jitter (like Postfix's
        minimal/maximal_backoff_time, plus jitter so a burst of deferrals does not retry in step)."""
        d = self.cfg.delivery
        delay = min(d.retry_max, d.retry_initial * (2 ** max(0, attempts - 1)))
        j = d.retry_jitter
        return now + delay * random.uniform(1 - j, 1 + j)


class _Missing:
    """Stands in for a result the transport did not return: treated as a temporary failure."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.code = 0
        self.enhanced = "4.3.0"
        self.text = "no result from transport"
        self.remote_mta = ""
        self.remote_reply = ""
        self.stage = ""

    ok = False
    permanent = False


def _reply_text(res: RcptOutcome) -> str:
    """The recipient's ``last_reply`` in the spool: the remote's reply verbatim when there was one
    (it starts with the 3-digit code), otherwise our status and explanation (``"4.4.1 connect to
    ...: timed out"``, no reply code), so an expiry DSN can tell the two apart."""
    return _diagnostic(res)[:1000]


def _diagnostic(res: RcptOutcome) -> str:
    """What a DSN reports as the Diagnostic-Code: the remote's reply once, never wrapped in our
    own text (which already names the host): ``550 5.1.1 <x@y>: no such user``."""
    if res.remote_reply:
        return res.remote_reply
    return f"{res.enhanced} {res.text}".strip()


def _status_of(reply: str) -> str:
    for tok in reply.split()[:2]:
        if tok.count(".") == 2 and tok[0] in "245" and tok.replace(".", "").isdigit():
            return tok
    return ""
