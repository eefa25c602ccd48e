"""The queue manager: what happens to queued mail, apart from the act of delivering it.

It turns delivery results into durable recipient states (with their DSNs, in the same
transaction), decides expiry and suppression, keeps the hold rules, and performs the operator's
actions (hold, release, delete, bounce, flush by filter). It needs the spool and the config, not a
transport or an event loop of its own, so the CLI uses it directly on a stopped daemon's spool.

The delivery loop (:mod:`mailrelayd.delivery.scheduler`) attaches itself as a
:class:`QueueListener` to hear about mail it must (re)consider: a new DSN, a release, a flush.

Holds (``queue hold``): a rule by recipient domain, sender or SASL user holds matching mail now and
mail that arrives later, until released or until its ``until`` time; a hold by queue id or age holds
those messages only. Held recipients are never attempted and never expire while held: the time
spent held is credited against ``max_queue_lifetime`` on release.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
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
    HoldRule,
    MessageRecord,
    NewMessage,
    QueueFilter,
    RecipientRecord,
    RecipientUpdate,
    Spool,
    sender_matches,
)

log = get_logger()

PARKED = math.inf
"""``finish`` result for a message whose only active recipients are held: not in the heap until
a release brings it back."""

BULK_CHUNK = 200
"""Messages per spool transaction in bulk delete/bounce (a DSN body is read for each bounced one)."""


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


@dataclass(frozen=True, slots=True)
class LocalResult:
    """Result of handing a local-domain recipient (bounce domain) to the feedback pipeline."""

    ok: bool
    detail: str
    temporary: bool = False
    events: tuple[Event, ...] = ()
    """Events about earlier messages (complaints, asynchronous bounces), stored with this outcome."""


DsnBuilder = Callable[..., bytes]


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    address: str
    status: str
    diagnostic: str
    remote_mta: str
    last_attempt: float
    stage: str = ""


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


class QueueListener(Protocol):
    """The delivery loop, as the queue manager sees it."""

    def submit(self, msg: NewMessage) -> None: ...
    def wake(self, qids: Sequence[str], when: float) -> None: ...
    def forget(self, qid: str) -> None: ...
    def stale(self, qids: Sequence[str]) -> None: ...
    @property
    def inflight(self) -> frozenset[str]: ...
    def suspended(self, domains: Sequence[str] | None = None) -> list[str]: ...
    def resume(self, names: Sequence[str]) -> None: ...


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with one message now: recipients decided without contacting anyone (expired,
    suppressed), recipients for the feedback pipeline, held ones, and the ones to deliver."""

    updates: list[RecipientUpdate]
    failed: list[FailedRecipient]
    local: list[RecipientRecord]
    held: list[RecipientRecord]
    to_try: list[RecipientRecord]


@dataclass(frozen=True, slots=True)
class Postponed:
    """A recipient the delivery loop did not attempt (its destination is suspended or at its rate).
    ``durable``: write it as deferred until ``when`` (a suspension); else keep it in memory only."""

    rcpt: RecipientRecord
    when: float
    reply: str
    durable: bool
    attempted: bool = False
    """True for a recipient whose own attempt got the throttling reply that suspended it."""


@dataclass(slots=True)
class Outcome:
    """An attempt's results as recipient updates, ready to be recorded (or kept and retried by
    the delivery loop if the spool refuses them)."""

    msg: MessageRecord
    updates: list[RecipientUpdate]
    failed: list[FailedRecipient]
    delayed: list[FailedRecipient]
    now: float
    later: list[float]
    """In-memory times of postponed recipients (rate, connection slot, suspension)."""
    held: bool
    events: list[Event] = field(default_factory=list)
    """Webhook events from feedback processing, recorded in the same transaction as the updates."""


