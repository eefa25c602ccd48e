"""Queue administration (``mailrelayd queue ...``): list, show, hold, release, flush, delete, bounce.

While the daemon runs, the CLI reaches these through the sidecar's admin UNIX socket, so the
delivery loop learns about every change at once. When the daemon is stopped, the CLI runs the same
operations through a :class:`QueueManager` directly on the spool (SQLite transactions keep it
consistent; the daemon picks the changes up when it starts).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from mailrelayd.config import normalize_destination
from mailrelayd.delivery.queuemanager import BulkResult, QueueManager
from mailrelayd.delivery.scheduler import Scheduler
from mailrelayd.errors import SpoolError
from mailrelayd.history import finite_number, is_unicode
from mailrelayd.reasons import reason_text
from mailrelayd.spool.queueid import is_queue_id
from mailrelayd.spool.store import MessageRecord, QueueFilter, Spool

BULK_ACTIONS = ("hold", "release", "flush", "delete", "bounce")
BULK_FIELDS = frozenset({"filter", "dry_run", "reason", "until", "all"})
FILTER_FIELDS = frozenset({"domain", "sender", "user", "older_than", "queue_ids"})
WHOLE_QUEUE_ACTIONS = frozenset({"release", "flush"})
"""The bulk verbs that may apply to the whole queue, and then only when asked (``"all": true``; for
``flush``, no filter too, as ``mailrelayd queue flush`` documents). Hold, delete and bounce never do."""
CRITERIA = "domain, sender, user, older_than or queue_ids"
MAX_LIST = 1_000_000
"""Largest ``limit`` of ``GET queue`` (SQLite reads a negative LIMIT as "no limit")."""


def filter_from_json(data: Any, action: str = "") -> QueueFilter:
    """The ``filter`` of a bulk request. Raises ValueError naming the field. A field it does not
    know, or a criterion that normalises to nothing (a blank domain), is an error rather than
    ignored: ignored, it would widen a release or a flush to the whole queue."""
    if not isinstance(data, dict):
        raise ValueError("filter must be a JSON object")
    unknown = set(data) - FILTER_FIELDS
    if unknown:
        raise ValueError(f"unknown filter field {sorted(map(str, unknown))[0]!r}")
    for k in ("domain", "sender", "user"):
        if k in data and not (isinstance(data[k], str) and is_unicode(data[k])):
            raise ValueError(f"filter.{k} must be a string")
    if "older_than" in data and ((older := finite_number(data["older_than"])) is None or older < 0):
        raise ValueError("filter.older_than must be a number of seconds")
    ids = data.get("queue_ids", [])
    if not isinstance(ids, list) or not all(isinstance(q, str) and is_queue_id(q.strip()) for q in ids):
        raise ValueError("filter.queue_ids must be a list of queue ids")
    f = QueueFilter.from_json(data)
    for k in ("domain", "user"):  # "  " or "." normalise to None: no criterion at all
        if k in data and not getattr(f, k):
            raise ValueError(f"filter.{k} is empty")
    if f.domain:
        try:  # the names recipients have: a rule for any other would hold nothing, silently
            f = dataclasses.replace(f, domain=normalize_destination(f.domain))
        except ValueError:
            if action != "release":  # release still lifts such a rule an older version stored
                raise ValueError(f"filter.domain: {data['domain']!r} is not a domain name") from None
    return f


def _wants_everything(action: str, body: dict[str, Any], f: QueueFilter) -> bool:
    """Whether a bulk request asks for the whole queue. Raises ValueError naming what is needed: an
    empty filter never widens to everything by accident (a script's empty list of ids, a filter that
    lost its keys), so release needs ``"all": true`` and hold, delete and bounce need a criterion."""
    if "all" in body:
        everything = body["all"]
        if not isinstance(everything, bool):
            raise ValueError("all must be true or false")
        if everything and action not in WHOLE_QUEUE_ACTIONS:
            raise ValueError(f"queue {action} cannot apply to the whole queue: give a filter ({CRITERIA})")
        if everything and not f.empty:
            raise ValueError('"all": true and a filter together: give one or the other')
    else:
        everything = f.empty and action == "flush"
    if f.empty and not everything:
        whole = ' or "all": true' if action in WHOLE_QUEUE_ACTIONS else ""
        raise ValueError(f"queue {action} needs a filter ({CRITERIA}){whole}")
    return everything


def _reason(body: dict[str, Any]) -> str:
    reason = body.get("reason")
    if reason is not None and not (isinstance(reason, str) and is_unicode(reason)):
        raise ValueError("reason must be a string")
    return reason_text(reason or "")


def message_json(m: MessageRecord, inflight: frozenset[str] = frozenset(), now: float | None = None,
                 qm: QueueManager | None = None, scheduler: Scheduler | None = None) -> dict[str, Any]:
    """A queued message as the CLI prints it (``--json``). A held recipient has ``"state": "held"``."""
    now = time.time() if now is None else now
    active = m.active_recipients()

    def state(r: Any) -> str:
        if qm is not None:
            return qm.recipient_state(m, r, inflight)
        return "inflight" if (m.queue_id in inflight and r.active) else r.state

    rcpts = []
    for r in m.recipients:
        item: dict[str, Any] = {"address": r.address, "state": state(r), "attempts": r.attempts,
                                "next_attempt": r.next_attempt if r.active else None, "last_reply": r.last_reply}
        if scheduler is not None and r.active:
            item["destination"] = scheduler.destination_name(r.domain)
        if item["state"] == "held" and qm is not None:
            item["held_reason"] = qm.hold_reason(m, r)
        rcpts.append(item)
    held = bool(active) and all(x["state"] == "held" for x in rcpts if x["next_attempt"] is not None)
    return {
        "queue_id": m.queue_id,
        "age_s": round(now - m.received_at, 1),
        "received_at": m.received_at,
        "sender": m.mail_from,
        "user": m.user or None,
        "size": m.size,
        "queue": m.queue,
        "dsn": m.is_dsn,
        "state": "held" if held else "active",
        "next_attempt": None if held else min((r.next_attempt for r in active), default=None),
        "recipients": rcpts,
    }


class QueueOps:
    def __init__(self, spool: Spool, scheduler: Scheduler | None, queue: QueueManager | None = None) -> None:
        self.spool = spool
        self.scheduler = scheduler
        if queue is None:
            assert scheduler is not None, "QueueOps needs a scheduler or a queue manager"
            queue = scheduler.queue
        self.queue = queue

    def _inflight(self) -> frozenset[str]:
        return self.scheduler.inflight if self.scheduler else frozenset()

    async def list(self, limit: int = 1000) -> list[dict[str, Any]]:
        inflight = self._inflight()
        now = time.time()
        return [message_json(m, inflight, now, self.queue, self.scheduler)
                for m in await self.spool.list_messages(limit)]

    async def show(self, qid: str) -> dict[str, Any] | None:
        m = await self.spool.get(qid.upper())
        if m is None:
            return None
        out = message_json(m, self._inflight(), None, self.queue, self.scheduler)
        body = await self.spool.body(m.queue_id) or b""
        head_end = body.find(b"\r\n\r\n")
        out["headers"] = body[: head_end if head_end >= 0 else 4096].decode("utf-8", "replace")
        return out

    def destinations(self) -> dict[str, Any]:
        rules = [{"kind": r.kind, "value": r.value, "until": r.until or None, "reason": r.reason,
                  "since": r.created_at} for r in self.queue.rules]
        dests = self.scheduler.destinations_json() if self.scheduler is not None else []
        return {"destinations": dests, "holds": rules}

    async def destinations_stored(self) -> dict[str, Any]:
        """:meth:`destinations` with the daemon stopped: the hold rules and the suspensions kept in
        the spool (they are in force again when it starts)."""
        out = self.destinations()
        if self.scheduler is None:
            out["destinations"] = [{"destination": s.destination, "active": 0, "waiting": 0, "held": False,
                                    "suspended_until": s.until, "suspend_reply": s.reply}
                                   for s in await self.spool.suspensions(time.time())]
        return out

    async def flush(self, qid: str | None) -> int:
        f = QueueFilter(queue_ids=(qid.upper(),)) if qid else None
        return (await self.queue.flush(f)).recipients

    async def delete(self, qid: str) -> BulkResult:
        return await self.queue.administrative(qid.upper(), "delete")

    async def bounce(self, qid: str) -> BulkResult:
        return await self.queue.administrative(qid.upper(), "bounce")

    async def bulk(self, action: str, f: QueueFilter, *, dry_run: bool = False, reason: str = "",
                   until: float | None = None, everything: bool = False) -> BulkResult:
        """One bulk verb on what ``f`` selects; the whole queue only with ``everything`` (see
        :func:`_wants_everything`). Raises ValueError for an empty filter without it."""
        q = self.queue
        if everything and (action not in WHOLE_QUEUE_ACTIONS or not f.empty):
            raise ValueError(f"queue {action} of the whole queue: only release and flush, and with no filter")
        if f.empty and not everything:
            raise ValueError(f"queue {action} needs a filter ({CRITERIA})")
        if action == "hold":
            return await q.hold(f, until=until, reason=reason, dry_run=dry_run)
        if action == "release":
            return await q.release(None if everything else f, dry_run=dry_run)
        if action == "flush":
            return await q.flush(None if everything else f, dry_run=dry_run)
        if action == "delete":
            return await q.delete(f, reason, dry_run=dry_run)
        if action == "bounce":
            return await q.bounce(f, reason, dry_run=dry_run)
        raise ValueError(f"unknown action {action!r}")

    async def handle(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """The admin API: ``GET queue``, ``GET queue/destinations``, ``GET queue/ID``,
        ``POST queue/hold|release|flush|delete|bounce`` with a JSON body ``{"filter": {...},
        "dry_run": bool, "reason": str, "until": unix-time, "all": bool}``, ``POST queue/ID/<action>``.
        A bulk verb needs a filter; ``release`` of every hold needs ``"all": true`` instead, ``flush``
        with no filter is every deferred message. A spool that cannot be read or written (disk full,
        damaged) is a 503 with the reason, for the CLI."""
        try:
            return await self._handle(method, path, body)
        except SpoolError as e:
            return 503, {"error": f"spool: {e}"}

    async def _handle(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if not parts or parts[0] != "queue":
            return 404, {"error": "unknown endpoint"}
        if body is None:
            body = {}
        if not isinstance(body, dict):  # any JSON value reaches here: a list must not mean "everything"
            return 400, {"error": "the request body must be a JSON object"}
        if method == "GET" and len(parts) == 1:
            limit = body.get("limit", 1000)
            if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
                return 400, {"error": f"limit must be an integer from 1 to {MAX_LIST}"}
            return 200, await self.list(limit)
        if method == "GET" and parts[1:] == ["destinations"]:
            return 200, self.destinations()
        if method == "POST" and len(parts) == 2 and parts[1] in BULK_ACTIONS:
            try:
                unknown = set(body) - BULK_FIELDS
                if unknown:  # "filtre": {...} ignored would release or flush everything
                    raise ValueError(f"unknown field {sorted(map(str, unknown))[0]!r}")
                f = filter_from_json(body["filter"], parts[1]) if "filter" in body else QueueFilter()
                dry_run = body.get("dry_run")
                if dry_run is not None and not isinstance(dry_run, bool):
                    raise ValueError("dry_run must be true or false")
                until = finite_number(body["until"]) if body.get("until") is not None else 0.0
                if until is None or until < 0:  # NaN or a huge integer would fail in the spool
                    raise ValueError("until must be a Unix time")
                reason = _reason(body)
                everything = _wants_everything(parts[1], body, f)
                if parts[1] == "flush" and everything and not body.keys() & {"filter", "all"} and not dry_run:
                    flushed = await self.queue.flush(None)  # the 0.1 API (plus the suspensions lifted)
                    return 200, {"rescheduled": flushed.recipients, **({"resumed": list(flushed.resumed)}
                                                                        if flushed.resumed else {})}
                res = await self.bulk(parts[1], f, dry_run=bool(dry_run), reason=reason, until=until or None,
                                      everything=everything)
            except (ValueError, TypeError) as e:
                return 400, {"error": str(e)}
            return 200, res.to_json()
        if len(parts) < 2 or not is_queue_id(parts[1]):
            return 400, {"error": "expected a queue id"}
        qid = parts[1].upper()
        if method == "GET" and len(parts) == 2:
            m = await self.show(qid)
            return (200, m) if m is not None else (404, {"error": f"no message {qid}"})
        if method == "POST" and len(parts) == 3:
            action = parts[2]
            if action == "flush":
                return 200, {"rescheduled": await self.flush(qid)}
            if action in ("delete", "bounce"):
                res = await (self.delete(qid) if action == "delete" else self.bounce(qid))
                if res.in_flight:
                    return 409, {"error": f"{qid} is being delivered right now and may arrive: not {action}d; "
                                          "try again when the attempt ends"}
                return (200, {action: qid}) if res.messages else (404, {"error": f"no active message {qid}"})
            if action in ("hold", "release"):
                try:
                    reason = _reason(body)
                except ValueError as e:
                    return 400, {"error": str(e)}
                res = await self.bulk(action, QueueFilter(queue_ids=(qid,)), reason=reason)
                return (200, res.to_json()) if res.messages else (404, {"error": f"no active message {qid}"})
        return 404, {"error": "unknown endpoint"}
