"""Feedback pipeline: what happens to mail addressed to our own domains (the bounce domain and
``relay.local_domains``), and to the synchronous 5xx replies of our own deliveries.

Inbound feedback arrives over SMTP like any mail, is spooled durably first (so a crash never
loses a bounce), and is then processed here by the scheduler as a "local delivery":

1. parse the message (:func:`parse_feedback`, in a thread: it is CPU work);
2. if it arrived at a VERP address with a valid token, the token names the recipient we sent
   to: that address is authoritative (a bounce's own text may name a forwarding target, or be
   too mangled to parse); invalid tokens are ignored, never trusted;
3. record each failed recipient in the suppression store: hard bounces and complaints
   suppress; soft bounces suppress only after ``feedback.soft_bounce_threshold`` of them within
   ``feedback.soft_bounce_window``;
4. count and log one ``feedback.received`` event; keep unparsable messages for inspection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailrelayd import metrics
from mailrelayd.delivery.scheduler import LocalResult
from mailrelayd.feedback.classify import classify_status
from mailrelayd.feedback.parse import FeedbackReport, parse_feedback
from mailrelayd.feedback.verp import parse_return_path
from mailrelayd.log import get_logger
from mailrelayd.spool.store import Event, MessageRecord, RecipientRecord

if TYPE_CHECKING:
    from mailrelayd.config import Config
    from mailrelayd.feedback.store import SuppressionStore
    from mailrelayd.spool.store import Spool

log = get_logger()

SUPPRESSING = ("hard_bounce", "complaint")


@dataclass(frozen=True, slots=True)
class Action:
    """One suppression-store record to make."""

    address: str
    kind: str
    reason: str
    status: str
    source: str


class FeedbackProcessor:
    """Applies parsed feedback to the suppression store. ``owner`` provides ``cfg``, ``spool``,
    ``suppressions`` and ``verp_secrets`` (the daemon; kept by reference so reloads apply)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        # The store is one SQLite connection: all its writes go through one thread, in order.
        self._store_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="suppress")
        self._parse_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback")

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
        verp_rcpts: list[tuple[str, str, str]] = []  # (address we sent to, sender domain, our queue id)
        fb = self.cfg.feedback
        if fb.bounce_domain:
            secrets = self.owner.verp_secrets
            for r in rcpts:
                tok = parse_return_path(r.address, fb.bounce_domain, secrets)
                if tok is None:
                    continue
                found = await self.spool.lookup_recipient(tok.queue_id, tok.rcpt_index)
                if found is not None:
                    verp_rcpts.append((found[0], found[1], tok.queue_id))
        actions = self.decide(report, verp_rcpts)
        sender_domain = verp_rcpts[0][1] if verp_rcpts else _domain(report.original_from)
        # The message that bounced (named by the VERP token) is what an operator looks for; else the report's.
        origin_qid = verp_rcpts[0][2] if verp_rcpts else msg.queue_id
        suppressed: list[str] = []
        events: list[Event] = []
        now = time.time()
        for a in actions:
            try:
                now_suppressed = await loop.run_in_executor(
                    self._store_pool, lambda a=a: self.store.record(a.address, a.kind, a.reason, a.source,
                                                                    origin_qid))
            except ValueError:
                continue
            if now_suppressed:
                suppressed.append(a.address)
            if verp_rcpts:  # events name a message of ours; without VERP we cannot say which
                kind = "complained" if a.kind == "complaint" else "bounced"
                events.append(Event(kind, now, origin_qid, a.address, fb_kind=a.kind, reason=a.reason,
                                    reply=a.status))
                if now_suppressed:
                    events.append(Event("suppressed", now, origin_qid, a.address, fb_kind=a.kind, reason=a.reason))
        metrics.FEEDBACK_RECEIVED.labels(report.kind, metrics.sender_domain_label(sender_domain)).inc()
        if report.kind == "unparsable" and fb.keep_unparsable:
            await loop.run_in_executor(self._store_pool, self._keep, msg.queue_id, body)
        log.info("feedback.received", queue_id=msg.queue_id, kind=report.kind,
                 feedback_type=report.feedback_type or None, verp=bool(verp_rcpts),
                 recipients=[{"address": a.address, "kind": a.kind, "status": a.status, "reason": a.reason}
                             for a in actions], suppressed=suppressed, detail=report.detail or None)
        detail = f"processed: {report.kind}" + (f", suppressed {len(suppressed)}" if suppressed else "")
        return [LocalResult(True, detail, events=tuple(events) if i == 0 else ()) for i in range(len(rcpts))]

    def decide(self, report: FeedbackReport, verp: Sequence[tuple[str, str, str]]) -> list[Action]:
        """Which addresses to record, and how. Pure: no I/O."""
        kind = report.kind
        if kind not in ("hard_bounce", "soft_bounce", "complaint"):
            return []
        source = "arf" if kind == "complaint" else "dsn"
        if verp and kind != "complaint":
            # The token names exactly one recipient of ours; take the report's verdict about it
            # (or, if the report names several, the one that matches, else the worst).
            target = verp[0][0]
            match = next((r for r in report.recipients if r.address.lower() == target.lower()), None)
            pick = match or (report.recipients[0] if report.recipients else None)
            rkind = pick.kind if pick is not None else kind
            return [Action(target, rkind, pick.reason if pick else "", pick.status if pick else "", source)]
        if kind != "complaint" and self.cfg.feedback.require_verp:
            return []
        actions = [Action(r.address, r.kind, r.reason, r.status, source) for r in report.recipients if r.address]
        if not actions and verp and kind == "complaint":
            actions = [Action(verp[0][0], "complaint", report.feedback_type or "abuse", "", source)]
        return actions

    def smtp_failure(self, msg: MessageRecord, rcpt: RecipientRecord, outcome: Any) -> None:
        """A synchronous 5xx from our own delivery (e.g. ``550 5.1.1 user unknown`` at RCPT):
        classify it like a bounce and record it (hard suppresses, soft counts)."""
        if msg.is_dsn:
            return
        kind, reason = classify_status(outcome.enhanced or "", outcome.text or "", smtp_code=outcome.code or None)
        if kind not in ("hard_bounce", "soft_bounce"):
            return
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._store_pool, lambda: self.store.record(
            rcpt.address, kind, reason, "smtp", msg.queue_id))
        fut.add_done_callback(lambda f: f.exception() and log.warning(
            "feedback.record_failed", queue_id=msg.queue_id, error=str(f.exception())))
        log.info("feedback.smtp_failure", queue_id=msg.queue_id, rcpt=rcpt.address, kind=kind, reason=reason,
                 status=outcome.enhanced)

    def _keep(self, qid: str, body: bytes) -> None:
        d = Path(self.cfg.server.state_dir) / "feedback-unparsable"
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{qid}.eml"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / f"{qid}.eml")
        with contextlib.suppress(OSError):
            # Keep the folder bounded: the newest 1000 are enough to debug a parser gap.
            files = sorted(d.glob("*.eml"), key=lambda p: p.stat().st_mtime)
            for old in files[:-1000]:
                old.unlink()


def _domain(addr: str) -> str:
    a = (addr or "").strip().strip("<>")
    return a.rpartition("@")[2].lower().rstrip(".") if "@" in a else ""

