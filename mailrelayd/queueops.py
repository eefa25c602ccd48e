"""Queue administration (``mailrelayd queue ...``): list, show, flush, delete, bounce.

While the daemon runs, the CLI reaches these through the sidecar's admin UNIX socket, so the
scheduler learns about every change at once. When the daemon is stopped, the CLI runs the same
operations directly on the spool (SQLite transactions keep it consistent; the daemon picks the
changes up when it starts).
"""

from __future__ import annotations

import time
from typing import Any

from mailrelayd.delivery.scheduler import Scheduler
from mailrelayd.errors import SpoolError
from mailrelayd.spool.queueid import is_queue_id
from mailrelayd.spool.store import MessageRecord, Spool


def message_json(m: MessageRecord, inflight: frozenset[str] = frozenset(), now: float | None = None) -> dict[str, Any]:
    """A queued message as the CLI prints it (``--json``)."""
    now = time.time() if now is None else now
    active = m.active_recipients()
    return {
        "queue_id": m.queue_id,
        "age_s": round(now - m.received_at, 1),
        "received_at": m.received_at,
        "sender": m.mail_from,
        "size": m.size,
        "queue": m.queue,
        "dsn": m.is_dsn,
        "next_attempt": min((r.next_attempt for r in active), default=None),
        "recipients": [
            {"address": r.address, "state": "inflight" if (m.queue_id in inflight and r.active) else r.state,
             "attempts": r.attempts, "next_attempt": r.next_attempt if r.active else None,
             "last_reply": r.last_reply}
            for r in m.recipients
        ],
    }


class QueueOps:
    def __init__(self, spool: Spool, scheduler: Scheduler | None) -> None:
        self.spool = spool
        self.scheduler = scheduler

    async def list(self, limit: int = 1000) -> list[dict[str, Any]]:
        inflight = self.scheduler.inflight if self.scheduler else frozenset()
        return [message_json(m, inflight) for m in await self.spool.list_messages(limit)]

    async def show(self, qid: str) -> dict[str, Any] | None:
        m = await self.spool.get(qid.upper())
        if m is None:
            return None
        inflight = self.scheduler.inflight if self.scheduler else frozenset()
        out = message_json(m, inflight)
        body = await self.spool.body(m.queue_id) or b""
        head_end = body.find(b"\r\n\r\n")
        out["headers"] = body[: head_end if head_end >= 0 else 4096].decode("utf-8", "replace")
        return out

    async def flush(self, qid: str | None) -> int:
        n = await self.spool.reschedule(qid.upper() if qid else None, time.time())
        if self.scheduler is not None:
            self.scheduler.flush(qid.upper() if qid else None)
        return n

    async def delete(self, qid: str) -> bool:
        assert self.scheduler is not None
        return await self.scheduler.administrative(qid.upper(), "delete")

    async def bounce(self, qid: str) -> bool:
        assert self.scheduler is not None
        return await self.scheduler.administrative(qid.upper(), "bounce")

    async def handle(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """The admin API: ``GET queue``, ``GET queue/ID``, ``POST queue/flush``,
        ``POST queue/ID/flush|delete|bounce``. A spool that cannot be read or written (disk full,
        damaged) is a 503 with the reason, for the CLI to print."""
        try:
            return await self._handle(method, path, body)
        except SpoolError as e:
            return 503, {"error": f"spool: {e}"}

    async def _handle(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if not parts or parts[0] != "queue":
            return 404, {"error": "unknown endpoint"}
        if method == "GET" and len(parts) == 1:
            return 200, await self.list(int(body.get("limit", 1000)) if body else 1000)
        if method == "POST" and parts[1:] == ["flush"]:
            return 200, {"rescheduled": await self.flush(None)}
        if len(parts) < 2 or not is_queue_id(parts[1]):
            return 400, {"error": "expected a queue id"}
        qid = parts[1]
        if method == "GET" and len(parts) == 2:
            m = await self.show(qid)
            return (200, m) if m is not None else (404, {"error": f"no message {qid}"})
        if method == "POST" and len(parts) == 3:
            action = parts[2]
            if action == "flush":
                return 200, {"rescheduled": await self.flush(qid)}
            if action in ("delete", "bounce"):
                ok = await (self.delete(qid) if action == "delete" else self.bounce(qid))
                return (200, {action: qid}) if ok else (404, {"error": f"no active message {qid}"})
        return 404, {"error": "unknown endpoint"}
