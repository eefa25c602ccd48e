"""Message history: "did the password-reset mail go out?"

One record per recipient, over the queue (``queued``, ``deferred``, and any other live state such
as ``held``) and the finished recipients kept for ``history.retention`` (``delivered``,
``bounced``, ``expired``, ``suppressed``). The same query serves ``mailrelayd history`` and the
admin socket (``POST /history`` with the query as JSON).
"""

from __future__ import annotations

import math
from typing import Any

from mailrelayd.spool.store import HistoryQuery, HistoryRecord, Spool
from mailrelayd.webhooks import rfc3339

MAX_LIMIT = 10_000


def finite_number(v: Any) -> float | None:
    """A JSON number as a finite float; None for anything else: a bool, NaN or infinity (which
    compare false with everything), or an integer too large for a float (OverflowError)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def is_unicode(s: str) -> bool:
    """False for a string with a lone surrogate (JSON "\\ud800"), which SQLite cannot bind."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def query_from_json(body: dict[str, Any]) -> HistoryQuery:
    """Build a query from the admin API's JSON. Raises ValueError with a message for the caller."""
    if not isinstance(body, dict):  # the admin socket passes any JSON value
        raise ValueError("the query must be a JSON object")
    unknown = set(body) - {"message_id", "rcpt", "sender", "user", "since", "limit"}
    if unknown:
        raise ValueError(f"unknown query field {sorted(map(str, unknown))[0]!r}")
    strs = {}
    for k in ("message_id", "rcpt", "sender", "user"):
        v = body.get(k)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ValueError(f"{k} must be a non-empty string")
        if v is not None and not is_unicode(v):
            raise ValueError(f"{k} must be valid Unicode")
        strs[k] = v
    since = body.get("since")
    if since is not None and finite_number(since) is None:
        raise ValueError("since must be a Unix time (number)")
    limit = body.get("limit", 1000)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return HistoryQuery(message_id=strs["message_id"], recipient=strs["rcpt"], sender=strs["sender"],
                        user=strs["user"], since=float(since) if since is not None else None, limit=limit)


def record_json(r: HistoryRecord) -> dict[str, Any]:
    return {"queue_id": r.queue_id, "message_id": r.message_id or None, "sender": r.sender,
            "recipient": r.recipient, "user": r.user or None, "state": r.state, "last_reply": r.last_reply or None,
            "attempts": r.attempts, "time": rfc3339(r.time), "received": rfc3339(r.received_at) if r.received_at
            else None}


async def handle(spool: Spool, body: dict[str, Any]) -> tuple[int, Any]:
    try:
        q = query_from_json({} if body is None else body)
    except ValueError as e:
        return 400, {"error": str(e)}
    return 200, [record_json(r) for r in await spool.history(q)]