@dataclass(frozen=True, slots=True)
class BulkResult:
    """What a bulk action touched (or would touch, with ``dry_run``)."""

    action: str
    messages: int
    recipients: int
    dry_run: bool
    rules: tuple[HoldRule, ...] = ()
    resumed: tuple[str, ...] = ()
    """Destinations whose suspension (after a throttling reply) ``queue flush`` lifted."""
    in_flight: int = 0
    """Selected messages left alone because they were being delivered (``queue delete``/``bounce``)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": self.action, "messages": self.messages, "recipients": self.recipients,
                               "dry_run": self.dry_run}
        if self.rules:
            out["rules"] = [{"kind": r.kind, "value": r.value, "until": r.until or None, "reason": r.reason}
                            for r in self.rules]
        if self.resumed:
            out["resumed"] = list(self.resumed)
        if self.in_flight:
            out["in_flight"] = self.in_flight
        return out


class QueueManager:
    """Outcomes, DSNs, holds and admin actions on the spool. ``await load()`` before use."""

    def __init__(self, cfg: Config, spool: Spool, *, dsn_builder: DsnBuilder, hooks: Hooks | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.spool = spool
        self.dsn_builder = dsn_builder
        self.hooks = hooks or Hooks()
        self.clock = clock
        self.listener: QueueListener | None = None
        self._rules: dict[tuple[str, str], HoldRule] = {}
        self._next_rule_expiry = math.inf

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg

    async def load(self) -> None:
        self._rules = {(r.kind, r.value): r for r in await self.spool.hold_rules()}
        self._update_rule_expiry()

    # --- holds ------------------------------------------------------------------------------
    @property
    def rules(self) -> list[HoldRule]:
        return list(self._rules.values())

    def is_held(self, msg: MessageRecord, rcpt: RecipientRecord) -> bool:
        """O(1): a whole-message hold, or a rule for the recipient domain, the sender or the user."""
        if msg.held_at > 0 or not self._rules:
            return msg.held_at > 0
        r = self._rules
        if ("domain", rcpt.domain) in r or (msg.user and ("user", msg.user) in r):
            return True
        sender = msg.mail_from.lower()
        return ("sender", sender) in r or ("sender", "@" + sender.rpartition("@")[2]) in r

    def hold_reason(self, msg: MessageRecord, rcpt: RecipientRecord) -> str:
        if msg.held_at > 0:
            return msg.held_reason or "held by the administrator"
        for (kind, value), rule in self._rules.items():
            if (kind == "domain" and rcpt.domain == value) or (kind == "user" and msg.user == value) or \
                    (kind == "sender" and sender_matches(value, msg.mail_from)):
                return rule.reason or f"held by {kind} {value}"
        return ""

    def domain_held(self, domain: str) -> bool:
        return ("domain", domain) in self._rules

    async def hold(self, f: QueueFilter, until: float | None = None, reason: str = "", *,
                   dry_run: bool = False) -> BulkResult:
        """Hold what ``f`` selects. By domain, sender or user this is a rule that also holds mail
        arriving later, until :meth:`release` (or ``until``, a Unix time). The feedback circuit
        breaker calls ``hold(QueueFilter(sender="@example.com"), until=..., reason=...)``.

        A hold does not interrupt a transaction already in flight; it applies from the next attempt.
        """
        f = f.normalized()
        if f.empty:
            raise ValueError("a hold needs a filter (--domain, --sender, --user, --older-than or queue ids)")
        if len(f.rules()) > 1:
            # Separate rules would hold more than asked (either, not both) for the mail to come.
            raise ValueError("a hold rule takes one of --domain, --sender, --user (add --older-than or "
                             "queue ids to hold only what is queued now)")
        now = self.clock()
        sel = await self.spool.select(f, now)
        qids = list(dict.fromkeys(q for q, _ in sel))
        if dry_run:
            return BulkResult("hold", len(qids), len(sel), True)
        rules: list[HoldRule] = []
        kinds = f.rules()
        if kinds:
            for kind, value in kinds:
                rule = await self.spool.add_hold_rule(HoldRule(kind, value, until or 0.0, reason, now))
                self._rules[(kind, value)] = rule
                rules.append(rule)
            self._update_rule_expiry()
        else:
            await self.spool.set_held(qids, now, reason)
            if self.listener is not None:
                self.listener.stale(qids)
        log.info("queue.hold", filter=f.to_json(), until=until, reason=reason, messages=len(qids),
                 recipients=len(sel), rules=len(rules))
        return BulkResult("hold", len(qids), len(sel), False, tuple(rules))

    async def release(self, f: QueueFilter | None = None, *, dry_run: bool = False) -> BulkResult:
        """Undo holds: rules equal to the filter's domain/sender/user, and whole-message holds of the
        messages it selects (``None``: every hold). Released mail is due at once."""
        now = self.clock()
        if f is None:
            rules = list(self._rules.values())
            stamp_filter = QueueFilter()
        else:
            f = f.normalized()
            rules = [self._rules[k] for k in f.rules() if k in self._rules]
            stamp_filter = f
        by_rule: dict[tuple[str, str], list[str]] = {}
        rcpts: set[tuple[str, int]] = set()
        for rule in rules:
            sel = await self.spool.select(_rule_filter(rule), now)
            by_rule[(rule.kind, rule.value)] = sorted({q for q, _ in sel})
            rcpts.update(sel)
        stamped_sel = await self.spool.select(stamp_filter, now, only_held=True)
        stamped = sorted({q for q, _ in stamped_sel})
        rcpts.update(stamped_sel)
        touched = set(stamped) | {q for qs in by_rule.values() for q in qs}
        if dry_run:
            return BulkResult("release", len(touched), len(rcpts), True, tuple(rules))
        for rule in rules:
            await self._drop_rule(rule, by_rule[(rule.kind, rule.value)], now)
        if stamped:
            await self.spool.clear_held(stamped, now)
        if self.listener is not None and touched:
            self.listener.wake(sorted(touched), now)
        log.info("queue.release", filter=f.to_json() if f else "all", messages=len(touched), rules=len(rules))
        return BulkResult("release", len(touched), len(rcpts), False, tuple(rules))

    async def expire_rules(self) -> int:
        """Release rules whose ``until`` has passed (called by the delivery loop)."""
        now = self.clock()
        if now < self._next_rule_expiry:
            return 0
        due = [r for r in self._rules.values() if 0 < r.until <= now]
        for rule in due:
            sel = await self.spool.select(_rule_filter(rule), now)
            qids = sorted({q for q, _ in sel})
            await self._drop_rule(rule, qids, now)
            if self.listener is not None and qids:
                self.listener.wake(qids, now)
            log.info("queue.hold_expired", kind=rule.kind, value=rule.value, messages=len(qids))
        self._update_rule_expiry()
        return len(due)

    async def _drop_rule(self, rule: HoldRule, qids: Sequence[str], now: float) -> None:
        await self.spool.remove_hold_rule(rule, qids, now)
        self._rules.pop((rule.kind, rule.value), None)
        self._update_rule_expiry()

    def _update_rule_expiry(self) -> None:
        self._next_rule_expiry = min((r.until for r in self._rules.values() if r.until > 0), default=math.inf)

    @property
    def next_rule_expiry(self) -> float:
        return self._next_rule_expiry

    # --- other bulk actions -------------------------------------------------------------------
    async def select(self, f: QueueFilter) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for q, i in await self.spool.select(f.normalized(), self.clock()):
            out.setdefault(q, []).append(i)
        return out

    async def flush(self, f: QueueFilter | None = None, *, dry_run: bool = False) -> BulkResult:
        """Retry now what ``f`` selects (``None``: everything). Held mail stays held. A flush of
        everything also lifts every destination suspension, a flush by ``--domain`` alone that of
        the domain's destination (as Postfix's ``postqueue -f`` revives dead destinations)."""
        now = self.clock()
        sel = await self.select(f or QueueFilter())
        n = sum(len(v) for v in sel.values())
        resumed = await self.resume_suspensions(f, dry_run=dry_run)
        if dry_run:
            return BulkResult("flush", len(sel), n, True, resumed=resumed)
        qids = sorted(sel)
        if f is None or f.normalized().empty:
            await self.spool.reschedule(None, now)
        else:
            await self.spool.reschedule_many(qids, now)
        if self.listener is not None:
            self.listener.wake(qids, now)
        return BulkResult("flush", len(sel), n, False, resumed=resumed)

    async def resume_suspensions(self, f: QueueFilter | None = None, *, dry_run: bool = False) -> tuple[str, ...]:
        """Lift destination suspensions: all (``f`` empty), or the one of ``f.domain`` when the
        domain is the only criterion (a flush of one sender's mail must not un-suspend a provider
        for everyone). Returns the destinations lifted (or that would be, with ``dry_run``)."""
        f = (f or QueueFilter()).normalized()
        if f.empty:
            scope: list[str] | None = None
        elif f.domain and f.sender is None and not f.user and f.older_than is None and not f.queue_ids:
            scope = [f.domain]
        else:
            return ()
        stored = {s.destination for s in await self.spool.suspensions(self.clock())}
        names = stored if scope is None else stored & set(scope)
        if self.listener is not None:  # it also knows which MX group a domain belongs to
            names |= set(self.listener.suspended(scope))
        if dry_run or not names:
            return tuple(sorted(names))
        await self.spool.end_suspensions(sorted(names))
        if self.listener is not None:
            self.listener.resume(sorted(names))
        log.info("queue.suspensions_lifted", destinations=sorted(names))
        return tuple(sorted(names))

    async def delete(self, f: QueueFilter, reason: str = "", *, dry_run: bool = False) -> BulkResult:
        """Remove the selected recipients silently (``queue delete``)."""
        return await self._give_up(f, "delete", reason, dry_run)

    async def bounce(self, f: QueueFilter, reason: str = "", *, dry_run: bool = False) -> BulkResult:
        """Give up on the selected recipients and tell the sender with a DSN (``queue bounce``)."""
        return await self._give_up(f, "bounce", reason, dry_run)

    async def _give_up(self, f: QueueFilter, action: str, reason: str, dry_run: bool) -> BulkResult:
        """Delete or bounce what ``f`` selects, except messages being delivered right now: their
        attempt may deliver them, and mail reported deleted or bounced (with a DSN) must not arrive.
        They are left as they are and counted in ``in_flight``, for the operator to try again."""
        f = f.normalized()
        if f.empty:
            raise ValueError(f"queue {action} needs a filter (--domain, --sender, --user, --older-than or queue ids)")
        sel = await self.select(f)
        if dry_run or not sel:
            busy = self._in_flight(sel)
            return BulkResult(action, len(sel) - len(busy), sum(len(v) for q, v in sel.items() if q not in busy),
                              dry_run, in_flight=len(busy))
        why = reason or f"{action}d by the administrator"
        qids = sorted(sel)
        skipped: set[str] = set()
        touched: set[str] = set()
        for i in range(0, len(qids), BULK_CHUNK):
            msgs = await self.spool.get_many(qids[i:i + BULK_CHUNK])
            # No await between this look and forget(): no attempt of these can start before the commit.
            busy = self._in_flight(m.queue_id for m in msgs)
            skipped.update(m.queue_id for m in msgs if m.queue_id in busy)
            msgs = [m for m in msgs if m.queue_id not in busy]
            if self.listener is not None:
                self.listener.stale([m.queue_id for m in msgs])
                for m in msgs:
                    self.listener.forget(m.queue_id)
            now = self.clock()
            updates: list[RecipientUpdate] = []
            new: list[tuple[str, NewMessage]] = []
            later: list[tuple[str, float]] = []  # messages with recipients left: back on the schedule
            for msg in msgs:
                wanted = set(sel[msg.queue_id])
                failed: list[FailedRecipient] = []
                for r in msg.active_recipients():
                    if r.index not in wanted:
                        continue
                    touched.add(msg.queue_id)
                    if action == "bounce":
                        updates.append(RecipientUpdate(msg.queue_id, r.index, BOUNCED, f"5.0.0 {why}",
                                                       attempted=False))
                        failed.append(FailedRecipient(r.address, "5.0.0", why, "", now))
                    else:
                        updates.append(RecipientUpdate(msg.queue_id, r.index, DELETED, why, attempted=False))
                if failed and msg.mail_from and not msg.is_dsn:
                    new.append(("failed", await self._dsn(msg, failed, "failed", now)))
                rest = [r.next_attempt for r in msg.active_recipients() if r.index not in wanted]
                if rest:
                    later.append((msg.queue_id, min(rest)))
            await self._commit(updates, new)
            if self.listener is not None:
                for qid, due in later:
                    self.listener.wake([qid], due)
        n = sum(len(sel[q]) for q in touched)
        log.info("queue.admin", action=action, filter=f.to_json(), messages=len(touched), recipients=n,
                 in_flight=len(skipped) or None)
        return BulkResult(action, len(touched), n, False, in_flight=len(skipped))

    def _in_flight(self, qids: Iterable[str]) -> set[str]:
        """Those of ``qids`` the delivery loop is attempting now."""
        busy = self.listener.inflight if self.listener is not None else frozenset()
        return {q for q in qids if q in busy}

    async def administrative(self, qid: str, action: str, reason: str = "") -> BulkResult:
        """``queue bounce`` / ``queue delete`` for every active recipient of one message."""
        return await self._give_up(QueueFilter(queue_ids=(qid,)), action, reason, False)

    # --- delivery outcomes --------------------------------------------------------------------
    def plan(self, msg: MessageRecord, now: float, *, has_local: bool = True) -> Plan:
        """Sort a message's active recipients: expired, suppressed, local, held, to deliver."""
        lifetime = self.cfg.delivery.bounce_queue_lifetime if msg.is_dsn else self.cfg.delivery.max_queue_lifetime
        expired = now - msg.received_at - msg.hold_credit >= lifetime
        qid = msg.queue_id
        p = Plan([], [], [], [], [])
        for r in msg.active_recipients():
            if has_local and self.hooks.is_local(r.domain):
                p.local.append(r)
            elif self.is_held(msg, r):
                p.held.append(r)  # never attempted, never expires while held
            elif expired:
                reply = r.last_reply or "4.4.7 Delivery time expired"
                p.updates.append(RecipientUpdate(qid, r.index, EXPIRED, f"expired: {reply}", attempted=False))
                p.failed.append(FailedRecipient(r.address, _status_of(r.last_reply) or "4.4.7",
                                                r.last_reply or "delivery time expired", "", now))
                metrics.DELIVERY_ATTEMPTS.labels("expired", metrics.destination_domain_label(r.domain)).inc()
            elif msg.queue == OUTBOUND and self.hooks.is_suppressed(r.address):
                p.updates.append(RecipientUpdate(qid, r.index, SUPPRESSED, "5.7.1 recipient suppressed",
                                                 attempted=False))
                p.failed.append(FailedRecipient(r.address, "5.7.1", "recipient is on the suppression list", "", now))
                metrics.SUPPRESSED_REJECTIONS.labels("delivery").inc()
                metrics.DELIVERY_ATTEMPTS.labels("suppressed", metrics.destination_domain_label(r.domain)).inc()
            else:
                p.to_try.append(r)
        return p

    def outcome(self, msg: MessageRecord, plan: Plan, results: Sequence[tuple[RecipientRecord, RcptOutcome]],
                local_results: Sequence[tuple[RecipientRecord, LocalResult]] = (),
                postponed: Sequence[Postponed] = (), now: float | None = None) -> Outcome:
        """Turn an attempt's results into recipient updates (and DSN content); nothing written yet."""
        now = self.clock() if now is None else now
        qid = msg.queue_id
        updates = list(plan.updates)
        failed = list(plan.failed)
        for r, lr in local_results:
            if lr.ok:
                updates.append(RecipientUpdate(qid, r.index, PROCESSED, lr.detail))
            elif lr.temporary:
                updates.append(RecipientUpdate(qid, r.index, DEFERRED, lr.detail, self.retry_at(r.attempts + 1, now)))
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
                updates.append(RecipientUpdate(qid, r.index, DEFERRED, reply, self.retry_at(r.attempts + 1, now)))
                metrics.DELIVERY_ATTEMPTS.labels("deferred", dom).inc()
        for pp in postponed:
            if pp.durable:  # unless it got the throttling reply itself, the retry count is left alone
                updates.append(RecipientUpdate(qid, pp.rcpt.index, DEFERRED, pp.reply or pp.rcpt.last_reply,
                                               pp.when, attempted=pp.attempted))
                if pp.attempted:
                    metrics.DELIVERY_ATTEMPTS.labels("deferred", metrics.destination_domain_label(pp.rcpt.domain)).inc()
        delayed: list[FailedRecipient] = []
        warn_after = self.cfg.delivery.delay_warning
        if warn_after > 0 and not msg.warned and not msg.is_dsn and msg.mail_from and \
                now - msg.received_at >= warn_after:
            delayed = [FailedRecipient(r.address, res.enhanced or "4.0.0", _diagnostic(res), res.remote_mta, now,
                                       res.stage)
                       for r, res in results if not res.ok and not res.permanent]
        later = [pp.when for pp in postponed if not pp.durable]
        events = [e for _, lr in local_results for e in lr.events]
        return Outcome(msg, updates, failed, delayed, now, later, bool(plan.held), events)

    async def commit(self, o: Outcome) -> float | None:
        """Record an outcome durably (raises SpoolError if the spool refuses it). Returns when to
        look at the message again: a time, :data:`PARKED` (only held recipients are left) or None
        (nothing is left)."""
        done = await self.record(o.msg, o.updates, o.failed, o.now, delayed=o.delayed, events=o.events)
        if o.msg.queue_id in done:
            return None
        pending = [u.next_attempt for u in o.updates if u.state == DEFERRED] + o.later
        if pending:
            return min(pending)
        if o.held:
            return PARKED
        # Recipients we did not touch this round (none expected): look again later.
        return o.now + self.cfg.delivery.retry_initial

    async def finish(self, msg: MessageRecord, plan: Plan, results: Sequence[tuple[RecipientRecord, RcptOutcome]],
                     local_results: Sequence[tuple[RecipientRecord, LocalResult]] = (),
                     postponed: Sequence[Postponed] = (), now: float | None = None) -> float | None:
        """:meth:`outcome` then :meth:`commit`."""
        return await self.commit(self.outcome(msg, plan, results, local_results, postponed, now))

    async def record(self, msg: MessageRecord, updates: list[RecipientUpdate], failed: list[FailedRecipient],
                     now: float, delayed: Sequence[FailedRecipient] = (), events: Sequence[Event] = ()
                     ) -> list[str]:
        """Write outcomes durably, with the DSN (if any) and events in the same transaction."""
        new: list[tuple[str, NewMessage]] = []
        if failed and msg.mail_from and not msg.is_dsn:
            new.append(("failed", await self._dsn(msg, failed, "failed", now)))
        if delayed:
            new.append(("delayed", await self._dsn(msg, delayed, "delayed", now)))
        done = await self._commit(updates, new, events)
        if delayed:
            try:
                await self.spool.mark_warned(msg.queue_id)
            except SpoolError as e:  # the outcome is recorded; at worst a second delay warning
                log.error("spool.mark_warned_failed", queue_id=msg.queue_id, error=str(e))
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

    async def _commit(self, updates: list[RecipientUpdate], new: list[tuple[str, NewMessage]],
                      events: Sequence[Event] = ()) -> list[str]:
        done = await self.spool.update(updates, [m for _, m in new], events)
        for action, m in new:
            metrics.DSN_SENT.labels(action).inc()
            if self.listener is not None:
                self.listener.submit(m)
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

    def retry_at(self, attempts: int, now: float) -> float:
        """Exponential backoff from retry_initial, capped at retry_max, with jitter (like Postfix's
        minimal/maximal_backoff_time, plus jitter so a burst of deferrals does not retry in step)."""
        d = self.cfg.delivery
        delay = min(d.retry_max, d.retry_initial * (2 ** max(0, attempts - 1)))
        j = d.retry_jitter
        return now + delay * random.uniform(1 - j, 1 + j)

    # --- listing ------------------------------------------------------------------------------
    def recipient_state(self, msg: MessageRecord, rcpt: RecipientRecord, inflight: frozenset[str]) -> str:
        if not rcpt.active:
            return rcpt.state
        if self.is_held(msg, rcpt):
            return "held"
        return "inflight" if msg.queue_id in inflight else rcpt.state


def _rule_filter(rule: HoldRule) -> QueueFilter:
    return QueueFilter(**{rule.kind: rule.value})


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
