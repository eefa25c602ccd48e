"""Feedback pipeline: what happens to mail addressed to our own domains (the bounce domain and
``relay.local_domains``), and to the synchronous 5xx replies of our own deliveries.

Inbound feedback arrives over SMTP like any mail, is spooled durably first (so a crash never
loses a bounce), and is then processed here by the scheduler as a "local delivery":

1. parse the message (:func:`parse_feedback`, in a thread: it is CPU work);
2. weigh it with the trust model (:mod:`mailrelayd.feedback.trust`): a valid VERP token names
   the recipient and wins; without one, only addresses we sent to within
   ``feedback.sent_window`` are acted on, and complaints only from ``feedback.trusted_reporters``;
3. record each trusted failure in the suppression store: hard bounces and complaints
   suppress; soft bounces suppress only after ``feedback.soft_bounce_threshold`` of them within
   ``feedback.soft_bounce_window``; delay warnings are never recorded; reputation and policy
   failures (about our sending) are counted per sending domain and destination instead;
4. count and log one ``feedback.received`` event; keep unparsable and untrusted messages for
   inspection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailrelayd import metrics
from mailrelayd.delivery.scheduler import LocalResult
from mailrelayd.feedback.classify import NOT_ABOUT_RECIPIENT, classify_status
from mailrelayd.feedback.parse import FeedbackReport, parse_feedback
from mailrelayd.feedback.report import NOT_FEEDBACK
from mailrelayd.feedback.trust import (
    Action,
    Decision,
    ReporterPolicy,
    VerpMatch,
    decide,
    peer_ip_of,
    policy_for,
    reporter_is_trusted,
)
from mailrelayd.feedback.verp import parse_return_path
from mailrelayd.log import get_logger
from mailrelayd.spool.store import Event, MessageRecord, RecipientRecord
from mailrelayd.statefiles import private_dir, write_private

if TYPE_CHECKING:
    from mailrelayd.config import Config
    from mailrelayd.feedback.store import SuppressionStore
    from mailrelayd.spool.store import Spool

log = get_logger()

SUPPRESSING = ("hard_bounce", "complaint")
__all__ = ["SUPPRESSING", "Action", "FeedbackProcessor"]

# Reasons that get their own label on the reputation metrics (the classifier's vocabulary).
_REASON_LABELS = frozenset(metrics.REPUTATION_REASONS)


def count_sender_event(sender_domain: str, destination: str, kind: str, reason: str) -> None:
    """One reputation/policy failure: per sending domain and per destination (bounded labels)."""
    label = reason if reason in _REASON_LABELS else "other"
    metrics.REPUTATION_EVENTS.labels(metrics.sender_domain_label(sender_domain), label).inc()
    metrics.REPUTATION_EVENTS_BY_DESTINATION.labels(metrics.destination_domain_label(destination), label).inc()


class FeedbackProcessor:
    """Applies parsed feedback to the suppression store. ``owner`` provides ``cfg``, ``spool``,
    ``suppressions`` and ``verp_secrets`` (the daemon; kept by reference so reloads apply).
    ``on_outcome`` (optional) is told every trusted outcome per sending domain (the circuit
    breaker's input): ``on_outcome(sender_domain, kind)``."""

    def __init__(self, owner: Any, *, on_outcome: Callable[[str, str], None] | None = None) -> None:
        self.owner = owner
        self.on_outcome = on_outcome
        # The store is one SQLite connection: all its writes go through one thread, in order.
        self._store_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="suppress")
        self._parse_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback")
        self._resolver: Any = None
        self._resolver_cfg: Any = None

    @property
    def cfg(self) -> Config:
        return self.owner.cfg

    @property
    def spool(self) -> Spool:
        return self.owner.spool

    @property
    def store(self) -> SuppressionStore:
        return self.owner.suppressions

    def close(self) -> None:
        self._store_pool.shutdown(wait=True)
        self._parse_pool.shutdown(wait=True)

    async def process(self, msg: MessageRecord, body: bytes, rcpts: Sequence[RecipientRecord]) -> list[LocalResult]:
        """Handle one spooled feedback message (all its local recipients at once)."""
        loop = asyncio.get_running_loop()
        report: FeedbackReport = await loop.run_in_executor(self._parse_pool, parse_feedback, body)
        fb = self.cfg.feedback
        verp: VerpMatch | None = None
        elsewhere = ""  # a valid token whose queue entry is not in this spool (another node's, or expired)
        if fb.bounce_domain:
            secrets = self.owner.verp_secrets
            for r in rcpts:
                tok = parse_return_path(r.address, fb.bounce_domain, secrets)
                if tok is None:
                    continue
                found = await self.spool.lookup_recipient(tok.queue_id, tok.rcpt_index)
                if found is not None:
                    verp = VerpMatch(found[0], found[1], tok.queue_id)
                    break
                elsewhere = elsewhere or tok.queue_id
            if verp is None and report.original_return_path:
                # A report sent to the plain address (an ARF feedback loop) that quotes our VERP
                # return path (Original-Mail-From, the original's Return-Path): the token names
                # the recipient just as well.
                tok = parse_return_path(report.original_return_path, fb.bounce_domain, secrets)
                found = await self.spool.lookup_recipient(tok.queue_id, tok.rcpt_index) if tok else None
                if tok is not None and found is not None:
                    verp = VerpMatch(found[0], found[1], tok.queue_id)
                elif tok is not None:
                    elsewhere = elsewhere or tok.queue_id
        sent: dict[str, str] = {}
        trusted, why = False, ""
        if verp is None:
            named = [r.address for r in report.recipients if r.address]
            if named:
                sent = await self.spool.sent_to_since(named, msg.received_at - fb.sent_window)
            if report.kind == "complaint":
                trusted, why = await self._reporter_trusted(body, report)
                if trusted and elsewhere:
                    # A listed reporter's complaint quoting a valid token of ours whose message is in
                    # another node's spool (a fleet behind one MX): the fleet sent it, and the named
                    # recipient is acted on as this node would had it sent the message itself.
                    sent = {**{a.lower(): a for a in named}, **sent}
        decision = decide(report, verp=verp, sent=sent, reporter_trusted=trusted, require_verp=fb.require_verp)
        sender_domain = verp.sender_domain if verp else _domain(report.original_from)
        # The message that bounced is what an operator looks for, and what copies of one report
        # count once against (soft bounces): named by the VERP token (resolved here or, for another
        # node's message, as the token says), else by the Message-ID the report quotes when we sent
        # that message to one of its recipients; else the report itself.
        origin_qid = verp.queue_id if verp else (elsewhere or msg.queue_id)
        if verp is None and not elsewhere and decision.actions and report.original_message_id:
            origin_qid = await self.spool.sent_message(report.original_message_id, list(sent.values()),
                                                       msg.received_at - fb.sent_window) or origin_qid
        suppressed = await self._apply(decision, origin_qid)
        events = _events(decision, origin_qid, suppressed) if verp is not None else []
        for event in decision.sender_events:
            count_sender_event(sender_domain, _domain(event.address), event.kind, event.reason)
        if self.on_outcome is not None and sender_domain:
            for a in decision.actions:
                self.on_outcome(sender_domain, a.kind)
        kind = decision.kind_label or report.kind
        if kind == "complaint" and not decision.actions and verp is None and not trusted:
            kind = "untrusted"  # a complaint naming nobody (redacted) counts only from a listed reporter
        metrics.FEEDBACK_RECEIVED.labels(kind, metrics.sender_domain_label(sender_domain)).inc()
        if kind in ("unparsable", "untrusted") and fb.keep_unparsable:
            await loop.run_in_executor(self._store_pool, self._keep, msg.queue_id, body, kind)
        if report.kind == NOT_FEEDBACK and any(r.address.rpartition("@")[0].lower() == "postmaster" for r in rcpts):
            # Mail for the postmaster (RFC 5321 §4.5.1) that is no report at all is for a person: keep it
            # where the operator looks, like a local mailbox.
            await loop.run_in_executor(self._store_pool, self._keep, msg.queue_id, body, kind, "postmaster")
            log.info("postmaster.received", queue_id=msg.queue_id, mail_from=msg.mail_from or None,
                     kept=str(Path(self.cfg.server.state_dir) / "postmaster" / f"{msg.queue_id}.eml"))
        log.info("feedback.received", queue_id=msg.queue_id, kind=kind, report_kind=report.kind,
                 parser=report.parser or None, feedback_type=report.feedback_type or None, verp=verp is not None,
                 basis=decision.basis, reporter=why or None,
                 recipients=[{"address": a.address, "kind": a.kind, "status": a.status, "reason": a.reason}
                             for a in decision.actions],
                 sender_events=[{"address": e.address, "kind": e.kind, "status": e.status, "reason": e.reason}
                                for e in decision.sender_events],
                 untrusted=list(decision.untrusted) or None, suppressed=suppressed, detail=report.detail or None,
                 verp_not_here=elsewhere if verp is None and elsewhere else None)
        detail = f"processed: {kind}" + (f", suppressed {len(suppressed)}" if suppressed else "")
        return [LocalResult(True, detail, events=tuple(events) if i == 0 else ()) for i in range(len(rcpts))]

    async def _apply(self, decision: Decision, origin_qid: str) -> list[str]:
        loop = asyncio.get_running_loop()
        suppressed: list[str] = []
        for a in decision.actions:
            try:
                now_suppressed = await loop.run_in_executor(
                    self._store_pool, lambda a=a: self.store.record(a.address, a.kind, a.reason, a.source,
                                                                    origin_qid))
            except ValueError:
                continue
            if now_suppressed:
                suppressed.append(a.address)
        return suppressed

    async def _reporter_trusted(self, body: bytes, report: FeedbackReport) -> tuple[bool, str]:
        fb = self.cfg.feedback
        if not fb.trusted_reporters:
            return False, "feedback.trusted_reporters is empty"
        policy = policy_for(report, ReporterPolicy.from_config(fb.trusted_reporters))
        loop = asyncio.get_running_loop()

        async def run_blocking(fn: Any, *args: Any) -> bool:
            return bool(await loop.run_in_executor(self._parse_pool, fn, *args))

        return await reporter_is_trusted(body, peer_ip=peer_ip_of(body, self.cfg.server.hostname), policy=policy,
                                         txt=self._txt, run_blocking=run_blocking)

    async def _txt(self, name: str) -> bytes | None:
        """One TXT record (the DKIM key of a reporter), joined; None when there is none."""
        import dns.exception

        from mailrelayd.delivery.mx import make_resolver

        if self._resolver is None or self._resolver_cfg is not self.cfg.dns:
            self._resolver, self._resolver_cfg = make_resolver(self.cfg.dns), self.cfg.dns
        try:
            answer = await self._resolver.resolve(name, "TXT", search=False)
        except (dns.exception.DNSException, OSError) as exc:
            log.info("feedback.dkim_key_lookup_failed", name=name, error=type(exc).__name__)
            return None
        for rr in answer:
            return b"".join(rr.strings)
        return None

    def smtp_failure(self, msg: MessageRecord, rcpt: RecipientRecord, outcome: Any) -> None:
        """A synchronous 5xx from our own delivery (e.g. ``550 5.1.1 user unknown`` at RCPT):
        classify it like a bounce and record it (hard suppresses, soft counts); a failure about
        our sending (blocklist, PTR, DMARC, spam, rate) is counted as a reputation event instead."""
        if msg.is_dsn:
            return
        kind, reason = classify_status(outcome.enhanced or "", outcome.text or "", smtp_code=outcome.code or None)
        if kind in NOT_ABOUT_RECIPIENT:
            count_sender_event(msg.sender_domain, rcpt.domain, kind, reason)
            log.warning("feedback.reputation_event", queue_id=msg.queue_id, sender_domain=msg.sender_domain,
                        destination=rcpt.domain, kind=kind, reason=reason, status=outcome.enhanced,
                        reply=(outcome.text or "")[:300])
            return
        if kind not in ("hard_bounce", "soft_bounce"):
            return
        if self.on_outcome is not None and msg.sender_domain:
            self.on_outcome(msg.sender_domain, kind)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._store_pool, lambda: self.store.record(
            rcpt.address, kind, reason, "smtp", msg.queue_id))
        fut.add_done_callback(lambda f: f.exception() and log.warning(
            "feedback.record_failed", queue_id=msg.queue_id, error=str(f.exception())))
        log.info("feedback.smtp_failure", queue_id=msg.queue_id, rcpt=rcpt.address, kind=kind, reason=reason,
                 status=outcome.enhanced)

    def _keep(self, qid: str, body: bytes, kind: str = "unparsable", folder: str | None = None) -> None:
        d = Path(self.cfg.server.state_dir) / (folder or f"feedback-{kind}")
        private_dir(d)
        tmp = d / f".{qid}.eml"
        write_private(tmp, body)  # a report quotes the message: 0600, like the spool
        os.replace(tmp, d / f"{qid}.eml")
        with contextlib.suppress(OSError):
            # Keep the folder bounded: the newest 1000 are enough to debug a parser gap.
            files = sorted(d.glob("*.eml"), key=lambda p: p.stat().st_mtime)
            for old in files[:-1000]:
                old.unlink()


def _domain(addr: str) -> str:
    a = (addr or "").strip().strip("<>")
    return a.rpartition("@")[2].lower().rstrip(".") if "@" in a else ""



def _events(decision: Decision, origin_qid: str, suppressed: Sequence[str]) -> list[Event]:
    """Webhook events about the message the VERP token names (without it we cannot say which of
    ours it was): recorded with this feedback message's outcome, in the same transaction."""
    now = time.time()
    out: list[Event] = []
    for a in decision.actions:
        kind = "complained" if a.kind == "complaint" else "bounced"
        out.append(Event(kind, now, origin_qid, a.address, fb_kind=a.kind, reason=a.reason, reply=a.status))
        if a.address in suppressed:
            out.append(Event("suppressed", now, origin_qid, a.address, fb_kind=a.kind, reason=a.reason))
    return out
